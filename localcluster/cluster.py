"""The whole local cluster in one object: the real control plane, a kubelet, SeaweedFS, Prometheus, MLflow, operator.

    with LocalCluster(work_dir) as cluster:
        cluster.kubectl("apply", "-f", "examples/tiny-cpu.yaml")
        cluster.wait_for_job("tiny-cpu", phases={"Succeeded"})

How it is put together, as a platform team would install the product on a real cluster:
- etcd, kube-apiserver, kube-controller-manager and kube-scheduler (``controlplane.py``), with ``kubeconfig`` the
  cluster admin's (for people, kubectl and helm);
- the chart, rendered by ``helm template`` and applied by kubectl (CRD through the real apiextensions server,
  ServiceAccount, RBAC); its Deployment is scaled to zero because this machine has no container runtime: the
  operator runs as a subprocess of this one with a token of the chart's ServiceAccount (``operator.kubeconfig``),
  so it has exactly the chart's permissions, never admin's;
- the jobs' namespace (``default``) enforces the ``restricted`` Pod Security Standard;
- with ``with_mlflow``, a real MLflow tracking server (``mlflow.py``) for jobs with ``spec.tracking.mlflow``.

What the local cluster translates so that the operator and the trainer run unchanged:
- The node's environment gives every pod ``AWS_ENDPOINT_URL_S3`` and ``AWS_REGION`` pointing at SeaweedFS, the
  way a cloud's pod-identity webhook injects its region and endpoints; credentials still come from the job's
  Secret (``s3-credentials``, created here with SeaweedFS's keys).
- Pods are processes in their own mount and UTS namespaces with their own loopback address, hostname and
  ``/etc/hosts`` (``kubelet_sandbox.py``), so headless-Service DNS names resolve as in a cluster.
- The operator runs as a subprocess of this one (``python -m finetune_operator``) with an explicit kubeconfig.
- Nodes are processes: the kubelet (``kubelet.py``) registers ``localnode`` and runs what the scheduler binds to it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from localcluster.chart import OPERATOR_USER, install_chart
from localcluster.controlplane import ControlPlane
from localcluster.kubelet import Kubelet
from localcluster.mlflow import MlflowServer
from localcluster.operator_process import OperatorError, OperatorProcess
from localcluster.prometheus import Prometheus, Pushgateway, prometheus_available, pushgateway_available
from localcluster.seaweedfs import SeaweedFS

REPO = Path(__file__).resolve().parent.parent
CRDS = REPO / "crds"
NAMESPACE = "default"
NODE_NAME = "localnode"
CREDENTIALS_SECRET = "s3-credentials"
REGION = "us-east-1"
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


class ClusterError(RuntimeError):
    """The local cluster could not start, or something in it did not happen in time."""


def _machine_memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1])}Ki"
    except OSError:
        pass
    return "8Gi"


class LocalCluster:
    """Starts everything in ``start()`` (or ``with``) and stops everything it started in ``stop()``."""

    def __init__(
        self,
        work_dir: Path,
        *,
        gpus: int = 0,
        cpu: str | None = None,
        memory: str | None = None,
        with_prometheus: bool = True,
        with_operator: bool = True,
        with_mlflow: bool = False,
        operator_args: Iterable[str] = (),
        quiet: bool = True,
    ) -> None:
        self.work_dir = Path(work_dir).resolve()
        self.gpus = gpus
        self.cpu = cpu or str(os.cpu_count() or 2)
        self.memory = memory or _machine_memory()
        self.with_prometheus = with_prometheus and prometheus_available()
        self.with_operator = with_operator
        self.quiet = quiet
        self.kubeconfig = self.work_dir / "kubeconfig"
        self.operator_kubeconfig = self.work_dir / "operator.kubeconfig"
        self.s3 = SeaweedFS(self.work_dir / "s3")
        self.control_plane: ControlPlane | None = None
        self.kubelet: Kubelet | None = None
        self.prometheus: Prometheus | None = None
        self.pushgateway: Pushgateway | None = None
        # A tracking server for jobs with spec.tracking.mlflow (pods reach its 127.0.0.1 URL).
        self.mlflow = MlflowServer(self.work_dir / "mlflow", self.s3) if with_mlflow else None
        self.operator_log = self.work_dir / "operator.log"
        self.operator = OperatorProcess(
            self.operator_kubeconfig,
            self.operator_log,
            # Jobs here last seconds to minutes: read progress often so the status keeps up.
            args=["--namespace", NAMESPACE, "--progress-seconds", "2", *operator_args],
            env={"FINETUNE_TRAINER_IMAGE": "finetune-trainer:local"},
        )
        self.operator_metrics_port = self.operator.metrics_port
        self._stack = contextlib.ExitStack()

    # --- life cycle -------------------------------------------------------------------------------------

    def start(self) -> LocalCluster:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.s3.start()
            self._stack.callback(self.s3.stop)
            if self.mlflow is not None:
                self._stack.enter_context(self.mlflow)
            plane = self.control_plane = self._stack.enter_context(
                ControlPlane(self.work_dir / "control-plane", node_names=(NODE_NAME,))
            )
            shutil.copyfile(plane.admin_kubeconfig, self.kubeconfig)
            self.kubeconfig.chmod(0o600)
            node_env = {"AWS_ENDPOINT_URL_S3": self.s3.endpoint_url, "AWS_REGION": REGION}
            self.kubelet = self._stack.enter_context(
                Kubelet(
                    plane.url,
                    plane.node_credentials(NODE_NAME),
                    self.work_dir / "kubelet",
                    self.cpu,
                    self.memory,
                    self.gpus,
                    node_name=NODE_NAME,
                    extra_env=node_env,
                    version=plane.version,
                )
            )
            self._prepare_namespace()
            self._install_chart()
            self._create_credentials_secret()
            if self.with_prometheus:
                self._start_prometheus()
            if self.with_operator:
                self.start_operator()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.stop_operator()
        self._stack.close()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _start_prometheus(self) -> None:
        assert self.kubelet is not None
        gateway = None
        if pushgateway_available():
            self.pushgateway = self._stack.enter_context(Pushgateway(self.work_dir / "pushgateway"))
            gateway = self.pushgateway.address
        self.prometheus = self._stack.enter_context(
            Prometheus(
                self.work_dir / "prometheus",
                static_targets=[f"127.0.0.1:{self.operator_metrics_port}"],
                file_sd_files=[self.kubelet.file_sd_path],
                pushgateway=gateway,
            )
        )

    @property
    def operator_identity(self) -> str:
        return OPERATOR_USER

    @property
    def url(self) -> str:
        """The API server's URL."""
        assert self.control_plane is not None, "start() first"
        return self.control_plane.url

    def _prepare_namespace(self) -> None:
        """The jobs' namespace enforces the restricted Pod Security Standard; pods can be created in it once the
        service-account controller has made its ``default`` ServiceAccount (admission refuses them before)."""
        self.kubectl("label", "namespace", NAMESPACE, "--overwrite",
                     "pod-security.kubernetes.io/enforce=restricted", "pod-security.kubernetes.io/warn=restricted")
        self.wait_for_object("serviceaccount", "default", NAMESPACE)

    def wait_for_object(self, kind: str, name: str, namespace: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.kubectl("get", kind, name, "-n", namespace, "--ignore-not-found", "-o", "name").strip() == "":
            if time.monotonic() > deadline:
                raise ClusterError(f"{kind} {namespace}/{name} did not appear in {timeout:.0f} s")
            time.sleep(0.2)

    def _install_chart(self) -> None:
        """The chart with Role-scoped RBAC for ``default`` only, and the operator's token kubeconfig."""
        assert self.control_plane is not None
        install_chart(self.control_plane, self.operator_kubeconfig,
                      ["rbac.scope=namespace", f"watchNamespaces={{{NAMESPACE}}}"], namespace=NAMESPACE)

    def _create_credentials_secret(self) -> None:
        data = {"AWS_ACCESS_KEY_ID": self.s3.access_key, "AWS_SECRET_ACCESS_KEY": self.s3.secret_key}
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": CREDENTIALS_SECRET, "namespace": NAMESPACE},
            "type": "Opaque",
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }
        self.kubectl("apply", "-f", "-", input=json.dumps(secret))

    # --- the operator -------------------------------------------------------------------------------------

    def start_operator(self) -> None:
        """Start the real operator as a subprocess watching the default namespace (nothing if it runs)."""
        try:
            self.operator.start()
        except OperatorError as exc:
            raise ClusterError(str(exc)) from exc

    def stop_operator(self, *, kill: bool = False) -> None:
        """Stop the operator (SIGTERM, or SIGKILL with ``kill=True`` to simulate a crash)."""
        self.operator.stop(kill=kill)

    def operator_log_tail(self, lines: int = 60) -> str:
        return self.operator.log_tail(lines)

    # --- helpers for people and tests ----------------------------------------------------------------------

    def kubectl(self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> str:
        """Run kubectl (the control plane's release) as the cluster admin; returns stdout (raises with stderr on
        failure)."""
        assert self.control_plane is not None, "start() first"
        command = [
            str(self.control_plane.kubectl_path),
            "--kubeconfig",
            str(self.kubeconfig),
            "--cache-dir",
            str(self.work_dir / "kubectl-cache"),
            *args,
        ]
        result = subprocess.run(command, input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout if result.returncode == 0 else result.stdout + result.stderr

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def get_job(self, name: str, namespace: str = NAMESPACE) -> dict[str, Any]:
        result: dict[str, Any] = self.get_json("finetunejob", name, "-n", namespace)
        return result

    def pods(self, job: str, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.get_json("pods", "-n", namespace, "-l", f"finetune.dev/job-name={job}")[
            "items"
        ]
        return items

    def wait_for_job(
        self,
        name: str,
        *,
        phases: Iterable[str] = TERMINAL_PHASES,
        timeout: float = 600,
        namespace: str = NAMESPACE,
        poll: float = 1.0,
    ) -> dict[str, Any]:
        """Wait until the job's phase is one of ``phases``; a terminal phase that was not asked for raises."""
        wanted = set(phases)
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.get_job(name, namespace)
            phase = job.get("status", {}).get("phase")
            if phase in wanted:
                return job
            if phase in TERMINAL_PHASES:
                raise ClusterError(f"job {name} ended {phase}: {json.dumps(job.get('status'), indent=1)}")
            time.sleep(poll)
        raise ClusterError(
            f"job {name} did not reach {sorted(wanted)} in {timeout:.0f} s; status: "
            f"{json.dumps(job.get('status'), indent=1)}\noperator log:\n{self.operator_log_tail(30)}"
        )

    def pod_log(self, name: str, namespace: str = NAMESPACE) -> str:
        return self.kubectl("logs", name, "-n", namespace, check=False)

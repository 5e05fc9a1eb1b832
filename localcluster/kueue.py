"""Kueue on the local control plane: its CRDs and its manager (``kueue``) as a local process on loopback.

Both come from the ``sigs.k8s.io/kueue`` Go module: ``scripts/build-kueue`` builds the manager from it once into
``.cache/kueue/<version>-<key>/`` and copies the CRDs the module ships beside the binary.

How the manager runs here, compared with Kueue's own Deployment:
- leader election off (one replica), health and metrics on free loopback ports, the visibility API server off;
- the webhook server serves a certificate for 127.0.0.1 issued here (``pki.py``), but no webhook configuration
  points at it: FineTuneJobs reach Kueue through Workload objects the operator creates, which need no webhook (the
  objects are written in full, as Kueue's defaulting webhook would leave them);
- the metrics server reads its certificate from the fixed path ``/etc/kueue/metrics/certs`` (a mounted Secret in
  a cluster): the manager runs under ``unshare --mount`` with a certificate folder bind-mounted there, as the
  process kubelet mounts a pod's volumes, so nothing is written to the host's /etc but the empty mount point;
- it talks to the API server as a ``system:masters`` client certificate (the chart's ClusterRole in a cluster).

    with ControlPlane(work) as plane, Kueue(plane, work / "kueue"):
        plane.kubectl("get", "clusterqueues")
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

import yaml

from localcluster.controlplane import ControlPlane, ControlPlaneError, _http_ok
from localcluster.kubelet_sandbox import check_unshare
from localcluster.pki import CertificateAuthority
from localcluster.processes import log_tail, stop_process_group
from localcluster.seaweedfs import free_ports

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "scripts" / "build-kueue"
NAMESPACE = "kueue-system"
METRICS_CERTS = Path("/etc/kueue/metrics/certs")
START_TIMEOUT_S = 90.0
CRDS = ("workloads", "clusterqueues", "localqueues", "resourceflavors", "workloadpriorityclasses")


def kueue_build() -> Path:
    """The folder with the ``kueue`` binary and ``crds/``, built now if this checkout never built them."""
    result = subprocess.run([str(BUILD_SCRIPT)], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise ControlPlaneError(f"{BUILD_SCRIPT} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return REPO / result.stdout.strip().splitlines()[-1]


class Kueue:
    """Kueue's CRDs installed on ``plane`` and its manager running against it, stopped together."""

    def __init__(self, plane: ControlPlane, work_dir: Path) -> None:
        self.plane = plane
        self.work_dir = Path(work_dir).resolve()
        self.build = kueue_build()
        self.webhook_port, self.metrics_port, self.health_port = free_ports(3)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def version(self) -> str:
        """The Kueue release the binary was built from (its folder is named after it)."""
        return self.build.name.split("-")[0]

    def start(self) -> Kueue:
        problem = check_unshare()
        if problem is not None:
            raise ControlPlaneError(f"Kueue's manager runs under `unshare --mount` here: {problem}")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.install_crds()
        try:
            self._start_manager()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process, 15, signal.SIGTERM)
            self.process = None

    def __enter__(self) -> Kueue:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.work_dir / "kueue.log", lines)

    def install_crds(self) -> None:
        """Kueue's CRDs, server-side (they are too large for the last-applied annotation), and its namespace."""
        self.plane.kubectl("apply", "--server-side", "-f", str(self.build / "crds"))
        self.plane.wait_for_crds(*(f"{crd}.kueue.x-k8s.io" for crd in CRDS), timeout=START_TIMEOUT_S)
        namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
        self.plane.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump(namespace))

    def _write_config(self) -> Path:
        certs = self.work_dir / "certs"
        CertificateAuthority(certs).issue("tls", "kueue-webhook", client=False, server_names=("127.0.0.1",))
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": NAMESPACE,
            "leaderElection": {"leaderElect": False},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health_port}"},
            "metrics": {"bindAddress": f"127.0.0.1:{self.metrics_port}"},
            "webhook": {"host": "127.0.0.1", "port": self.webhook_port, "certDir": str(certs)},
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": ["batch/job"]},
            "featureGates": {"VisibilityOnDemand": False},
        }
        path = self.work_dir / "kueue-config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def _start_manager(self) -> None:
        config = self._write_config()
        kubeconfig = self.plane.client_kubeconfig(self.work_dir / "kueue.kubeconfig", "kueue-manager",
                                                  groups=("system:masters",))
        METRICS_CERTS.mkdir(parents=True, exist_ok=True)
        script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
        command = ["unshare", "--mount", "--fork", "--", "/bin/sh", "-c", script, "sh",
                   str(self.work_dir / "certs"), str(METRICS_CERTS), str(self.build / "kueue"), f"--config={config}"]
        log = (self.work_dir / "kueue.log").open("ab")
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.work_dir,
            env={**os.environ, "KUBECONFIG": str(kubeconfig)}, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ControlPlaneError(f"kueue exited at start ({self.process.returncode}):\n{self.log_tail()}")
            if _http_ok(f"http://127.0.0.1:{self.health_port}/readyz"):
                return
            time.sleep(0.2)
        raise ControlPlaneError(f"kueue was not ready in {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

"""The real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

The binaries are built from their Go modules (``localcluster/components``) by ``scripts/build-controlplane``, once,
into ``.cache/controlplane/<versions>/``. Every start generates a fresh CA, certificates and service-account
signing key (``pki.py``) and a fresh etcd, so nothing leaks from one cluster into the next.

The API server is configured like a production cluster's:
- authentication by client certificates (each component is a user named by its certificate) and service-account
  tokens; authorization ``Node,RBAC``;
- admission: the default plugins (``ServiceAccount``, ``Priority``, ``LimitRanger``, ``ResourceQuota``,
  ``PodSecurity``, ...) plus ``NodeRestriction`` and ``OwnerReferencesPermissionEnforcement``;
- API Priority and Fairness on, as by default.
Two settings differ from a cloud cluster because everything here lives on 127.0.0.0/8, which the API refuses in
Endpoints and EndpointSlices: the API server does not publish its own endpoints (``--endpoint-reconciler-type=none``)
and the controller manager runs without the endpoint controllers. The kubelet resolves headless Services itself
(``kubelet_sandbox.py``), so nothing here needs them.

    with ControlPlane(work_dir) as plane:
        plane.kubectl("get", "--raw", "/readyz")
"""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from localcluster.kubelet_server import NodeCredentials
from localcluster.pki import CertificateAuthority, KeyPair, write_kubeconfig, write_signing_key
from localcluster.processes import log_tail, stop_process_group
from localcluster.seaweedfs import free_ports

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "scripts" / "build-controlplane"
START_TIMEOUT_S = 90.0
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# The admission plugins a production cluster adds to the defaults (kubeadm turns on NodeRestriction; OpenShift
# OwnerReferencesPermissionEnforcement); the rest named here are on by default and listed so the intent is explicit.
ADMISSION_PLUGINS = (
    "NodeRestriction",
    "OwnerReferencesPermissionEnforcement",
    "PodSecurity",
    "Priority",
    "ServiceAccount",
    "ResourceQuota",
    "LimitRanger",
)
# Endpoints and EndpointSlices may not hold loopback addresses, and every pod here has one.
CONTROLLERS = "*,-endpoints-controller,-endpointslice-controller,-endpointslice-mirroring-controller"


class ControlPlaneError(RuntimeError):
    """A component could not be built or did not start; the message carries the end of its log."""


def control_plane_binaries() -> Path:
    """The folder holding kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and etcd, built now
    if this checkout has never built them (tens of minutes on 2 cores, then cached)."""
    result = subprocess.run([str(BUILD_SCRIPT)], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise ControlPlaneError(f"{BUILD_SCRIPT} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return REPO / result.stdout.strip().splitlines()[-1]


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler, started together and stopped together."""

    def __init__(
        self,
        work_dir: Path,
        *,
        node_names: tuple[str, ...] = ("localnode",),
        scheduler: bool = True,
        watch_cache: bool = True,
    ) -> None:
        """``scheduler=False`` leaves pods unscheduled for tests that bind them (or not) themselves.
        ``watch_cache=False`` serves every watch from etcd, so a watch resumed from a revision that ``compact_etcd``
        removed ends with 410 Gone at once (the watch cache would answer it from its own history)."""
        self.work_dir = Path(work_dir).resolve()
        self.node_names = node_names
        self.with_scheduler = scheduler
        self.watch_cache = watch_cache
        self.bin = control_plane_binaries()
        self.pki_dir = self.work_dir / "pki"
        self.etcd_client_port, self.etcd_peer_port, self.port = free_ports(3)
        self.url = f"https://127.0.0.1:{self.port}"
        self.admin_kubeconfig = self.work_dir / "admin.kubeconfig"
        self._processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._ca: CertificateAuthority | None = None
        self.node_clients: dict[str, KeyPair] = {}
        self.node_serving: dict[str, KeyPair] = {}
        # The admin's TLS (CA + client certificate), for tests that call the API directly.
        self.admin_tls: ssl.SSLContext | None = None

    # --- life cycle -------------------------------------------------------------------------------------

    @property
    def ca(self) -> Path:
        return self.pki_dir / "ca.crt"

    @property
    def version(self) -> str:
        """The Kubernetes release the binaries were built from (their folder is named after it)."""
        return self.bin.name.split("-")[1]

    @property
    def kubectl_path(self) -> Path:
        return self.bin / "kubectl"

    def start(self) -> ControlPlane:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._write_pki()
            self._start_etcd()
            self._start_apiserver()
            self._start("kube-controller-manager", self._controller_manager_args())
            if self.with_scheduler:
                self._start("kube-scheduler", self._scheduler_args())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every component, newest first (the API server before etcd)."""
        while self._processes:
            _, process = self._processes.pop()
            stop_process_group(process, 15, signal.SIGTERM)

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self, component: str, lines: int = 40) -> str:
        return log_tail(self.work_dir / f"{component}.log", lines)

    # --- identities ---------------------------------------------------------------------------------------

    def client_kubeconfig(self, path: Path, user: str, groups: tuple[str, ...] = (), namespace: str = "default"
                          ) -> Path:
        """A kubeconfig that authenticates as ``user`` in ``groups`` with a client certificate from the CA."""
        assert self._ca is not None, "start() first"
        pair = self._ca.issue(path.stem, user, organizations=groups)
        return write_kubeconfig(path, self.url, self.ca, client=pair, namespace=namespace, user=user)

    def node_credentials(self, node: str) -> NodeCredentials:
        """What the kubelet of ``node`` needs: the CA, its client and its serving certificate."""
        client, serving = self.node_clients[node], self.node_serving[node]
        return NodeCredentials(self.ca, client.cert, client.key, serving.cert, serving.key)

    def token_kubeconfig(self, path: Path, token: str, namespace: str = "default") -> Path:
        """A kubeconfig that authenticates with a bearer token (a service account's, from TokenRequest)."""
        return write_kubeconfig(path, self.url, self.ca, token=token, namespace=namespace, user=path.stem)

    # --- the components -----------------------------------------------------------------------------------

    def _write_pki(self) -> None:
        ca = self._ca = CertificateAuthority(self.pki_dir)
        self._signing = write_signing_key(self.pki_dir)
        self._serving = ca.issue(
            "apiserver", "kube-apiserver", client=False,
            server_names=("127.0.0.1", "localhost", "10.96.0.1", "kubernetes", "kubernetes.default",
                          "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"),
        )
        # The API server's identity towards kubelets (logs, exec); the kubelet checks it against the CA.
        self._kubelet_client = ca.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client",
                                        organizations=("system:masters",))
        admin = ca.issue("admin", "kubernetes-admin", organizations=("system:masters",))
        write_kubeconfig(self.admin_kubeconfig, self.url, self.ca, client=admin, user="admin")
        for component in ("kube-controller-manager", "kube-scheduler"):
            pair = ca.issue(component, f"system:{component}")
            write_kubeconfig(self.work_dir / f"{component}.kubeconfig", self.url, self.ca, client=pair,
                             user=component)
        for node in self.node_names:
            # The Node authorizer and NodeRestriction know a kubelet by this name and group.
            self.node_clients[node] = ca.issue(f"kubelet-{node}-client", f"system:node:{node}",
                                               organizations=("system:nodes",))
            self.node_serving[node] = ca.issue(f"kubelet-{node}-serving", f"system:node:{node}", client=False,
                                               server_names=("127.0.0.1", node))

    def _start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.work_dir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [str(self.bin / name), *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.work_dir, start_new_session=True,
        )
        log.close()
        self._processes.append((name, process))
        return process

    def _start_etcd(self) -> None:
        client = f"http://127.0.0.1:{self.etcd_client_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        process = self._start("etcd", [
            "--name", "local",
            "--data-dir", str(self.work_dir / "etcd"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"local={peer}",
            # A throw-away cluster on a shared disk: losing the last writes on a machine crash loses nothing.
            "--unsafe-no-fsync",
            "--log-level", "warn",
        ])
        self._wait("etcd", process, lambda: _http_ok(f"{client}/health"))

    def _start_apiserver(self) -> None:
        pki = self.pki_dir
        process = self._start("kube-apiserver", [
            f"--etcd-servers=http://127.0.0.1:{self.etcd_client_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--tls-cert-file={self._serving.cert}",
            f"--tls-private-key-file={self._serving.key}",
            f"--client-ca-file={self.ca}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={self._signing.cert}",
            f"--service-account-signing-key-file={self._signing.key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            f"--enable-admission-plugins={','.join(ADMISSION_PLUGINS)}",
            "--endpoint-reconciler-type=none",
            f"--kubelet-client-certificate={self._kubelet_client.cert}",
            f"--kubelet-client-key={self._kubelet_client.key}",
            f"--kubelet-certificate-authority={self.ca}",
            "--kubelet-preferred-address-types=InternalIP",
            "--allow-privileged=false",
            "--profiling=false",
            f"--cert-dir={pki}",
            f"--watch-cache={str(self.watch_cache).lower()}",
            "--v=1",
        ])
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self._wait("kube-apiserver", process, lambda: _http_ok(f"{self.url}/readyz", context))
        self.admin_tls = context

    def _component_args(self, name: str) -> list[str]:
        kubeconfig = str(self.work_dir / f"{name}.kubeconfig")
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        ]

    def _controller_manager_args(self) -> list[str]:
        return [
            *self._component_args("kube-controller-manager"),
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={self._signing.key}",
            f"--root-ca-file={self.ca}",
            f"--cluster-signing-cert-file={self.ca}",
            f"--cluster-signing-key-file={self.pki_dir / 'ca.key'}",
            f"--controllers={CONTROLLERS}",
        ]

    def _scheduler_args(self) -> list[str]:
        return self._component_args("kube-scheduler")

    def _wait(self, name: str, process: subprocess.Popen[bytes], ready: object) -> None:
        assert callable(ready)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ControlPlaneError(f"{name} exited at start ({process.returncode}):\n{self.log_tail(name)}")
            if ready():
                return
            time.sleep(0.2)
        raise ControlPlaneError(f"{name} was not ready in {START_TIMEOUT_S:.0f} s:\n{self.log_tail(name)}")

    def compact_etcd(self) -> int:
        """Compact etcd's history up to its current revision (returned): every watch resumed from an older
        resourceVersion is then told 410 Gone, as after a long disconnection in a busy cluster."""
        etcd = f"http://127.0.0.1:{self.etcd_client_port}/v3/kv"
        # Any read returns the store's current revision in its header.
        answer = _post_json(f"{etcd}/range", {"key": base64.b64encode(b"/").decode(), "limit": 1})
        revision = int(answer["header"]["revision"])
        _post_json(f"{etcd}/compaction", {"revision": revision, "physical": True})
        return revision

    def wait_for_crds(self, *names: str, timeout: float = 60.0) -> None:
        """Wait until each CRD (``plural.group``) is Established. ``kubectl wait --for=condition=Established`` fails
        outright on a CRD whose status the API server has not written yet, so this polls instead."""
        deadline = time.monotonic() + timeout
        for name in names:
            while not self._established(name):
                if time.monotonic() > deadline:
                    raise ControlPlaneError(f"CRD {name} was not established in {timeout:.0f} s")
                time.sleep(0.2)

    def _established(self, name: str) -> bool:
        found = json.loads(self.kubectl("get", f"crd/{name}", "-o", "json"))
        conditions = (found.get("status") or {}).get("conditions") or []
        return any(item.get("type") == "Established" and item.get("status") == "True" for item in conditions)

    def kubectl(self, *args: str, input: str | None = None, kubeconfig: Path | None = None) -> str:
        """Run kubectl as the cluster's admin (or the given kubeconfig's identity); stdout, raises on failure."""
        result = subprocess.run(
            [str(self.kubectl_path), "--kubeconfig", str(kubeconfig or self.admin_kubeconfig), *args],
            input=input, capture_output=True, text=True, timeout=60,
        )
        if result.returncode != 0:
            raise ControlPlaneError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout


def _post_json(url: str, body: object) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    with contextlib.suppress(OSError, urllib.error.URLError):
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return bool(response.status == 200)
    return False


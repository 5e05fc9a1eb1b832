"""A process kubelet: the node agent of the local control plane, running its pods as isolated local processes.

It is one Node of the real API server, identified by a client certificate as ``system:node:<name>`` (so the Node
authorizer and NodeRestriction bound what it may read and write), and it
  - registers its Node (cpu, memory, nvidia.com/gpu, pods), renews its Lease in ``kube-node-lease`` every 10 s and
    keeps its Ready condition fresh, so the node-lifecycle controller never taints or evicts it;
  - runs only the pods the real scheduler bound to it (a watch narrowed by ``spec.nodeName``), each with its own
    loopback address (127.0.0.2, ...), so headless-Service peers resolve it through their hosts files
    (kubelet_sandbox.py explains the isolation);
  - materialises configMap, secret, downwardAPI, projected (service-account tokens from the TokenRequest API
    included), emptyDir, hostPath and PVC volumes into the pod folder, resolves env (value, secretKeyRef,
    configMapKeyRef, fieldRef, resourceFieldRef, envFrom) with `$(VAR)` expansion, and runs `command` + `args`
    with PATH starting with this interpreter's bin dir (the image is ignored);
  - reports phase, conditions, containerStatuses (exit codes, termination messages, restarts) through the status
    subresource, and emits the kubelet's usual events;
  - serves ``/containerLogs`` over HTTPS to the API server (client certificates from the cluster CA only), so
    ``kubectl logs`` and ``kubectl logs -f`` work as on a real node;
  - on deletion sends SIGTERM to the process group, SIGKILL after the grace period, then DELETEs the pod with
    gracePeriodSeconds=0;
  - keeps a Prometheus file_sd file of pods annotated prometheus.io/scrape.
Not emulated: resource limits (no cgroups), probes (a running container is ready), image pulls, the user a
container runs as, more than one regular container per pod, sidecar init containers, a network namespace (pods
share the host's ports).

    with Kubelet(plane.url, NodeCredentials(...), tmp_path / "kubelet", cpu="8", memory="32Gi", gpus=2):
        ...  # pods the scheduler binds to "localnode" now run
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from localcluster.kubelet_api import APIStatusError, KubeAPI, inform
from localcluster.kubelet_pods import (
    GPU_RESOURCE,
    NODE_NAME,
    ContainerConfigError,
    PodContext,
    Resources,
    condition,
    exit_code_of,
    expand,
    file_sd_targets,
    format_quantity,
    headless_records,
    hosts_file,
    now_iso,
    parse_quantity,
    pod_hostname,
    pod_requests,
    qos_class,
    referenced_objects,
    resolve_env,
    safe_relative,
    termination_message,
    token_requests,
    volume_files,
)
from localcluster.kubelet_sandbox import BindMount, check_unshare, create_mount_point, sandbox_command
from localcluster.kubelet_server import KubeletServer, NodeCredentials

logger = logging.getLogger(__name__)

TERMINAL_PHASES = ("Succeeded", "Failed")
FAILED_SCHEDULING_INTERVAL_S = 5.0
CONFIG_RETRY_S = 1.0
# The real kubelet backs off 10 s doubling to 5 min; shorter here so local restarts stay quick.
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
DEFAULT_GRACE_S = 30
LEASE_DURATION_S = 40
LEASE_RENEW_S = 10.0
NODE_STATUS_S = 60.0
NODE_LEASE_NAMESPACE = "kube-node-lease"
MEMORY_VOLUMES = Path("/dev/shm/localkubelet")
# Names the kubelet's own environment must not hand to pods: the pod spec alone decides credentials, cluster
# access and distributed-training variables, as on a real node.
ENV_DENYLIST_PREFIXES = ("AWS_", "KUBERNETES_", "PET_", "PYTEST_", "TORCHELASTIC_")
ENV_DENYLIST = frozenset({
    "KUBECONFIG", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
    "GROUP_RANK", "NODE_RANK", "CUDA_VISIBLE_DEVICES", "VIRTUAL_ENV", "PYTHONHOME",
})


@dataclass
class ContainerRun:
    """What the kubelet knows about one container of a pod: its current and previous state."""

    name: str
    state: dict[str, Any] = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict[str, Any] = field(default_factory=dict)
    restart_count: int = 0
    image: str = ""
    log_path: Path | None = None
    running: bool = False
    started: bool = False


@dataclass
class PodRecord:
    """A pod bound to this node, from binding until the API server has forgotten it."""

    pod: dict[str, Any]
    ip: str
    directory: Path
    requests: Resources
    gpu_ids: list[int] = field(default_factory=list)
    phase: str = "Pending"
    reason: str | None = None
    message: str | None = None
    start_time: str | None = None
    containers: dict[str, ContainerRun] = field(default_factory=dict)
    init_containers: dict[str, ContainerRun] = field(default_factory=dict)
    initialized: bool = False
    process: asyncio.subprocess.Process | None = None
    task: asyncio.Task[None] | None = None
    hosts_text: str = ""
    # Termination requests: "delete" (graceful deletion), "evict", "deadline", "gone" (removed from the API).
    terminate: asyncio.Event = field(default_factory=asyncio.Event)
    termination: str | None = None
    grace: float = DEFAULT_GRACE_S
    evict_message: str = ""
    deletion_done: bool = False
    status_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    conditions: list[dict[str, Any]] = field(default_factory=list)
    bound_wall_time: float = field(default_factory=time.time)
    process_started_at: float | None = None

    @property
    def uid(self) -> str:
        return str(self.pod["metadata"]["uid"])

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"].get("namespace", "default"))

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES

    def path(self, suffix: str = "") -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods/{self.name}{suffix}"


class Kubelet:
    """The node `localnode`: scheduler + kubelet for every pod of one API server."""

    def __init__(
        self,
        api_url: str,
        credentials: NodeCredentials,
        work_dir: Path,
        cpu: str = "2",
        memory: str = "24Gi",
        gpus: int = 0,
        *,
        node_name: str = NODE_NAME,
        labels: Mapping[str, str] | None = None,
        taints: Sequence[Mapping[str, Any]] = (),
        extra_env: Mapping[str, str] | None = None,
        version: str = "v0.0.0",
    ) -> None:
        """`credentials`: the node's client certificate (to the API server) and serving certificate (to it)."""
        self.api_url = api_url.rstrip("/")
        self.credentials = credentials
        self.version = version
        self.work_dir = Path(work_dir).resolve()
        self.node_name = node_name
        self.capacity: Resources = {
            "cpu": parse_quantity(cpu),
            "memory": parse_quantity(memory),
            GPU_RESOURCE: Decimal(gpus),
            "pods": Decimal(250),
        }
        self.gpus = gpus
        self.labels = {
            "kubernetes.io/hostname": node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "node.kubernetes.io/instance-type": "local",
            **(labels or {}),
        }
        self.taints = [dict(taint) for taint in taints]
        self.extra_env = dict(extra_env or {})
        self.file_sd_path = self.work_dir / "prometheus" / "pods.json"
        self.venv_bin = str(Path(sys.executable).parent)
        self._node_conditions: list[dict[str, Any]] = []
        self._node_uid = ""
        self._api = KubeAPI(self.api_url, credentials.client_context())
        self._log_server = KubeletServer(self.log_provider, credentials.server_context())
        self._records: dict[str, PodRecord] = {}
        self._pods: dict[str, dict[str, Any]] = {}  # every pod in the cluster by uid, from the watch
        self._services: dict[tuple[str, str], dict[str, Any]] = {}
        self._ips_in_use: set[str] = set()
        self._gpus_in_use: set[int] = set()
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._created_paths: list[Path] = []
        self._sandbox_error: str | None = None
        self._file_sd_text = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.bind_to_start_seconds: list[float] = []

    # ---- life cycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Register the node, start watching, and return once pods and services are listed."""
        self._loop = asyncio.get_running_loop()
        (self.work_dir / "pods").mkdir(parents=True, exist_ok=True)
        self.file_sd_path.parent.mkdir(parents=True, exist_ok=True)
        self._write_file_sd()
        self._sandbox_error = await asyncio.to_thread(check_unshare)
        if self._sandbox_error:
            logger.error("%s", self._sandbox_error)
        await self._api.open()
        await self._log_server.start()
        await self._register_node()
        pods_synced, services_synced = asyncio.Event(), asyncio.Event()
        self._tasks = [
            asyncio.create_task(inform(self._api, "/api/v1/services", self._on_service, services_synced)),
            # Like the real kubelet: only the pods bound to this node, never the whole cluster's.
            asyncio.create_task(inform(self._api, "/api/v1/pods", self._on_pod, pods_synced,
                                       {"fieldSelector": f"spec.nodeName={self.node_name}"})),
            asyncio.create_task(self._lease_loop()),
            asyncio.create_task(self._node_status_loop()),
        ]
        await asyncio.wait_for(asyncio.gather(pods_synced.wait(), services_synced.wait()), timeout=30)

    async def stop(self) -> None:
        """Kill every process this kubelet started (SIGTERM, then SIGKILL after 5 s) and wait for them."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Pod tasks go first so that none restarts a container while the processes are being killed.
        tasks = [record.task for record in self._records.values() if record.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        running = [record for record in self._records.values() if record.process is not None]
        await asyncio.gather(*(self._kill_process(record, 5.0) for record in running), return_exceptions=True)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._log_server.stop()
        await self._api.close()
        # TLS connections finish closing on the loop's next turns (aiohttp's documented grace for SSL).
        await asyncio.sleep(0.25)
        for record in self._records.values():
            # Memory-backed emptyDirs would otherwise hold RAM after the kubelet is gone.
            shutil.rmtree(MEMORY_VOLUMES / record.uid, ignore_errors=True)
        with contextlib.suppress(OSError):
            MEMORY_VOLUMES.rmdir()
        self._remove_created_paths()

    def __enter__(self) -> Kubelet:
        """Run the kubelet on its own thread and event loop (for synchronous tests and the demo)."""
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="kubelet", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(timeout=60)
        except BaseException:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout=60)
            self._shutdown_thread(loop)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout=120)
        finally:
            self._shutdown_thread(loop)

    def _shutdown_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=30)
        loop.close()

    # ---- fault injection and introspection (thread-safe) --------------------------------------------

    def kill_container(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the container's process group, as a crash or the OOM killer would; the pod reports the exit."""
        record = self._find(namespace, name)
        if record is None or record.process is None:
            raise LookupError(f"no running container for pod {namespace}/{name}")
        _signal_group(record.process.pid, sig)

    def evict(self, namespace: str, name: str, message: str = "The node was low on resource: memory. ") -> None:
        """Evict like the kubelet under node pressure: SIGTERM, grace, SIGKILL, then phase Failed/Evicted."""
        record = self._find(namespace, name)
        if record is None or record.terminal:
            raise LookupError(f"no active pod {namespace}/{name} on {self.node_name}")
        assert self._loop is not None
        grace = float((record.pod.get("spec") or {}).get("terminationGracePeriodSeconds", DEFAULT_GRACE_S))
        self._loop.call_soon_threadsafe(self._request_termination, record, "evict", grace, message)

    def pod_ip(self, namespace: str, name: str) -> str | None:
        record = self._find(namespace, name)
        return record.ip if record else None

    def log_path(self, namespace: str, name: str, container: str | None = None) -> Path | None:
        record = self._find(namespace, name)
        if record is None:
            return None
        runs = {**record.init_containers, **record.containers}
        run = runs.get(container) if container else next(iter(record.containers.values()), None)
        return run.log_path if run else None

    def _find(self, namespace: str, name: str) -> PodRecord | None:
        # list() copies in one step: the API server's thread calls this while the kubelet's loop mutates.
        matches = [r for r in list(self._records.values()) if r.namespace == namespace and r.name == name]
        return matches[-1] if matches else None

    # ---- kubectl logs --------------------------------------------------------------------------------

    def log_provider(
        self, namespace: str, name: str, container: str, follow: bool, tail_lines: int | None
    ) -> bytes | AsyncIterator[bytes] | None:
        """For the kubelet's HTTPS server: reads the log files only."""
        record = self._find(namespace, name)
        if record is None:
            return None
        run = record.containers.get(container) or record.init_containers.get(container)
        if run is None:
            return None
        if run.log_path is None or not run.log_path.exists():
            return b""  # known but not started yet: an empty log, as from a real kubelet
        path = run.log_path
        if not follow:
            return _tail(path.read_bytes(), tail_lines)
        return _follow(path, tail_lines, lambda: run.running or not run.started)

    # ---- node ----------------------------------------------------------------------------------------

    def _node_status(self) -> dict[str, Any]:
        now = now_iso()
        quantities = {
            "cpu": format_quantity("cpu", self.capacity["cpu"]),
            "memory": f"{int(self.capacity['memory'] / 1024)}Ki",
            GPU_RESOURCE: str(self.gpus),
            "pods": "250",
            "ephemeral-storage": f"{shutil.disk_usage(self.work_dir).total // 1024}Ki",
        }
        previous = {c["type"]: c for c in self._node_conditions}
        conditions = []
        for kind, status, reason, message in (
            ("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
        ):
            same = previous.get(kind, {}).get("status") == status
            transition = previous[kind]["lastTransitionTime"] if same else now
            conditions.append({"type": kind, "status": status, "reason": reason, "message": message,
                               "lastHeartbeatTime": now, "lastTransitionTime": transition})
        self._node_conditions = conditions
        return {
            "capacity": quantities,
            "allocatable": quantities,
            "conditions": conditions,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": self.node_name}],
            "nodeInfo": {
                "architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": self.version,
                "containerRuntimeVersion": "local-process://1", "kernelVersion": os.uname().release,
                "osImage": "local processes", "kubeProxyVersion": "", "machineID": "", "systemUUID": "",
                "bootID": "",
            },
            # Where the API server reaches this kubelet for logs.
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self._log_server.port}},
        }

    async def _register_node(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node_name, "labels": self.labels},
            "spec": {"taints": self.taints} if self.taints else {},
        }
        path = f"/api/v1/nodes/{self.node_name}"
        try:
            created = await self._api.create("/api/v1/nodes", node)
        except APIStatusError as error:
            if error.status != 409:
                raise
            # Registered before (a restarted kubelet): NodeRestriction lets a node change its labels, not taints.
            created = await self._api.merge_patch(path, {"metadata": {"labels": self.labels}}) or {}
        self._node_uid = str(created.get("metadata", {}).get("uid", ""))
        await self._api.merge_patch(path + "/status", {"status": self._node_status()})
        await self._renew_lease()

    async def _renew_lease(self) -> None:
        """Create or renew the node's Lease: the heartbeat the node-lifecycle controller reads."""
        path = f"/apis/coordination.k8s.io/v1/namespaces/{NODE_LEASE_NAMESPACE}/leases"
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": LEASE_DURATION_S, "renewTime": now}
        if await self._api.merge_patch(f"{path}/{self.node_name}", {"spec": spec}) is not None:
            return
        owner = {"apiVersion": "v1", "kind": "Node", "name": self.node_name, "uid": self._node_uid}
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": self.node_name, "namespace": NODE_LEASE_NAMESPACE, "ownerReferences": [owner]},
                 "spec": spec}
        with contextlib.suppress(APIStatusError):  # a 409 means another renewal won the race, which is as good
            await self._api.create(path, lease)

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(LEASE_RENEW_S)
            try:
                await self._renew_lease()
            except Exception as error:  # the next renewal tries again, well inside the lease's duration
                logger.warning("node lease not renewed: %r", error)

    async def _node_status_loop(self) -> None:
        while True:
            await asyncio.sleep(NODE_STATUS_S)
            try:
                await self._api.merge_patch(f"/api/v1/nodes/{self.node_name}/status",
                                            {"status": self._node_status()})
            except Exception as error:  # the next report tries again
                logger.warning("node status not reported: %r", error)

    # ---- watches -------------------------------------------------------------------------------------

    async def _on_service(self, kind: str, obj: dict[str, Any]) -> None:
        namespaces: set[str] = set()
        if kind == "SYNC":
            old = set(self._services)
            self._services = {
                (item["metadata"].get("namespace", "default"), item["metadata"]["name"]): item
                for item in obj.get("items") or []
            }
            namespaces = {key[0] for key in old | set(self._services)}
        else:
            key = (obj["metadata"].get("namespace", "default"), obj["metadata"]["name"])
            if kind == "DELETED":
                self._services.pop(key, None)
            else:
                self._services[key] = obj
            namespaces = {key[0]}
        for namespace in namespaces:
            self._refresh_hosts(namespace)

    async def _on_pod(self, kind: str, obj: dict[str, Any]) -> None:
        if kind == "SYNC":
            items = obj.get("items") or []
            current = {item["metadata"]["uid"] for item in items}
            for uid in list(self._pods):
                if uid not in current:
                    gone = self._pods.pop(uid)
                    await self._on_pod("DELETED", gone)
            for item in items:
                await self._on_pod("MODIFIED", item)
            return
        uid = obj["metadata"]["uid"]
        if kind == "DELETED":
            self._pods.pop(uid, None)
            record = self._records.get(uid)
            if record is not None:
                record.deletion_done = True
                self._request_termination(record, "gone", 0)
                if record.task is None or record.task.done():
                    self._forget(record)
            return
        self._pods[uid] = obj
        spec = obj.get("spec") or {}
        record = self._records.get(uid)
        if record is not None:
            record.pod = {**obj, "status": record.pod.get("status")}
            if obj["metadata"].get("deletionTimestamp"):
                grace = obj["metadata"].get("deletionGracePeriodSeconds")
                if grace is None:
                    grace = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)
                self._request_termination(record, "delete", float(grace))
            return
        if spec.get("nodeName") == self.node_name:
            self._adopt(obj)

    def _adopt(self, pod: dict[str, Any]) -> None:
        """A pod bound to this node that this kubelet has no record of: newly bound by the scheduler, or bound
        before a restart of the kubelet."""
        phase = (pod.get("status") or {}).get("phase")
        deleting = bool(pod["metadata"].get("deletionTimestamp"))
        if phase in TERMINAL_PHASES:
            if deleting:
                self._spawn(self._finish_deletion_of(pod))
            return
        record = self._new_record(pod)
        if (pod.get("status") or {}).get("startTime"):
            # It ran under an earlier kubelet whose processes are gone: report it like a lost container.
            record.task = asyncio.create_task(self._lost(record))
            return
        record.task = asyncio.create_task(self._lifecycle(record))
        if deleting:
            self._request_termination(record, "delete", 0)

    async def _finish_deletion_of(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        path = f"/api/v1/namespaces/{meta.get('namespace', 'default')}/pods/{meta['name']}"
        with contextlib.suppress(APIStatusError):
            await self._api.delete(path, _delete_now(meta["uid"]))

    # ---- pod records ---------------------------------------------------------------------------------

    def _new_record(self, pod: dict[str, Any]) -> PodRecord:
        meta = pod["metadata"]
        directory = self.work_dir / "pods" / meta.get("namespace", "default") / f"{meta['name']}-{meta['uid'][:8]}"
        requests = pod_requests(pod)
        record = PodRecord(pod=pod, ip=self._allocate_ip((pod.get("status") or {}).get("podIP")),
                           directory=directory, requests=requests)
        gpus = int(requests.get(GPU_RESOURCE, 0))
        free_gpus = [index for index in range(self.gpus) if index not in self._gpus_in_use]
        record.gpu_ids = free_gpus[:gpus]
        self._gpus_in_use.update(record.gpu_ids)
        spec = pod.get("spec") or {}
        for container in spec.get("initContainers") or []:
            record.init_containers[container["name"]] = _container_run(container)
        for container in spec.get("containers") or []:
            record.containers[container["name"]] = _container_run(container)
        self._records[meta["uid"]] = record
        self._refresh_hosts(record.namespace)
        return record

    def _allocate_ip(self, wanted: str | None) -> str:
        if wanted and wanted not in self._ips_in_use and wanted.startswith("127.") and wanted != "127.0.0.1":
            self._ips_in_use.add(wanted)
            return wanted
        # 127.0.0.1 is the host's, 127.0.1.1 Debian's hostname address; every other 127/8 address is on lo.
        number = int(ipaddress.IPv4Address("127.0.0.2"))
        while True:
            candidate = str(ipaddress.IPv4Address(number))
            if candidate not in self._ips_in_use and candidate != "127.0.1.1" and not candidate.endswith(
                    (".0", ".255")):
                self._ips_in_use.add(candidate)
                return candidate
            number += 1

    def _forget(self, record: PodRecord) -> None:
        if self._records.get(record.uid) is not record:
            return
        del self._records[record.uid]
        self._ips_in_use.discard(record.ip)
        self._gpus_in_use.difference_update(record.gpu_ids)
        shutil.rmtree(record.directory / "volumes", ignore_errors=True)
        shutil.rmtree(MEMORY_VOLUMES / record.uid, ignore_errors=True)
        self._refresh_hosts(record.namespace)
        self._write_file_sd()

    def _request_termination(self, record: PodRecord, kind: str, grace: float, message: str = "") -> None:
        if record.termination is not None:
            # A later, shorter grace period wins, like a second `kubectl delete --grace-period`.
            record.grace = min(record.grace, grace)
            if kind == "gone":
                record.termination = "gone"
            record.terminate.set()
            return
        if record.terminal and kind in ("evict", "deadline"):
            return
        record.termination, record.grace, record.evict_message = kind, grace, message
        record.terminate.set()
        if record.terminal and (record.task is None or record.task.done()):
            record.task = asyncio.create_task(self._finish_terminal(record))

    # ---- one pod's life ------------------------------------------------------------------------------

    async def _lifecycle(self, record: PodRecord) -> None:
        try:
            await self._run_pod(record)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            logger.exception("pod %s/%s failed in the kubelet", record.namespace, record.name)
            record.phase, record.reason, record.message = "Failed", "KubeletError", f"local kubelet: {error}"
            with contextlib.suppress(Exception):
                await self._write_status(record)
        await self._after_run(record)

    async def _run_pod(self, record: PodRecord) -> None:
        spec = record.pod.get("spec") or {}
        record.start_time = now_iso()
        # Not awaited: the process starts meanwhile; status_lock is FIFO, so later writes still land after it.
        self._spawn(self._write_status(record))
        if self._sandbox_error or len(spec.get("containers") or []) != 1:
            reason = "SandboxCreationFailed" if self._sandbox_error else "UnsupportedPodSpec"
            message = self._sandbox_error or "the local kubelet runs exactly one regular container per pod"
            self._event(record.pod, "FailedCreatePodSandBox" if self._sandbox_error else "Failed", message,
                        "Warning")
            record.phase, record.reason, record.message = "Failed", reason, message
            for run in record.containers.values():
                run.state = {"waiting": {"reason": "CreateContainerError", "message": message}}
            await self._write_status(record)
            return
        deadline = spec.get("activeDeadlineSeconds")
        if deadline is not None:
            self._spawn(self._enforce_deadline(record, float(deadline)))
        context = await self._prepare(record)
        if context is None:
            return
        restart_policy = spec.get("restartPolicy") or "Always"
        for container in spec.get("initContainers") or []:
            run = record.init_containers[container["name"]]
            while True:
                code = await self._run_container(record, container, run, context)
                if code is None:
                    return
                if code == 0:
                    break
                if restart_policy == "Never":
                    record.phase = "Failed"
                    await self._write_status(record)
                    return
                if not await self._back_off(record, run):
                    return
        record.initialized = True
        container = spec["containers"][0]
        run = record.containers[container["name"]]
        while True:
            code = await self._run_container(record, container, run, context)
            if code is None:
                return
            if restart_policy == "Never" or (restart_policy == "OnFailure" and code == 0):
                record.phase = "Succeeded" if code == 0 else "Failed"
                await self._write_status(record)
                self._write_file_sd()
                return
            if not await self._back_off(record, run):
                return

    async def _prepare(self, record: PodRecord) -> PodContext | None:
        """Fetch what the pod refers to and materialise its volumes, retrying while something is missing."""
        context = PodContext(pod_ip=record.ip, node_allocatable=self.capacity)
        announced = ""
        while record.termination is None:
            try:
                configmaps, secrets = await self._fetch_references(record.pod)
                await self._request_tokens(record.pod, context)
                self._materialise_volumes(record, context, configmaps, secrets)
                for container in [*(record.pod["spec"].get("initContainers") or []),
                                  *record.pod["spec"]["containers"]]:
                    resolve_env(record.pod, container, context, configmaps, secrets)
                return context
            except ContainerConfigError as error:
                first = next(iter(record.containers.values()))
                if error.reason == "FailedMount":
                    first.state = {"waiting": {"reason": "ContainerCreating"}}
                else:
                    first.state = {"waiting": {"reason": error.reason, "message": error.message}}
                if error.message != announced:
                    announced = error.message
                    event_message = error.message if error.reason == "FailedMount" else f"Error: {error.message}"
                    self._event(record.pod, "FailedMount" if error.reason == "FailedMount" else "Failed",
                                event_message, "Warning")
                    await self._write_status(record)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(record.terminate.wait(), CONFIG_RETRY_S)
        return None

    async def _request_tokens(self, pod: dict[str, Any], context: PodContext) -> None:
        """Tokens for the pod's projected serviceAccountToken sources, from the TokenRequest API (the Node
        authorizer allows it only for a pod bound to this node and its own service account)."""
        meta = pod["metadata"]
        account = (pod.get("spec") or {}).get("serviceAccountName") or "default"
        path = f"/api/v1/namespaces/{meta.get('namespace', 'default')}/serviceaccounts/{account}/token"
        for volume, token_path, spec in token_requests(pod):
            body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
            try:
                answer = await self._api.create(path, body)
            except APIStatusError as error:
                raise ContainerConfigError(
                    "FailedMount", f'MountVolume.SetUp failed for volume "{volume}" : failed to fetch token: {error}'
                ) from error
            context.service_account_tokens[(volume, token_path)] = str(answer["status"]["token"])

    async def _fetch_references(
        self, pod: dict[str, Any]
    ) -> tuple[dict[str, dict[str, Any] | None], dict[str, dict[str, Any] | None]]:
        namespace = pod["metadata"].get("namespace", "default")
        configmap_names, secret_names = referenced_objects(pod)
        base = f"/api/v1/namespaces/{namespace}"
        names = [("configmaps", n) for n in sorted(configmap_names)] + [("secrets", n) for n in sorted(secret_names)]
        try:
            objects = await asyncio.gather(*(self._api.get(f"{base}/{kind}/{name}") for kind, name in names))
        except APIStatusError as error:
            # Typically 403 for a moment after binding, until the Node authorizer's graph has the pod: retried.
            raise ContainerConfigError("CreateContainerConfigError", str(error)) from error
        configmaps: dict[str, dict[str, Any] | None] = {}
        secrets: dict[str, dict[str, Any] | None] = {}
        for (kind, name), obj in zip(names, objects, strict=True):
            (configmaps if kind == "configmaps" else secrets)[name] = obj
        return configmaps, secrets

    def _materialise_volumes(
        self,
        record: PodRecord,
        context: PodContext,
        configmaps: Mapping[str, Mapping[str, Any] | None],
        secrets: Mapping[str, Mapping[str, Any] | None],
    ) -> None:
        volumes_dir = record.directory / "volumes"
        for volume in (record.pod.get("spec") or {}).get("volumes") or []:
            name = volume["name"]
            target = volumes_dir / name
            files = volume_files(volume, record.pod, context, configmaps, secrets)
            if files is not None:
                # Write into a fresh folder and swap it in, so a retry never leaves a half-written volume.
                staging = volumes_dir / f".{name}.{uuid.uuid4().hex[:8]}"
                staging.mkdir(parents=True)
                for relative, (content, mode) in files.items():
                    if not safe_relative(relative):
                        raise ContainerConfigError("FailedMount", f'invalid path {relative!r} in volume "{name}"')
                    path = staging / relative
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(content)
                    path.chmod(mode & 0o777)
                if target.exists():
                    shutil.rmtree(target)
                staging.rename(target)
            elif volume.get("emptyDir") is not None:
                if target.exists() or target.is_symlink():
                    continue
                if (volume["emptyDir"] or {}).get("medium") == "Memory" and MEMORY_VOLUMES.parent.is_dir():
                    memory = MEMORY_VOLUMES / record.uid / name
                    memory.mkdir(parents=True, exist_ok=True)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.symlink_to(memory)
                else:
                    target.mkdir(parents=True, exist_ok=True)
            elif volume.get("persistentVolumeClaim") is not None:
                claim = volume["persistentVolumeClaim"].get("claimName", name)
                # Claims outlive pods: one folder per claim under the kubelet's work dir.
                claimed = self.work_dir / "claims" / record.namespace / claim
                claimed.mkdir(parents=True, exist_ok=True)
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.is_symlink():
                    target.symlink_to(claimed)
            elif volume.get("hostPath") is not None:
                host = Path(volume["hostPath"].get("path", "/"))
                kind = volume["hostPath"].get("type") or ""
                if kind == "DirectoryOrCreate":
                    host.mkdir(parents=True, exist_ok=True)
                elif kind == "FileOrCreate" and not host.exists():
                    host.parent.mkdir(parents=True, exist_ok=True)
                    host.touch()
                if not host.exists():
                    raise ContainerConfigError(
                        "FailedMount", f'MountVolume.SetUp failed for volume "{name}" : hostPath {host} does not exist'
                    )
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.is_symlink():
                    target.symlink_to(host)
            else:
                kinds = sorted(key for key in volume if key != "name")
                raise ContainerConfigError(
                    "FailedMount", f'volume "{name}": the local kubelet does not support {kinds} volumes'
                )

    def _container_env(
        self, record: PodRecord, container: Mapping[str, Any], context: PodContext, own: Mapping[str, str]
    ) -> dict[str, str]:
        env = {
            key: value for key, value in os.environ.items()
            if key not in ENV_DENYLIST and not key.startswith(ENV_DENYLIST_PREFIXES)
        }
        api = urlsplit(self.api_url)
        env.update({
            "PATH": f"{self.venv_bin}{os.pathsep}{os.environ.get('PATH', '/usr/local/bin:/usr/bin:/bin')}",
            "HOSTNAME": pod_hostname(record.pod),
            "KUBERNETES_SERVICE_HOST": api.hostname or "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(api.port or 80),
            **self.extra_env,
        })
        if self.gpus:
            # Like the NVIDIA device plugin: a pod sees only the GPUs it was given.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(index) for index in record.gpu_ids)
        env.update(own)
        return env

    async def _run_container(
        self, record: PodRecord, container: Mapping[str, Any], run: ContainerRun, context: PodContext
    ) -> int | None:
        """Run the container once; its exit code, or None when the pod is being terminated instead."""
        while True:
            if record.termination is not None or self._stopping:
                return None
            try:
                configmaps, secrets = await self._fetch_references(record.pod)
                own = resolve_env(record.pod, container, context, configmaps, secrets)
                break
            except ContainerConfigError as error:
                # A secret or key deleted since the pod was admitted: wait for it like the real kubelet.
                run.state = {"waiting": {"reason": error.reason, "message": error.message}}
                await self._write_status(record)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(record.terminate.wait(), CONFIG_RETRY_S)
        env = self._container_env(record, container, context, own)
        argv = [expand(str(part), own) for part in [*(container.get("command") or []), *(container.get("args") or [])]]
        logs = record.directory / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        run.log_path = logs / f"{run.name}-{run.restart_count}.log"
        message_file = record.directory / f"termination-log-{run.name}"
        message_file.write_bytes(b"")
        started_marker = record.directory / f".started-{run.name}"
        started_marker.unlink(missing_ok=True)
        if not argv or shutil.which(argv[0], path=env["PATH"]) is None and "/" not in argv[0]:
            reason = "no command given (the local kubelet cannot run an image's entrypoint)" if not argv else (
                f'exec: "{argv[0]}": executable file not found in $PATH')
            return await self._start_failed(record, run, reason)
        mounts = self._mounts(record, container, message_file)
        hosts = record.directory / "hosts"
        if not hosts.exists():
            hosts.write_text(record.hosts_text or hosts_file(record.pod, record.ip, []))
        working_dir = str(container.get("workingDir") or record.directory)
        for mount in mounts:
            create_mount_point(mount, self._created_paths)
        command = sandbox_command(argv, pod_hostname(record.pod), hosts, mounts, working_dir, started_marker)
        with run.log_path.open("ab") as log:
            record.process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
                env=env, cwd=record.directory, start_new_session=True,
            )
        if record.process_started_at is None:
            record.process_started_at = time.monotonic()
            self._spawn(self._measure_start(record, started_marker))
        run.running = run.started = True
        started_at = now_iso()
        run.state = {"running": {"startedAt": started_at}}
        record.phase = "Running"
        self._event(record.pod, "Pulled", f'Container image "{run.image}" already present on machine')
        self._event(record.pod, "Created", f"Created container: {run.name}")
        self._event(record.pod, "Started", f"Started container {run.name}")
        await self._write_status(record)
        self._write_file_sd()
        process = record.process
        waiter = asyncio.ensure_future(process.wait())
        stopper = asyncio.ensure_future(record.terminate.wait())
        try:
            await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
        if not waiter.done():
            # Terminated from outside: _after_run stops the process and records its exit.
            waiter.cancel()
            return None
        code = exit_code_of(process.returncode if process.returncode is not None else 0)
        record.process = None
        run.running = False
        if not started_marker.exists():
            return await self._start_failed(record, run, _log_tail(run.log_path) or "sandbox set-up failed")
        self._record_exit(run, container, code, started_at, message_file)
        return code

    async def _measure_start(self, record: PodRecord, marker: Path) -> None:
        """Bind → exec of the command (the sandbox touches the marker just before exec), for benchmarks."""
        for _ in range(1000):
            with contextlib.suppress(OSError):
                self.bind_to_start_seconds.append(marker.stat().st_mtime - record.bound_wall_time)
                return
            await asyncio.sleep(0.005)

    def _mounts(self, record: PodRecord, container: Mapping[str, Any], message_file: Path) -> list[BindMount]:
        volumes = {volume["name"]: volume for volume in (record.pod.get("spec") or {}).get("volumes") or []}
        mounts: list[BindMount] = []
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount.get("name", ""))
            if volume is None:
                raise ContainerConfigError("CreateContainerConfigError",
                                           f"cannot find volume {mount.get('name')!r} to mount")
            source = (record.directory / "volumes" / volume["name"]).resolve()
            if mount.get("subPath"):
                source = source / mount["subPath"]
                if not source.exists():
                    source.mkdir(parents=True)
            read_only = bool(mount.get("readOnly")) or any(
                key in volume for key in ("configMap", "secret", "downwardAPI", "projected"))
            mounts.append(BindMount(source, mount["mountPath"], read_only))
        path = container.get("terminationMessagePath") or "/dev/termination-log"
        mounts.append(BindMount(message_file, path))
        return mounts

    def _record_exit(
        self, run: ContainerRun, container: Mapping[str, Any], code: int, started_at: str, message_file: Path
    ) -> None:
        try:
            written = message_file.read_text(errors="replace")
        except OSError:
            written = ""
        policy = container.get("terminationMessagePolicy") or "File"
        tail = _log_tail(run.log_path) if run.log_path else ""
        terminated: dict[str, Any] = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": started_at,
            "finishedAt": now_iso(),
            "containerID": f"local://{uuid.uuid4().hex}",
        }
        message = termination_message(written, policy, code, tail)
        if message:
            terminated["message"] = message
        run.state = {"terminated": terminated}

    async def _start_failed(self, record: PodRecord, run: ContainerRun, message: str) -> int:
        """The container could not start (no executable, sandbox set-up failed): exit 128, StartError."""
        record.process = None
        run.running = False
        now = now_iso()
        run.state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": message[-2048:],
                                    "startedAt": now, "finishedAt": now}}
        self._event(record.pod, "Failed", f"Error: {message[-512:]}", "Warning")
        return 128

    async def _back_off(self, record: PodRecord, run: ContainerRun) -> bool:
        """Wait before a restart (CrashLoopBackOff); False when the pod is terminated meanwhile."""
        delay = RESTART_BACKOFF_S[min(run.restart_count, len(RESTART_BACKOFF_S) - 1)]
        run.last_state = run.state
        run.restart_count += 1
        message = f"back-off {delay:g}s restarting failed container={run.name} pod={record.name}_{record.namespace}"
        run.state = {"waiting": {"reason": "CrashLoopBackOff", "message": message}}
        self._event(record.pod, "BackOff", f"Back-off restarting failed container {run.name} in pod "
                    f"{record.name}_{record.namespace}({record.uid})", "Warning")
        await self._write_status(record)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(record.terminate.wait(), delay)
        return record.termination is None

    async def _enforce_deadline(self, record: PodRecord, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(record.terminate.wait(), seconds)
        if record.termination is None and not record.terminal:
            self._request_termination(record, "deadline", float(
                (record.pod.get("spec") or {}).get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)))

    async def _after_run(self, record: PodRecord) -> None:
        """Stop a process still running for a termination request, then finish that request."""
        if record.termination is None:
            return
        if record.process is not None:
            run = next(iter(record.containers.values()))
            self._event(record.pod, "Killing", f"Stopping container {run.name}")
            code = await self._kill_process(record, record.grace)
            for candidate in [*record.init_containers.values(), *record.containers.values()]:
                if candidate.running:
                    started = (candidate.state.get("running") or {}).get("startedAt", now_iso())
                    every: list[dict[str, Any]] = [*(record.pod["spec"].get("initContainers") or []),
                                                   *record.pod["spec"]["containers"]]
                    container = next((c for c in every if c["name"] == candidate.name), {})
                    candidate.running = False
                    self._record_exit(candidate, container, code, started,
                                      record.directory / f"termination-log-{candidate.name}")
        else:
            for candidate in record.containers.values():
                if "terminated" not in candidate.state and "terminated" in candidate.last_state:
                    candidate.state = candidate.last_state  # stopped while backing off: its last exit stands
        await self._finish_terminal(record)

    async def _finish_terminal(self, record: PodRecord) -> None:
        kind = record.termination
        if kind in ("evict", "deadline"):
            record.phase = "Failed"
            if kind == "evict":
                record.reason, record.message = "Evicted", record.evict_message
                record.conditions = [
                    c for c in record.conditions if c.get("type") != "DisruptionTarget"
                ] + [condition("DisruptionTarget", True, [], "TerminationByKubelet", record.evict_message)]
            else:
                record.reason = "DeadlineExceeded"
                record.message = "Pod was active on the node longer than the specified deadline"
            await self._write_status(record)
            self._write_file_sd()
            self._refresh_hosts(record.namespace)
            return
        if kind == "delete" and not record.deletion_done:
            if not record.terminal:
                codes = [(run.state.get("terminated") or {}).get("exitCode", 1) for run in record.containers.values()]
                record.phase = "Succeeded" if codes and all(code == 0 for code in codes) else "Failed"
                await self._write_status(record)
            with contextlib.suppress(APIStatusError):
                await self._api.delete(record.path(), _delete_now(record.uid))
            record.deletion_done = True
        if record.deletion_done or kind == "gone":
            self._forget(record)

    async def _lost(self, record: PodRecord) -> None:
        record.phase, record.reason = "Failed", "ContainerStatusUnknown"
        record.message = "The container could not be located when the kubelet restarted"
        record.start_time = (record.pod.get("status") or {}).get("startTime")
        for run in record.containers.values():
            run.started = True
            run.state = {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown",
                                        "message": record.message, "finishedAt": now_iso()}}
        await self._write_status(record)
        if record.pod["metadata"].get("deletionTimestamp"):
            self._request_termination(record, "delete", 0)

    async def _kill_process(self, record: PodRecord, grace: float) -> int:
        """SIGTERM the process group, SIGKILL it after `grace` seconds; the container's exit code."""
        process = record.process
        if process is None:
            return 0
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), max(grace, 0.0))
            except TimeoutError:
                _signal_group(process.pid, signal.SIGKILL)
                await process.wait()
        record.process = None
        return exit_code_of(process.returncode if process.returncode is not None else 0)

    # ---- status and events ---------------------------------------------------------------------------

    def _status(self, record: PodRecord) -> dict[str, Any]:
        previous = record.conditions
        runs = list(record.containers.values())
        ready = record.phase == "Running" and all(run.running for run in runs)
        not_ready = [run.name for run in runs if not run.running]
        if record.phase == "Succeeded":
            why: tuple[str | None, str | None] = ("PodCompleted", None)
        elif record.phase == "Failed":
            why = ("PodFailed", None)
        else:
            why = ("ContainersNotReady", f"containers with unready status: [{' '.join(not_ready)}]")
        init_pending = [run.name for run in record.init_containers.values()
                        if (run.state.get("terminated") or {}).get("exitCode") != 0]
        initialized = record.initialized or not record.init_containers or not init_pending
        conditions = [
            condition("PodReadyToStartContainers", True, previous),
            condition("Initialized", initialized, previous, *(
                (None, None) if initialized else
                ("ContainersNotInitialized", f"containers with incomplete status: [{' '.join(init_pending)}]"))),
            condition("Ready", ready, previous, *((None, None) if ready else why)),
            condition("ContainersReady", ready, previous, *((None, None) if ready else why)),
            condition("PodScheduled", True, previous),
        ]
        conditions += [c for c in previous if c.get("type") == "DisruptionTarget"]
        record.conditions = conditions
        status: dict[str, Any] = {
            "phase": record.phase,
            "conditions": conditions,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": record.ip,
            "podIPs": [{"ip": record.ip}],
            "startTime": record.start_time or now_iso(),
            "qosClass": qos_class(record.pod),
            "containerStatuses": [self._container_status(run) for run in runs],
        }
        if record.init_containers:
            status["initContainerStatuses"] = [self._container_status(run) for run in record.init_containers.values()]
        if record.reason:
            status["reason"] = record.reason
        if record.message:
            status["message"] = record.message
        return status

    @staticmethod
    def _container_status(run: ContainerRun) -> dict[str, Any]:
        return {
            "name": run.name,
            "state": run.state,
            "lastState": run.last_state,
            "ready": run.running,
            "started": run.running,
            "restartCount": run.restart_count,
            "image": run.image,
            "imageID": "",
        }

    async def _write_status(self, record: PodRecord) -> None:
        async with record.status_lock:
            if record.deletion_done:
                return
            status = self._status(record)
            try:
                result = await self._api.merge_patch(record.path("/status"), {"status": status})
            except APIStatusError as error:
                logger.warning("status of %s/%s not written: %s", record.namespace, record.name, error)
                return
            record.pod = {**record.pod, "status": status}
            if result is None:
                record.deletion_done = True

    def _event(
        self,
        pod: Mapping[str, Any],
        reason: str,
        message: str,
        kind: str = "Normal",
        component: str = "kubelet",
    ) -> str:
        """Emit a core/v1 Event about the pod in the background; returns its name."""
        meta = pod["metadata"]
        namespace = meta.get("namespace", "default")
        name = f"{meta['name']}.{uuid.uuid4().hex[:16]}"
        now = now_iso()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "namespace": namespace,
                               "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")},
            "reason": reason,
            "message": message,
            "type": kind,
            "source": {"component": component, **({"host": self.node_name} if component == "kubelet" else {})},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "reportingComponent": component,
            "reportingInstance": self.node_name if component == "kubelet" else "",
        }
        self._spawn(self._post_event(namespace, event))
        return name

    async def _post_event(self, namespace: str, event: Mapping[str, Any]) -> None:
        try:
            await self._api.create(f"/api/v1/namespaces/{namespace}/events", event)
        except Exception as error:  # events are best effort, as in the real kubelet
            logger.debug("event not recorded: %r", error)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- hosts files and service discovery -----------------------------------------------------------

    def _refresh_hosts(self, namespace: str) -> None:
        members = [r for r in self._records.values() if r.namespace == namespace and not r.terminal]
        services = [s for (ns, _), s in self._services.items() if ns == namespace]
        records = headless_records(((r.pod, r.ip) for r in members), services).get(namespace, [])
        for record in [r for r in self._records.values() if r.namespace == namespace]:
            text = hosts_file(record.pod, record.ip, records)
            if text == record.hosts_text:
                continue
            record.hosts_text = text
            path = record.directory / "hosts"
            path.parent.mkdir(parents=True, exist_ok=True)
            _rewrite_in_place(path, text.encode())

    def _write_file_sd(self) -> None:
        running = [(r.pod, r.ip) for r in self._records.values() if r.phase == "Running"]
        text = json.dumps(file_sd_targets(running), indent=2)
        if text == self._file_sd_text:
            return
        self._file_sd_text = text
        # Prometheus re-reads file_sd files on change; a rename makes each version appear whole.
        staging = self.file_sd_path.with_suffix(".tmp")
        staging.write_text(text)
        staging.replace(self.file_sd_path)

    def _remove_created_paths(self) -> None:
        for path in reversed(self._created_paths):
            with contextlib.suppress(OSError):
                if path.is_dir():
                    path.rmdir()
                elif path.stat().st_size == 0:
                    path.unlink()
        self._created_paths.clear()


# ---- helpers ------------------------------------------------------------------------------------------


def _container_run(container: Mapping[str, Any]) -> ContainerRun:
    return ContainerRun(str(container["name"]), image=str(container.get("image", "")))


def _delete_now(uid: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0, "preconditions": {"uid": uid}}


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _rewrite_in_place(path: Path, content: bytes) -> None:
    """Replace a file's bytes keeping its inode: running pods see it through a bind mount."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(descriptor, content, 0)
        os.ftruncate(descriptor, len(content))
    finally:
        os.close(descriptor)


def _log_tail(path: Path | None, limit: int = 64 * 1024) -> str:
    if path is None:
        return ""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - limit))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _tail(data: bytes, lines: int | None) -> bytes:
    if lines is None:
        return data
    if lines <= 0:
        return b""
    kept = data.splitlines(keepends=True)[-lines:]
    return b"".join(kept)


async def _follow(path: Path, tail_lines: int | None, alive: Any) -> AsyncIterator[bytes]:
    """The log so far, then new bytes as they are written, until the container has stopped."""
    data = path.read_bytes()
    yield _tail(data, tail_lines)
    offset = len(data)
    while True:
        still_running = alive()
        size = path.stat().st_size if path.exists() else offset
        if size > offset:
            with path.open("rb") as handle:
                handle.seek(offset)
                chunk = handle.read(size - offset)
            offset += len(chunk)
            yield chunk
        elif not still_running:
            return
        await asyncio.sleep(0.2)


"""A process kubelet: the node agent of the local control plane, running its pods as isolated local processes.

It is one Node of the real API server, identified by a client certificate as ``system:node:<name>`` (so the Node
authorizer and NodeRestriction bound what it may read and write). This module watches the pods bound to it (and
the Services, for hosts files) and drives each pod's life: prepare, run its containers, restart or report them,
stop them on deletion, eviction or deadline. Its rooms:
  - kubelet_node.py: the Node, its Lease and status;      - kubelet_volumes.py: volumes, mounts, referenced objects;
  - kubelet_containers.py: one container as a process;     - kubelet_records.py: what it knows of a pod, pod status;
  - kubelet_server.py: TLS, ``/containerLogs`` for kubectl; - kubelet_sandbox.py: unshare, hostname, /etc/hosts;
  - kubelet_pods.py: pure translations (quantities, env, hosts files, events); kubelet_api.py: its REST client.
Not emulated: resource limits (no cgroups), probes (a running container is ready), image pulls, the user a
container runs as, more than one regular container per pod, sidecar init containers, a network namespace (pods
share the host's ports).

    with Kubelet(plane.url, plane.node_credentials("localnode"), work_dir, cpu="8", memory="32Gi", gpus=2):
        ...  # pods the scheduler binds to "localnode" now run
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any

from localcluster.kubelet_api import APIStatusError, KubeAPI, inform
from localcluster.kubelet_containers import (
    LaunchError,
    container_environment,
    log_tail,
    node_environment,
    prepare_launch,
    record_exit,
    record_start_failure,
    signal_group,
    stop_process,
)
from localcluster.kubelet_node import NodeAgent
from localcluster.kubelet_pods import (
    GPU_RESOURCE,
    NODE_NAME,
    ContainerConfigError,
    PodContext,
    Resources,
    exit_code_of,
    file_sd_targets,
    headless_records,
    hosts_file,
    now_iso,
    parse_quantity,
    pod_event,
    pod_requests,
    resolve_env,
)
from localcluster.kubelet_records import (
    DEFAULT_GRACE_S,
    TERMINAL_PHASES,
    ContainerRun,
    PodRecord,
    container_run,
    delete_now,
    enter_back_off,
    mark_lost,
    mark_stopped_by_kubelet,
    pod_status,
)
from localcluster.kubelet_sandbox import check_unshare, remove_created_paths, rewrite_in_place
from localcluster.kubelet_server import KubeletServer, NodeCredentials, follow_log, tail_lines
from localcluster.kubelet_volumes import MEMORY_VOLUMES, fetch_references, materialise_volumes, request_tokens
from localcluster.processes import LoopThread

logger = logging.getLogger(__name__)

CONFIG_RETRY_S = 1.0


class Kubelet:
    """The kubelet of one node (``localnode`` by default): runs the pods the scheduler binds to it."""

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
        self.work_dir = Path(work_dir).resolve()
        self.node_name = node_name
        self.capacity: Resources = {
            "cpu": parse_quantity(cpu),
            "memory": parse_quantity(memory),
            GPU_RESOURCE: Decimal(gpus),
            "pods": Decimal(250),
        }
        self.gpus = gpus
        self.extra_env = dict(extra_env or {})
        self.file_sd_path = self.work_dir / "prometheus" / "pods.json"
        self.venv_bin = str(Path(sys.executable).parent)
        self._node_env = node_environment(self.venv_bin, self.api_url, self.extra_env)
        self._api = KubeAPI(self.api_url, credentials.client_context())
        self._log_server = KubeletServer(self.log_provider, credentials.server_context())
        well_known = {"kubernetes.io/hostname": node_name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                      "node.kubernetes.io/instance-type": "local"}
        self.node = NodeAgent(self._api, node_name, labels={**well_known, **(labels or {})}, taints=taints,
                              capacity=self.capacity, gpus=gpus, version=version, work_dir=self.work_dir,
                              kubelet_port=lambda: self._log_server.port)
        self._records: dict[str, PodRecord] = {}
        self._pods: dict[str, dict[str, Any]] = {}  # every pod bound to this node by uid, from the watch
        self._services: dict[tuple[str, str], dict[str, Any]] = {}
        self._ips_in_use: set[str] = set()
        self._gpus_in_use: set[int] = set()
        self._tasks: list[asyncio.Task[Any]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._created_paths: list[Path] = []
        self._sandbox_error: str | None = None
        self._file_sd_text = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread_loop: LoopThread | None = None
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
        await self.node.register()
        pods_synced, services_synced = asyncio.Event(), asyncio.Event()
        self._tasks = [
            asyncio.create_task(inform(self._api, "/api/v1/services", self._on_service, services_synced)),
            # Like the real kubelet: only the pods bound to this node, never the whole cluster's.
            asyncio.create_task(inform(self._api, "/api/v1/pods", self._on_pod, pods_synced,
                                       {"fieldSelector": f"spec.nodeName={self.node_name}"})),
            asyncio.create_task(self.node.renew_lease_forever()),
            asyncio.create_task(self.node.report_status_forever()),
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
        remove_created_paths(self._created_paths)

    def __enter__(self) -> Kubelet:
        """Run the kubelet on its own thread and event loop (for synchronous tests and the demo)."""
        self._thread_loop = LoopThread("kubelet")
        self._thread_loop.start(self.start, self.stop, timeout=60)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._thread_loop is not None:
            self._thread_loop.stop(self.stop, timeout=120)
            self._thread_loop = None

    # ---- fault injection and introspection (thread-safe) --------------------------------------------

    def kill_container(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal the container's process group, as a crash or the OOM killer would; the pod reports the exit."""
        pid = self.container_pid(namespace, name)
        if pid is None:
            raise LookupError(f"no running container for pod {namespace}/{name}")
        signal_group(pid, sig)

    def evict(self, namespace: str, name: str, message: str = "The node was low on resource: memory. ") -> None:
        """Evict like the kubelet under node pressure: SIGTERM, grace, SIGKILL, then phase Failed/Evicted."""
        record = self._find(namespace, name)
        if record is None or record.terminal:
            raise LookupError(f"no active pod {namespace}/{name} on {self.node_name}")
        assert self._loop is not None
        grace = float((record.pod.get("spec") or {}).get("terminationGracePeriodSeconds", DEFAULT_GRACE_S))
        self._loop.call_soon_threadsafe(self._request_termination, record, "evict", grace, message)

    def container_pid(self, namespace: str, name: str) -> int | None:
        """The pid of the pod's running container process (the workload's processes are its descendants)."""
        record = self._find(namespace, name)
        process = record.process if record is not None else None
        return int(process.pid) if process is not None and process.returncode is None else None

    def pod_ip(self, namespace: str, name: str) -> str | None:
        return record.ip if (record := self._find(namespace, name)) else None

    def log_path(self, namespace: str, name: str, container: str | None = None) -> Path | None:
        if (record := self._find(namespace, name)) is None:
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
        self, namespace: str, name: str, container: str, follow: bool, lines: int | None
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
            return tail_lines(path.read_bytes(), lines)
        return follow_log(path, lines, lambda: run.running or not run.started)

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
            await self._api.delete(path, delete_now(meta["uid"]))

    # ---- pod records ---------------------------------------------------------------------------------

    def _new_record(self, pod: dict[str, Any]) -> PodRecord:
        meta = pod["metadata"]
        directory = self.work_dir / "pods" / meta.get("namespace", "default") / f"{meta['name']}-{meta['uid'][:8]}"
        requests = pod_requests(pod)
        record = PodRecord(pod=pod, ip=self._allocate_ip((pod.get("status") or {}).get("podIP")),
                           directory=directory)
        gpus = int(requests.get(GPU_RESOURCE, 0))
        free_gpus = [index for index in range(self.gpus) if index not in self._gpus_in_use]
        record.gpu_ids = free_gpus[:gpus]
        self._gpus_in_use.update(record.gpu_ids)
        spec = pod.get("spec") or {}
        for container in spec.get("initContainers") or []:
            record.init_containers[container["name"]] = container_run(container)
        for container in spec.get("containers") or []:
            record.containers[container["name"]] = container_run(container)
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
                configmaps, secrets = await fetch_references(self._api, record.pod)
                await request_tokens(self._api, record.pod, context)
                materialise_volumes(record.directory, record.pod, context, configmaps, secrets)
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

    async def _run_container(
        self, record: PodRecord, container: Mapping[str, Any], run: ContainerRun, context: PodContext
    ) -> int | None:
        """Run the container once; its exit code, or None when the pod is being terminated instead."""
        while True:
            if record.termination is not None or self._stopping:
                return None
            try:
                configmaps, secrets = await fetch_references(self._api, record.pod)
                own = resolve_env(record.pod, container, context, configmaps, secrets)
                break
            except ContainerConfigError as error:
                # A secret or key deleted since the pod was admitted: wait for it like the real kubelet.
                run.state = {"waiting": {"reason": error.reason, "message": error.message}}
                await self._write_status(record)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(record.terminate.wait(), CONFIG_RETRY_S)
        env = container_environment(self._node_env, record, own, bool(self.gpus))
        try:
            launch = prepare_launch(record, container, run, env, own, self._created_paths)
        except LaunchError as error:
            return self._start_failed(record, run, str(error))
        assert run.log_path is not None
        with run.log_path.open("ab") as log:
            record.process = await asyncio.create_subprocess_exec(
                *launch.command, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
                env=launch.env, cwd=record.directory, start_new_session=True,
            )
        if record.process_started_at is None:
            record.process_started_at = time.monotonic()
            self._spawn(self._measure_start(record, launch.started_marker))
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
        if not launch.started_marker.exists():
            return self._start_failed(record, run, log_tail(run.log_path) or "sandbox set-up failed")
        record_exit(run, container, code, started_at, launch.message_file)
        return code

    async def _measure_start(self, record: PodRecord, marker: Path) -> None:
        """Bind → exec of the command (the sandbox touches the marker just before exec), for benchmarks."""
        for _ in range(1000):
            with contextlib.suppress(OSError):
                self.bind_to_start_seconds.append(marker.stat().st_mtime - record.bound_wall_time)
                return
            await asyncio.sleep(0.005)

    def _start_failed(self, record: PodRecord, run: ContainerRun, message: str) -> int:
        """The container could not start (no executable, sandbox set-up failed): exit 128, StartError."""
        record.process = None
        self._event(record.pod, "Failed", f"Error: {message[-512:]}", "Warning")
        return record_start_failure(run, message)

    async def _back_off(self, record: PodRecord, run: ContainerRun) -> bool:
        """Wait before a restart (CrashLoopBackOff); False when the pod is terminated meanwhile."""
        delay = enter_back_off(record, run)
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
                    record_exit(candidate, container, code, started,
                                record.directory / f"termination-log-{candidate.name}")
        else:
            for candidate in record.containers.values():
                if "terminated" not in candidate.state and "terminated" in candidate.last_state:
                    candidate.state = candidate.last_state  # stopped while backing off: its last exit stands
        await self._finish_terminal(record)

    async def _finish_terminal(self, record: PodRecord) -> None:
        kind = record.termination
        if kind in ("evict", "deadline"):
            mark_stopped_by_kubelet(record, evicted=kind == "evict")
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
                await self._api.delete(record.path(), delete_now(record.uid))
            record.deletion_done = True
        if record.deletion_done or kind == "gone":
            self._forget(record)

    async def _lost(self, record: PodRecord) -> None:
        mark_lost(record)
        await self._write_status(record)
        if record.pod["metadata"].get("deletionTimestamp"):
            self._request_termination(record, "delete", 0)

    async def _kill_process(self, record: PodRecord, grace: float) -> int:
        """Stop the pod's process (SIGTERM, ``grace`` seconds, SIGKILL); the container's exit code."""
        process, record.process = record.process, None
        return 0 if process is None else await stop_process(process, grace)

    # ---- status and events ---------------------------------------------------------------------------

    async def _write_status(self, record: PodRecord) -> None:
        async with record.status_lock:
            if record.deletion_done:
                return
            status = pod_status(record)
            try:
                result = await self._api.merge_patch(record.path("/status"), {"status": status})
            except APIStatusError as error:
                logger.warning("status of %s/%s not written: %s", record.namespace, record.name, error)
                return
            record.pod = {**record.pod, "status": status}
            if result is None:
                record.deletion_done = True

    def _event(self, pod: Mapping[str, Any], reason: str, message: str, kind: str = "Normal") -> None:
        """Emit a core/v1 Event about the pod in the background (best effort, as in the real kubelet)."""
        self._spawn(self._post_event(pod_event(pod, reason, message, kind, self.node_name)))

    async def _post_event(self, event: Mapping[str, Any]) -> None:
        try:
            await self._api.create(f"/api/v1/namespaces/{event['metadata']['namespace']}/events", event)
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
            if text != record.hosts_text:
                record.hosts_text = text
                path = record.directory / "hosts"
                path.parent.mkdir(parents=True, exist_ok=True)
                rewrite_in_place(path, text.encode())

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

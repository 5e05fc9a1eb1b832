"""What the process kubelet knows of each pod it runs, and the pod status it reports from that."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localcluster.kubelet_pods import condition, now_iso, qos_class

TERMINAL_PHASES = ("Succeeded", "Failed")
DEFAULT_GRACE_S = 30
# The real kubelet backs off 10 s doubling to 5 min; shorter here so local restarts stay quick.
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)


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


def container_run(container: Mapping[str, Any]) -> ContainerRun:
    return ContainerRun(str(container["name"]), image=str(container.get("image", "")))


def pod_status(record: PodRecord) -> dict[str, Any]:
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
        "containerStatuses": [container_status(run) for run in runs],
    }
    if record.init_containers:
        status["initContainerStatuses"] = [container_status(run) for run in record.init_containers.values()]
    if record.reason:
        status["reason"] = record.reason
    if record.message:
        status["message"] = record.message
    return status

def container_status(run: ContainerRun) -> dict[str, Any]:
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


# ---- what the kubelet decides about a pod, before it reports it --------------------------------------------


def enter_back_off(record: PodRecord, run: ContainerRun) -> float:
    """The container failed and restarts after the returned delay (CrashLoopBackOff); its exit becomes lastState."""
    delay = RESTART_BACKOFF_S[min(run.restart_count, len(RESTART_BACKOFF_S) - 1)]
    run.last_state = run.state
    run.restart_count += 1
    message = f"back-off {delay:g}s restarting failed container={run.name} pod={record.name}_{record.namespace}"
    run.state = {"waiting": {"reason": "CrashLoopBackOff", "message": message}}
    return delay


def mark_stopped_by_kubelet(record: PodRecord, *, evicted: bool) -> None:
    """Failed by the kubelet itself: evicted under node pressure (a DisruptionTarget), or past its deadline."""
    record.phase = "Failed"
    if evicted:
        record.reason, record.message = "Evicted", record.evict_message
        record.conditions = [c for c in record.conditions if c.get("type") != "DisruptionTarget"] + [
            condition("DisruptionTarget", True, [], "TerminationByKubelet", record.evict_message)]
    else:
        record.reason = "DeadlineExceeded"
        record.message = "Pod was active on the node longer than the specified deadline"


def mark_lost(record: PodRecord) -> None:
    """A pod that ran under an earlier kubelet whose processes are gone: failed, its container unknown."""
    record.phase, record.reason = "Failed", "ContainerStatusUnknown"
    record.message = "The container could not be located when the kubelet restarted"
    record.start_time = (record.pod.get("status") or {}).get("startTime")
    for run in record.containers.values():
        run.started = True
        run.state = {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown",
                                    "message": record.message, "finishedAt": now_iso()}}


def delete_now(uid: str) -> dict[str, Any]:
    """DeleteOptions that remove a stopped pod at once, and only the object with this uid (not a successor)."""
    return {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0, "preconditions": {"uid": uid}}

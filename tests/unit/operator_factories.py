"""Factories for the operator's unit tests: FineTuneJob bodies, pods and events, one decision policy run on its own.

Bodies, pods and events look as the API server returns them; a decision's actions read as short sentences.
"""

from __future__ import annotations

import copy
import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from finetune_operator.decision import (
    CreateChild,
    Decision,
    DeleteJob,
    DeletePod,
    DeletePodGroup,
    DeleteWorkload,
    PatchWorkloadStatus,
    Policy,
    observe_job,
    start_draft,
)
from finetune_operator.pod_view import observe_pods
from finetune_operator.progress import ProgressSample
from finetune_operator.spec import parse_job
from finetune_operator.workload import QueueObservation

T0 = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
DELETE = object()
TWO_NODES = {"spec.distributed.nodes": 2}

BASE_SPEC: dict[str, Any] = {
    "model": {"uri": "s3://models/base"},
    "dataset": {"uri": "s3://data/train.jsonl"},
    "output": {"uri": "s3://out/job"},
    "training": {"maxSteps": 100},
}


@dataclass(frozen=True)
class FakeSettings:
    trainer_image: str = "trainer:test"


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


def ts(seconds: float) -> str:
    return at(seconds).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_path(target: dict[str, Any], path: str, value: Any) -> None:
    """Set (or with DELETE remove) ``a.b.c`` in nested dicts, creating the dicts on the way."""
    *parents, last = path.split(".")
    node = target
    for part in parents:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = copy.deepcopy(value)


def make_job(overrides: dict[str, Any] | None = None, /, **paths: Any) -> dict[str, Any]:
    """A FineTuneJob body; overrides by dotted path (``{"spec.distributed.nodes": 2}``) or ``spec__x__y=...``."""
    body: dict[str, Any] = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": "job",
            "namespace": "ns",
            "uid": "uid-1",
            "generation": 1,
            "creationTimestamp": ts(0),
        },
        "spec": copy.deepcopy(BASE_SPEC),
    }
    merged = dict(overrides or {})
    merged.update({key.replace("__", "."): value for key, value in paths.items()})
    for path, value in merged.items():
        set_path(body, path, value)
    return body


def make_pod(
    rank: int = 0,
    attempt: int = 0,
    phase: str | None = "Pending",
    *,
    job: str = "job",
    exit_code: int | None = None,
    termination_reason: str | None = None,
    termination_message: str | None = None,
    pod_reason: str | None = None,
    node: str | None = None,
    scheduled_at: float | None = None,
    unschedulable: str | None = None,
    waiting: str | None = None,
    waiting_message: str | None = None,
    disrupted: bool = False,
    deleting: bool = False,
    ip: str | None = None,
) -> dict[str, Any]:
    """A pod of the job as the API server would show it (status as a kubelet or scheduler would set it)."""
    name = f"{job}-a{attempt}-n{rank}"
    status: dict[str, Any] = {}
    if phase is not None:
        status["phase"] = phase
    conditions: list[dict[str, Any]] = []
    if scheduled_at is not None:
        conditions.append({"type": "PodScheduled", "status": "True", "lastTransitionTime": ts(scheduled_at)})
    if unschedulable is not None:
        conditions.append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                           "message": unschedulable})
    if disrupted:
        conditions.append({"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"})
    if conditions:
        status["conditions"] = conditions
    if pod_reason is not None:
        status["reason"] = pod_reason
    if ip is not None:
        status["podIP"] = ip
    state: dict[str, Any] | None = None
    if exit_code is not None:
        terminated: dict[str, Any] = {"exitCode": exit_code, "reason": termination_reason or "Error"}
        if termination_message is not None:
            terminated["message"] = termination_message
        state = {"terminated": terminated}
    elif waiting is not None:
        state = {"waiting": {"reason": waiting, **({"message": waiting_message} if waiting_message else {})}}
    elif phase == "Running":
        state = {"running": {"startedAt": ts(0)}}
    if state is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": state}]
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": "ns",
        "uid": f"pod-{name}",
        "creationTimestamp": ts(0),
        "labels": {
            "finetune.dev/job-name": job,
            "finetune.dev/node-rank": str(rank),
            "finetune.dev/attempt": str(attempt),
        },
        "ownerReferences": [{"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": job,
                             "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}],
    }
    if deleting:
        metadata["deletionTimestamp"] = ts(0)
    spec: dict[str, Any] = {"containers": [{"name": "trainer"}]}
    if node is not None:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec, "status": status}


def make_event(pod: str, reason: str, message: str, seconds: float = 0) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{pod}.{reason}.{seconds}", "namespace": "ns"},
        "involvedObject": {"kind": "Pod", "name": pod, "namespace": "ns"},
        "reason": reason,
        "message": message,
        "type": "Warning",
        "lastTimestamp": ts(seconds),
    }


def running_status(attempt: int = 0, **extra: Any) -> dict[str, Any]:
    """The status of a two-node job whose gang of ``attempt`` has run since second 10."""
    status = {
        "phase": "Running",
        "attempt": attempt,
        "restarts": attempt,
        "countedFailures": 0,
        "startTime": ts(10),
        "message": f"Attempt {attempt}: all 2 pod(s) running",
        "observedGeneration": 1,
        "conditions": [{"type": "Running", "status": "True", "reason": "AllPodsRunning",
                        "message": f"attempt {attempt}: all pods running", "lastTransitionTime": ts(10),
                        "observedGeneration": 1}],
    }
    status.update(extra)
    return status


def apply_policy(policy: Policy, job: dict[str, Any], pods: Sequence[dict[str, Any]] = (),
                 events: Sequence[Mapping[str, Any]] = (), now: float = 100,
                 sample: ProgressSample | None = None, queue: QueueObservation | None = None) -> tuple[bool, Decision]:
    """One of ``decide``'s policies on its own, on the job as ``decide`` observes it once the spec is accepted:
    whether the policy completed the decision, and the decision as the policy left it."""
    views = observe_pods(pods)
    draft = start_draft(job, views, at(now))
    observed = observe_job(parse_job(job), draft.status, views, events, sample, queue, FakeSettings.trainer_image)
    return policy(observed, draft), draft.decision()


def make_workload(*true: str, count: int = 2, queue: str = "team-a",
                  reasons: Mapping[str, tuple[str, str]] | None = None, flavor: str = "a100",
                  priority_class: str | None = None, **extra: Any) -> dict[str, Any]:
    """The job's Kueue Workload as the API returns it, with the conditions in ``true`` True (reason and message
    from ``reasons``, else the type's name) and, when Admitted, an admission to ``flavor``."""
    conditions = []
    for kind, (reason, message) in (reasons or {}).items():
        conditions.append({"type": kind, "status": "True" if kind in true else "False", "reason": reason,
                           "message": message, "lastTransitionTime": ts(50), "observedGeneration": 1})
    conditions += [{"type": kind, "status": "True", "reason": kind, "message": kind, "lastTransitionTime": ts(50),
                    "observedGeneration": 1} for kind in true if kind not in (reasons or {})]
    spec: dict[str, Any] = {"queueName": queue, "podSets": [{"name": "trainer", "count": count, "template": {}}]}
    if priority_class is not None:
        spec["priorityClassRef"] = {"group": "kueue.x-k8s.io", "kind": "WorkloadPriorityClass", "name": priority_class}
    status: dict[str, Any] = {"conditions": conditions}
    if "Admitted" in true:
        status["admission"] = {"clusterQueue": "cq", "podSetAssignments": [
            {"name": "trainer", "flavors": {"cpu": flavor, "nvidia.com/gpu": flavor}, "count": count}]}
    metadata = {"name": "finetunejob-job", "namespace": "ns", "resourceVersion": "42", "generation": 1, **extra}
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload", "metadata": metadata, "spec": spec,
            "status": status}


def described(decision: Decision) -> list[str]:
    """The actions as short sentences, in order."""
    out = []
    for action in decision.actions:
        if isinstance(action, CreateChild):
            verb = "apply" if action.update_existing else "create"
            out.append(f"{verb} {action.kind} {action.name}")
        elif isinstance(action, DeletePod):
            out.append(f"delete Pod {action.name}")
        elif isinstance(action, DeleteJob):
            out.append("delete FineTuneJob")
        elif isinstance(action, DeleteWorkload):
            out.append(f"delete Workload {action.name}")
        elif isinstance(action, PatchWorkloadStatus):
            out.append(f"patch Workload {action.name} status")
        elif isinstance(action, DeletePodGroup):
            out.append(f"delete PodGroup {action.name}")
    return out


def condition(decision: Decision, kind: str) -> dict[str, Any] | None:
    return next((c for c in decision.status.get("conditions", []) if c["type"] == kind), None)

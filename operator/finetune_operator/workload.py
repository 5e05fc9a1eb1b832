"""The job's Kueue Workload as the operator reads it, and the status patches the operator writes to it.

The operator plays the part Kueue's own job integrations play (its ``jobframework``): it reads the Workload's
conditions (QuotaReserved, Admitted, Evicted, Finished) and its admission (the ResourceFlavor of each resource),
clears the admission once an evicted gang has stopped, and marks the Workload Finished when the job ends. Status
patches carry the Workload's resourceVersion, so a write that races one of Kueue's is refused and retried.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune_operator import constants as c
from finetune_operator.conditions import upsert_condition
from finetune_operator.spec import format_time


@dataclass(frozen=True)
class WorkloadView:
    """What the operator uses of a stored Workload."""

    name: str
    resource_version: str
    generation: int
    queue_name: str
    count: int
    priority_class: str | None
    conditions: tuple[Mapping[str, Any], ...]
    cluster_queue: str | None
    flavor_names: tuple[str, ...]
    deleting: bool = False

    def condition(self, kind: str) -> Mapping[str, Any] | None:
        return next((item for item in self.conditions if item.get("type") == kind), None)

    def is_true(self, kind: str) -> bool:
        found = self.condition(kind)
        return found is not None and found.get("status") == "True"

    @property
    def admitted(self) -> bool:
        return self.is_true(c.WORKLOAD_ADMITTED)

    @property
    def quota_reserved(self) -> bool:
        return self.is_true(c.WORKLOAD_QUOTA_RESERVED)

    @property
    def evicted(self) -> bool:
        return self.is_true(c.WORKLOAD_EVICTED)

    @property
    def finished(self) -> bool:
        return self.is_true(c.WORKLOAD_FINISHED)

    def why(self, kind: str, fallback: tuple[str, str]) -> tuple[str, str]:
        """(reason, message) of a condition, else ``fallback``."""
        found = self.condition(kind) or {}
        return str(found.get("reason") or fallback[0]), str(found.get("message") or fallback[1])

    def waiting(self) -> tuple[str, str]:
        """Kueue's words for why the Workload is not admitted yet (QuotaReserved=False says which quota is short)."""
        fallback = (c.REASON_WORKLOAD_CREATED, f"waiting for Kueue to admit Workload {self.name} "
                                               f"in LocalQueue {self.queue_name}")
        if self.quota_reserved:
            return self.why(c.WORKLOAD_ADMITTED, fallback)
        return self.why(c.WORKLOAD_QUOTA_RESERVED, fallback)


def observe_workload(body: Mapping[str, Any] | None) -> WorkloadView | None:
    """The view of a Workload as the API returns it; None for none."""
    if not body:
        return None
    metadata, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    pod_sets = spec.get("podSets") or [{}]
    priority = spec.get("priorityClassRef") or {}
    admission = status.get("admission") or {}
    assignments = admission.get("podSetAssignments") or []
    flavors = sorted({str(name) for item in assignments for name in (item.get("flavors") or {}).values()})
    generation = metadata.get("generation")
    return WorkloadView(
        name=str(metadata.get("name", "")),
        resource_version=str(metadata.get("resourceVersion", "")),
        generation=generation if isinstance(generation, int) else 0,
        queue_name=str(spec.get("queueName") or ""),
        count=int(pod_sets[0].get("count") or 0),
        priority_class=priority.get("name"),
        conditions=tuple(status.get("conditions") or ()),
        cluster_queue=admission.get("clusterQueue"),
        flavor_names=tuple(flavors),
        deleting=bool(metadata.get("deletionTimestamp")),
    )


@dataclass(frozen=True)
class Placement:
    """Where the admitted gang must run: the node labels and tolerations of the flavors Kueue assigned."""

    node_labels: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()


def placement_of(flavors: Iterable[Mapping[str, Any]]) -> Placement:
    """The ResourceFlavors' spec.nodeLabels merged and their spec.tolerations, each once."""
    labels: dict[str, str] = {}
    tolerations: list[Mapping[str, Any]] = []
    for flavor in flavors:
        spec = flavor.get("spec") or {}
        labels.update({str(k): str(v) for k, v in (spec.get("nodeLabels") or {}).items()})
        tolerations += [dict(t) for t in spec.get("tolerations") or () if t not in tolerations]
    return Placement(labels, tuple(tolerations))


@dataclass(frozen=True)
class QueueObservation:
    """What the reconcile read for a job with spec.queueName: its Workload, the admitted flavors' placement (read
    only while pods are to be created) and its WorkloadPriorityClass's value (read only when the Workload is to be
    created; ``priority_class_missing`` when the class does not exist); or why the Workload API cannot be used
    (``unavailable``: Kueue's CRD is not installed, or the operator may not use it)."""

    workload: WorkloadView | None = None
    placement: Placement | None = None
    priority: int | None = None
    priority_class_missing: bool = False
    unavailable: str | None = None


# ---- status patches --------------------------------------------------------------------------------------


def _with_conditions(workload: WorkloadView, now: datetime.datetime,
                     changes: Sequence[tuple[str, bool, str, str]]) -> list[dict[str, Any]]:
    """The Workload's conditions with ``(type, status, reason, message)`` set; lastTransitionTime moves on a flip."""
    conditions = [dict(item) for item in workload.conditions]
    for kind, status, reason, message in changes:
        upsert_condition(conditions, {"type": kind, "status": "True" if status else "False", "reason": reason,
                                      "message": message[:32768], "lastTransitionTime": format_time(now),
                                      "observedGeneration": workload.generation})
    return conditions


def _status_patch(workload: WorkloadView, status: dict[str, Any]) -> dict[str, Any]:
    # The resourceVersion makes the merge patch conditional: the conditions list is replaced whole.
    return {"metadata": {"resourceVersion": workload.resource_version}, "status": status}


def clear_admission_patch(workload: WorkloadView, now: datetime.datetime) -> dict[str, Any]:
    """After an eviction, once the gang has stopped: the quota reservation and the admission go, as Kueue's own
    integrations do it, and the Workload queues again (Requeued after a preemption or a node failure)."""
    reason, message = workload.why(c.WORKLOAD_EVICTED, (c.REASON_EVICTED, "evicted"))
    conditions = _with_conditions(workload, now, [
        (c.WORKLOAD_QUOTA_RESERVED, False, c.WORKLOAD_PENDING_REASON, message),
        (c.WORKLOAD_ADMITTED, False, c.WORKLOAD_NO_RESERVATION_REASON, "The workload has no reservation"),
        (c.WORKLOAD_REQUEUED, reason in c.WORKLOAD_REQUEUED_EVICTIONS, reason, message),
    ])
    return _status_patch(workload, {"admission": None, "conditions": conditions})


def finish_patch(workload: WorkloadView, now: datetime.datetime, *, succeeded: bool, message: str) -> dict[str, Any]:
    """Finished=True with the job's outcome: Kueue releases the Workload's quota at once."""
    reason = c.PHASE_SUCCEEDED if succeeded else c.PHASE_FAILED
    return _status_patch(workload, {"conditions": _with_conditions(workload, now, [
        (c.WORKLOAD_FINISHED, True, reason, message or reason)])})

"""Gang scheduling and topology as plain data: the PodGroup's parts, and what each pod carries for them.

Why one PodGroup per attempt (``<job>-a<attempt>``) and not one reused by every attempt: a PodGroup's status
describes one set of pods (Volcano's phase and conditions, coscheduling's scheduled/succeeded/failed counts, and
coscheduling's controller stops updating a group once it is Finished or Failed), and the pods of a stopped attempt
can still be terminating, writing their emergency checkpoint, when the next attempt's pods are created: counted in
a reused group they could let a partial new gang through. A new group per attempt starts clean; the old one is
deleted as soon as the job moves on to the next attempt, which costs one delete and one create per restart.

Topology (spec.topology) is carried by the first of these that applies (``topology_route``): Kueue's
topology-aware scheduling for a job in a Kueue queue; Volcano's networkTopology on the PodGroup; else pod affinity
among the gang's pods on the level's node label key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from finetune_operator import constants as c
from finetune_operator.spec import FineTuneJob, JobSpec

_QUANTITY: Final = re.compile(r"^(?P<number>[0-9]+(\.[0-9]*)?|\.[0-9]+)(?P<suffix>.*)$")
# The requests a PodGroup's minResources sums, as the pods request them.
MIN_RESOURCE_KEYS: Final = ("cpu", "memory", c.GPU_RESOURCE, "ephemeral-storage")
# The weight of the preferred pod affinity: the strongest, as the user asked for nothing else about placement.
PREFERRED_AFFINITY_WEIGHT: Final = 100

TOPOLOGY_KUEUE: Final = "kueue"
TOPOLOGY_VOLCANO: Final = "volcano"
TOPOLOGY_AFFINITY: Final = "affinity"


def pod_group_name(job_name: str, attempt: int) -> str:
    return f"{job_name}-a{attempt}"


def pod_group_api_version(spec: JobSpec) -> str | None:
    """The PodGroup API the job's gang scheduler reads; None without spec.gang."""
    return None if spec.gang is None else c.POD_GROUP_API_VERSIONS[spec.gang.scheduler]


def multiply_quantity(quantity: str, times: int) -> str:
    """A Kubernetes quantity times a whole number, in the quantity's own unit: ``64Gi`` x 2 = ``128Gi``."""
    match = _QUANTITY.match(quantity.strip().lstrip("+"))
    if match is None:
        raise ValueError(f"{quantity!r} is not a quantity")
    number = Decimal(match.group("number")) * times
    text = format(number.normalize(), "f") if number else "0"
    return f"{text}{match.group('suffix')}"


def min_resources(requests: dict[str, str], members: int) -> dict[str, str]:
    """What ``members`` pods of the gang request together (the pods are alike): the PodGroup's minResources."""
    return {key: multiply_quantity(str(requests[key]), members) for key in MIN_RESOURCE_KEYS if key in requests}


def pod_group_spec(job: FineTuneJob, requests: dict[str, str]) -> dict[str, Any]:
    """The PodGroup's spec for the job's gang scheduler: minMember, minResources and the scheduler's own fields."""
    spec, gang = job.spec, job.spec.gang
    assert gang is not None
    members = spec.gang_min_member
    body: dict[str, Any] = {"minMember": members}
    resources = min_resources(requests, members)
    if resources:
        body["minResources"] = resources
    if gang.scheduler == c.GANG_COSCHEDULING:
        body["scheduleTimeoutSeconds"] = gang.schedule_timeout_seconds
        return body
    if gang.queue is not None:
        body["queue"] = gang.queue
    if spec.priority_class_name:
        body["priorityClassName"] = spec.priority_class_name
    network = volcano_network_topology(spec)
    if network is not None:
        body["networkTopology"] = network
    return body


def gang_scheduler_name(spec: JobSpec) -> str | None:
    """The pods' schedulerName: spec.schedulerName, else the gang scheduler's usual name, else the cluster's."""
    if spec.scheduler_name:
        return spec.scheduler_name
    if spec.gang is None:
        return None
    return c.VOLCANO_SCHEDULER_NAME if spec.gang.scheduler == c.GANG_VOLCANO else c.COSCHEDULING_SCHEDULER_NAME


def gang_pod_metadata(job: FineTuneJob) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, annotations) that tie a pod to its attempt's PodGroup: Volcano reads an annotation, coscheduling a
    label."""
    gang = job.spec.gang
    if gang is None:
        return {}, {}
    group = pod_group_name(job.name, job.attempt)
    if gang.scheduler == c.GANG_VOLCANO:
        return {}, {c.VOLCANO_GROUP_ANNOTATION: group}
    return {c.COSCHEDULING_GROUP_LABEL: group}, {}


# ---- topology -----------------------------------------------------------------------------------------------


def topology_route(spec: JobSpec) -> str | None:
    """Who keeps the gang in one domain of spec.topology's level: Kueue (queueName), Volcano (its PodGroup), or
    the pods' own affinity (coscheduling's scheduler and the default one both honour it); None without topology."""
    if spec.topology is None:
        return None
    if spec.queue_name is not None:
        return TOPOLOGY_KUEUE
    if spec.gang is not None and spec.gang.scheduler == c.GANG_VOLCANO:
        return TOPOLOGY_VOLCANO
    return TOPOLOGY_AFFINITY


def kueue_topology_annotations(spec: JobSpec) -> dict[str, str]:
    """The pod set's level annotation, as Kueue reads it from a Job's pod template."""
    if topology_route(spec) != TOPOLOGY_KUEUE or spec.topology is None:
        return {}
    if spec.topology.required is not None:
        return {c.KUEUE_REQUIRED_TOPOLOGY_ANNOTATION: spec.topology.required}
    return {c.KUEUE_PREFERRED_TOPOLOGY_ANNOTATION: spec.topology.level}


def kueue_topology_request(spec: JobSpec) -> dict[str, str] | None:
    """The Workload pod set's topologyRequest; the node rank label orders the pods over the assigned domains."""
    if topology_route(spec) != TOPOLOGY_KUEUE or spec.topology is None:
        return None
    kind = "required" if spec.topology.required is not None else "preferred"
    return {kind: spec.topology.level, "podIndexLabel": c.LABEL_NODE_RANK}


def kueue_topology_pod_fields(job: FineTuneJob, workload: str) -> tuple[dict[str, str], dict[str, str]]:
    """(labels, annotations) by which Kueue's topology ungater finds a pod of the admitted Workload; the pod is
    created with Kueue's topology scheduling gate, which the ungater lifts once it has set the pod's nodeSelector
    to its assigned domain."""
    if topology_route(job.spec) != TOPOLOGY_KUEUE:
        return {}, {}
    return ({c.KUEUE_POD_SET_LABEL: c.KUEUE_POD_SET},
            {**kueue_topology_annotations(job.spec), c.KUEUE_WORKLOAD_ANNOTATION: workload})


def volcano_network_topology(spec: JobSpec) -> dict[str, str] | None:
    """The Volcano PodGroup's networkTopology: hard (required) or soft (preferred), up to the named tier."""
    if topology_route(spec) != TOPOLOGY_VOLCANO or spec.topology is None:
        return None
    mode = "hard" if spec.topology.required is not None else "soft"
    return {"mode": mode, "highestTierName": spec.topology.level}


def topology_pod_affinity(job: FineTuneJob) -> dict[str, Any] | None:
    """Pod affinity among the attempt's pods on the level's label key: required, or preferred at full weight."""
    spec = job.spec
    if topology_route(spec) != TOPOLOGY_AFFINITY or spec.topology is None:
        return None
    term = {
        "labelSelector": {"matchLabels": {c.LABEL_JOB_NAME: job.name, c.LABEL_ATTEMPT: str(job.attempt)}},
        "topologyKey": spec.topology.level,
    }
    if spec.topology.required is not None:
        return {"requiredDuringSchedulingIgnoredDuringExecution": [term]}
    return {"preferredDuringSchedulingIgnoredDuringExecution": [
        {"weight": PREFERRED_AFFINITY_WEIGHT, "podAffinityTerm": term}]}


def merge_pod_affinity(affinity: dict[str, Any] | None, extra: dict[str, Any] | None) -> dict[str, Any] | None:
    """The user's affinity with the topology's pod affinity terms appended to its own lists."""
    if extra is None:
        return affinity
    merged = dict(affinity or {})
    pod_affinity = dict(merged.get("podAffinity") or {})
    for key, terms in extra.items():
        pod_affinity[key] = [*(pod_affinity.get(key) or []), *terms]
    merged["podAffinity"] = pod_affinity
    return merged


# ---- the PodGroups the reconcile observed -------------------------------------------------------------------


@dataclass(frozen=True)
class PodGroupView:
    """A PodGroup of the job as the reconcile saw it."""

    name: str
    attempt: int | None
    deleting: bool = False


@dataclass(frozen=True)
class GangObservation:
    """The job's PodGroups (of ``api_version``), or why that API cannot be used (``unavailable``)."""

    api_version: str
    pod_groups: tuple[PodGroupView, ...] = ()
    unavailable: str | None = None

    def has(self, name: str) -> bool:
        return any(group.name == name and not group.deleting for group in self.pod_groups)


def observe_pod_groups(items: Iterable[Mapping[str, Any]]) -> tuple[PodGroupView, ...]:
    """The views of listed PodGroups; the attempt from their label (None when it is missing or not a number)."""
    views = []
    for item in items:
        metadata = item.get("metadata") or {}
        attempt = str((metadata.get("labels") or {}).get(c.LABEL_ATTEMPT, ""))
        views.append(PodGroupView(str(metadata.get("name", "")), int(attempt) if attempt.isdigit() else None,
                                  bool(metadata.get("deletionTimestamp"))))
    return tuple(views)

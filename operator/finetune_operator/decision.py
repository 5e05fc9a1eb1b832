"""What ``decide`` and its policies share: the observed job, the decision they draft, what ``decide`` returns.

``ObservedJob`` is what the policies read; ``DecisionDraft`` is what they write (the next status, the actions, the
moments to look again); ``Decision`` and its actions are what the reconcile carries out.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from finetune_operator.gang import GangObservation
from finetune_operator.job_status import EventToEmit, JobStatus
from finetune_operator.pod_view import PodView
from finetune_operator.progress import ProgressSample
from finetune_operator.spec import FineTuneJob, JobSpec, parse_meta
from finetune_operator.workload import QueueObservation

# ---- what decide returns ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateChild:
    """Create a child if absent (409 is success); ``update_existing`` replaces the data of an existing one."""

    body: Mapping[str, Any]
    update_existing: bool = False

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])


@dataclass(frozen=True)
class DeletePod:
    """Delete a pod (404 is success)."""

    name: str


@dataclass(frozen=True)
class DeleteJob:
    """Delete the FineTuneJob itself (ttlSecondsAfterFinished); its children go with it."""


@dataclass(frozen=True)
class DeleteWorkload:
    """Delete the job's Kueue Workload (404 is success): the job left its queue, or its gang changed shape."""

    name: str


@dataclass(frozen=True)
class PatchWorkloadStatus:
    """Merge-patch the Kueue Workload's status (conditional on the resourceVersion the patch carries)."""

    name: str
    patch: Mapping[str, Any]


@dataclass(frozen=True)
class DeletePodGroup:
    """Delete a PodGroup of the job (404 is success): its attempt is over, or the job has no gang to schedule."""

    api_version: str
    name: str


Action = CreateChild | DeletePod | DeleteJob | DeleteWorkload | PatchWorkloadStatus | DeletePodGroup


@dataclass(frozen=True)
class Decision:
    """What to do for one job: the actions, the whole next status, the Events to emit, when to look again."""

    actions: tuple[Action, ...]
    status: dict[str, Any]
    events_to_emit: tuple[EventToEmit, ...] = ()
    # Seconds until a time-based transition (backoff over, a deadline); None when only changes matter.
    requeue_after: float | None = None


# ---- what the policies read ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObservedJob:
    """The parsed job on its current attempt, its pods grouped by attempt, and the Events about them."""

    job: FineTuneJob
    current: tuple[PodView, ...]
    stale: tuple[PodView, ...]
    missing: tuple[int, ...]
    events: Sequence[Mapping[str, Any]] = ()
    sample: ProgressSample | None = None
    # With spec.queueName: the Kueue Workload and what was read for it.
    queue: QueueObservation = field(default_factory=QueueObservation)
    # The image of pods whose spec names none (the operator's setting).
    trainer_image: str = ""
    # With spec.gang: the job's PodGroups, or why their API cannot be used.
    gang: GangObservation | None = None

    @property
    def spec(self) -> JobSpec:
        return self.job.spec


def observe_job(
    parsed: FineTuneJob,
    status: JobStatus,
    pods: Sequence[PodView],
    events: Sequence[Mapping[str, Any]] = (),
    sample: ProgressSample | None = None,
    queue: QueueObservation | None = None,
    trainer_image: str = "",
    gang: GangObservation | None = None,
) -> ObservedJob:
    """The job on its current attempt: the status's, or a newer one whose pods exist (a status write that was
    lost), which the status then records. ``current`` are that attempt's pods by rank, ``stale`` the others',
    ``missing`` the node ranks of the attempt without a pod."""
    attempt = max([status.get_int("attempt"), *(pod.attempt for pod in pods)])
    status.set_attempt(attempt)
    current = tuple(sorted((pod for pod in pods if pod.attempt == attempt), key=lambda pod: pod.rank))
    present = {pod.rank for pod in current}
    return ObservedJob(
        job=replace(parsed, attempt=attempt),
        current=current,
        stale=tuple(pod for pod in pods if pod.attempt != attempt),
        missing=tuple(rank for rank in range(parsed.spec.distributed.nodes) if rank not in present),
        events=events,
        sample=sample,
        queue=queue or QueueObservation(),
        trainer_image=trainer_image,
        gang=gang,
    )


# ---- what the policies write -----------------------------------------------------------------------------


@dataclass
class DecisionDraft:
    """The decision as the steps of ``decide`` build it: the next status, the actions, the moments to look again."""

    status: JobStatus
    # Every pod of the job, whatever its attempt: cleanPodPolicy applies to all of them.
    pods: Sequence[PodView]
    clean_pod_policy: str
    actions: list[Action] = field(default_factory=list)
    requeue: list[datetime.datetime] = field(default_factory=list)

    @property
    def now(self) -> datetime.datetime:
        return self.status.now

    def requeue_at(self, moment: datetime.datetime) -> None:
        self.requeue.append(moment)

    def delete_pods(self, pods: Iterable[PodView]) -> None:
        """Delete the pods that are not already going away."""
        self.actions += [DeletePod(pod.name) for pod in pods if not pod.deleting]

    def clean_pods(self) -> None:
        """cleanPodPolicy on a finished job: All pods, the Running (not yet finished) ones, or None."""
        if self.clean_pod_policy != "None":
            self.delete_pods(pod for pod in self.pods if self.clean_pod_policy == "All" or pod.active)

    def finish(self, *, succeeded: bool, reason: str, message: str) -> None:
        """Enter Succeeded or Failed and clean the pods by policy."""
        self.status.finish(succeeded=succeeded, reason=reason, message=message)
        self.clean_pods()

    def decision(self) -> Decision:
        later = [(moment - self.now).total_seconds() for moment in self.requeue]
        return Decision(
            actions=tuple(self.actions),
            status=self.status.finalize(),
            events_to_emit=self.status.events_to_emit(),
            requeue_after=max(0.0, min(later)) if later else None,
        )


def start_draft(body: Mapping[str, Any], pods: Sequence[PodView], now: datetime.datetime) -> DecisionDraft:
    """An empty decision for a FineTuneJob: its status as it is, its pods, no action yet."""
    current = body.get("status")
    status = JobStatus(current if isinstance(current, Mapping) else {}, now, parse_meta(body).generation)
    return DecisionDraft(status, pods, _clean_pod_policy(body))


def _clean_pod_policy(body: Mapping[str, Any]) -> str:
    """spec.cleanPodPolicy read without parsing the spec, so that a job failed for an invalid spec is cleaned too
    (the parser accepts the same three values and the same default)."""
    spec = body.get("spec")
    policy = spec.get("cleanPodPolicy") if isinstance(spec, Mapping) else None
    return policy if policy in ("All", "Running", "None") else "All"


# A step of ``decide``: it adds to the draft and returns True when the decision is complete (no later step runs).
Policy = Callable[[ObservedJob, DecisionDraft], bool]

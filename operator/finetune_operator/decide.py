"""The reconcile decision: from a FineTuneJob, its pods, their events and the time to actions and the next status.

``decide`` is a pure function (no client, no clock) written as one flat list of steps, in the order of
kubernetes-sigs/jobset's reconcile: observe the pods, accept the spec (``invalid_spec_policy``), then run the
policies of ``POLICIES`` in turn, each in its own module (finished jobs and their TTL, older attempts' pods,
suspension, success, a missing PodGroup or Workload API, Kueue admission, gang failure, the active deadline, restart
backoff, refused pod creates, the startup deadline, capacity); the first that completes the decision ends it.
Otherwise the missing children of the gang are created and Running and the progress recorded. Last, a Kueue
Workload follows the job (Finished, or deleted on suspend), and so do the gang scheduler's PodGroups
(``gang_policy``).
The status it returns is the whole next status; the caller writes it in one patch when it differs.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from finetune_operator import constants as c
from finetune_operator.builders import build_config_map, build_pod_group, build_service, build_worker_pod
from finetune_operator.capacity_policy import wait_for_capacity
from finetune_operator.deadline_policy import fail_past_active_deadline, fail_past_startup_deadline
from finetune_operator.decision import (
    CreateChild,
    Decision,
    DecisionDraft,
    ObservedJob,
    Policy,
    observe_job,
    start_draft,
)
from finetune_operator.failure_policy import delete_stale_pods, restart_or_fail, wait_for_restart
from finetune_operator.gang import GangObservation, pod_group_name
from finetune_operator.gang_policy import fail_without_pod_group_api, release_pod_groups
from finetune_operator.invalid_spec_policy import accept_spec
from finetune_operator.job_status import EventToEmit
from finetune_operator.pod_creation import fail_on_refused_creates
from finetune_operator.pod_view import observe_pods
from finetune_operator.progress import ProgressSample
from finetune_operator.queue_policy import (
    fail_without_workload_api,
    finish_workload,
    release_workload,
    wait_for_admission,
)
from finetune_operator.spec import parse_meta
from finetune_operator.success_policy import finish_on_success
from finetune_operator.suspend_policy import suspend
from finetune_operator.tracking_status import record_tracking
from finetune_operator.ttl_after_finished import keep_finished
from finetune_operator.workload import QueueObservation

__all__ = ["CreateChild", "Decision", "DecideSettings", "EventToEmit", "decide"]


class DecideSettings(Protocol):
    """What the decision needs from the operator's settings."""

    @property
    def trainer_image(self) -> str: ...


# ---- the steps ------------------------------------------------------------------------------------------


def _create_gang(observed: ObservedJob, draft: DecisionDraft, trainer_image: str) -> None:
    """The Service, the ConfigMap (its config names the attempt) and the attempt's PodGroup, then every missing
    pod; the job enters Pending when it was new, suspended or restarting."""
    job, status = observed.job, draft.status
    if observed.missing:
        placement = observed.queue.placement
        draft.actions.append(CreateChild(build_service(job)))
        draft.actions.append(CreateChild(build_config_map(job), update_existing=True))
        pod_group = build_pod_group(job)
        present = observed.gang is not None and observed.gang.has(pod_group_name(job.name, job.attempt))
        if pod_group is not None and not present:
            draft.actions.append(CreateChild(pod_group))
        draft.actions += [CreateChild(build_worker_pod(job, rank, trainer_image, placement))
                          for rank in observed.missing]
    status.clear_time("restartAfter")
    if status.phase not in (None, c.PHASE_SUSPENDED, c.PHASE_RESTARTING, c.PHASE_QUEUED):
        return
    if status.phase == c.PHASE_SUSPENDED:
        reason, verb = c.REASON_RESUMED, "Resumed"
        status.clear_condition(c.CONDITION_SUSPENDED, c.REASON_RESUMED, "spec.suspend is false")
    elif status.phase == c.PHASE_RESTARTING:
        reason, verb = c.REASON_RESTARTED, "Restarted"
    elif status.phase == c.PHASE_QUEUED:
        reason, verb = c.REASON_ADMITTED, "Admitted"
    else:
        reason, verb = c.REASON_CREATED, "Created"
    status.enter(c.PHASE_PENDING, reason,
                 f"{verb}: attempt {job.attempt} with {job.spec.distributed.nodes} pod(s) is starting")


def _record_running(observed: ObservedJob, draft: DecisionDraft) -> None:
    """Running once every pod of the attempt runs; startTime is the first time that happened."""
    status, nodes, attempt = draft.status, observed.spec.distributed.nodes, observed.job.attempt
    running = [pod for pod in observed.current if pod.phase == "Running" and not pod.deleting]
    if len(running) == nodes:
        if status.phase != c.PHASE_RUNNING:
            status.enter(c.PHASE_RUNNING, c.REASON_ALL_PODS_RUNNING, f"Attempt {attempt}: all {nodes} pod(s) running")
            status.set_condition(c.CONDITION_RUNNING, True, c.REASON_ALL_PODS_RUNNING, _running_message(attempt))
        if status.time("startTime") is None:
            status.set_time("startTime", draft.now)
            if observed.spec.active_deadline_seconds is not None:
                draft.requeue_at(draft.now + datetime.timedelta(seconds=observed.spec.active_deadline_seconds))
    elif status.phase == c.PHASE_PENDING:
        # The same wording from the first reconcile on, so the status changes only when the count does.
        waiting = status.condition(c.CONDITION_WAITING_FOR_CAPACITY) or {}
        capacity = f"; waiting for capacity: {waiting['message']}" if waiting.get("status") == "True" else ""
        status.set_message(f"Attempt {attempt}: {len(running)} of {nodes} pod(s) running{capacity}")


def _running_message(attempt: int) -> str:
    return f"attempt {attempt}: all pods running"


def _record_progress(observed: ObservedJob, draft: DecisionDraft) -> None:
    """Progress, data preparation and training metrics from rank 0's endpoint, read by the caller while the gang
    runs."""
    if observed.sample is not None and draft.status.phase == c.PHASE_RUNNING:
        draft.status.record_data_preparation(observed.sample, _running_message(observed.job.attempt))
        draft.status.record_progress(observed.sample, observed.spec.output.uri, observed.spec.distributed.world_size)
        record_tracking(draft.status, observed.sample, observed.spec)


# The policies after the spec is accepted, in order; the first that completes the decision ends it.
POLICIES: tuple[Policy, ...] = (
    # Finished jobs stay finished: cleanPodPolicy on what is left, the job deleted after its TTL.
    keep_finished,
    # Pods of older attempts are garbage (the restart already recorded why they stopped).
    delete_stale_pods,
    # Suspend: no pods at all; a gang that had started comes back as a new attempt on resume.
    suspend,
    # Success: node rank 0 finished training and exported the model.
    finish_on_success,
    # Gang scheduling (spec.gang): a cluster that does not serve the PodGroup API fails the job before any pod is
    # handed to a scheduler that is not there.
    fail_without_pod_group_api,
    # Kueue (spec.queueName): a cluster that does not serve the Workload API (or forbids it) fails the job, as
    # nothing would ever admit it.
    fail_without_workload_api,
    # Kueue (spec.queueName): no pods until the Workload is admitted; an eviction stops the gang, which comes back
    # as the next attempt (not counted) once Kueue admits it again.
    wait_for_admission,
    # Gang failure: a failed pod fails the attempt, and so does a pod that vanished after the gang started (the
    # surviving ranks cannot re-rendezvous with a replacement). Permanent errors fail the job; the rest restart
    # it, counted against backoffLimit unless the platform caused them.
    restart_or_fail,
    # activeDeadlineSeconds, counted from the first moment all pods ran (since the last resume).
    fail_past_active_deadline,
    # Restart backoff: the next attempt waits for restartAfter and for the old gang to stop, so it resumes from the
    # emergency checkpoint the old ranks are still writing and never shares their hostnames.
    wait_for_restart,
    # Pods the API refused to create (recorded by the reconcile in PodCreateFailed): a permanent refusal fails the
    # job at once, any other once startupDeadlineSeconds have passed since the first.
    fail_on_refused_creates,
    # startupDeadlineSeconds: a scheduled pod that cannot start (image pulls, bad config refs, stuck creation).
    fail_past_startup_deadline,
    # Capacity: unscheduled pods with FailedScheduling / autoscaler events wait, with the scheduler's words in
    # WaitingForCapacity, for capacityTimeoutSeconds counted from when the waiting began.
    wait_for_capacity,
)


def decide(
    job: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    now: datetime.datetime,
    settings: DecideSettings,
    sample: ProgressSample | None = None,
    queue: QueueObservation | None = None,
    gang: GangObservation | None = None,
) -> Decision:
    """What to do next for one FineTuneJob (the raw object, its labelled pods, those pods' Events, with
    spec.queueName its Kueue Workload, with spec.gang its PodGroups)."""
    # A job being deleted is left to the garbage collector, which removes its children.
    if parse_meta(job).deleting:
        return Decision((), dict(job.get("status") or {}))
    draft = start_draft(job, observe_pods(pods), now)
    # An invalid spec fails the job with an InvalidSpec condition naming the field (its Workload is Finished: the
    # quota is free at once); a corrected one starts it again.
    parsed = accept_spec(job, draft)
    if parsed is None:
        finish_workload(queue, draft)
        release_pod_groups(gang, draft)
        return draft.decision()
    # The current attempt and its pods, then the policies in order.
    observed = observe_job(parsed, draft.status, draft.pods, events, sample, queue, settings.trainer_image, gang)
    for policy in POLICIES:
        if policy(observed, draft):
            break
    else:
        # Nothing stands in the way: create what is missing of the gang (names are deterministic, so creating is
        # idempotent), then record Running and the progress.
        _create_gang(observed, draft, settings.trainer_image)
        _record_running(observed, draft)
        _record_progress(observed, draft)
    # Kueue: a finished job frees its quota at once, a suspended one leaves the queue. PodGroups of past attempts
    # go, and the current one once the job has no gang to schedule.
    release_workload(observed, draft)
    release_pod_groups(gang, draft)
    return draft.decision()

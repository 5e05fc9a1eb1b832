"""The reconcile decision: from a FineTuneJob, its pods, their events and the time to actions and the next status.

``decide`` is a pure function (no client, no clock) written as one flat list of steps, in the order of
kubernetes-sigs/jobset's reconcile: observe the pods, finished jobs, invalid specs, suspension, success, gang
failure, deadlines, restart backoff, startup and capacity problems, creating the gang, Running, progress.
The status it returns is the whole next status; the caller writes it in one patch when it differs.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from finetune_operator import constants as c
from finetune_operator.builders import build_config_map, build_service, build_worker_pod
from finetune_operator.job_status import EventToEmit, JobStatus
from finetune_operator.pod_creation import create_refusal_verdict
from finetune_operator.pod_view import PodView, observe_pod
from finetune_operator.progress import ProgressSample, sample_from_result
from finetune_operator.spec import (
    FineTuneJob,
    InvalidSpecError,
    parse_job,
    parse_meta,
    parse_time,
)


class DecideSettings(Protocol):
    """What the decision needs from the operator's settings."""

    @property
    def trainer_image(self) -> str: ...


# ---- the decision --------------------------------------------------------------------------------------


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


Action = CreateChild | DeletePod | DeleteJob


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...]
    status: dict[str, Any]
    events_to_emit: tuple[EventToEmit, ...] = ()
    # Seconds until a time-based transition (backoff over, a deadline); None when only changes matter.
    requeue_after: float | None = None


# ---- helpers for the steps -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Failure:
    counted: bool
    permanent: bool
    reason: str
    message: str


def _describe_exit(pod: PodView) -> str:
    parts = [f"pod {pod.name}"]
    if pod.exit_code is not None:
        parts.append(f"exited with code {pod.exit_code}")
    else:
        parts.append("failed")
    if pod.termination_reason and pod.termination_reason not in ("Error", "Completed"):
        parts.append(f"({pod.termination_reason})")
    if pod.pod_reason:
        parts.append(f"[{pod.pod_reason}]")
    text = " ".join(parts)
    if pod.termination_message:
        text += f": {pod.termination_message.strip()}"
    return text


def _classify_gang_failure(job: FineTuneJob, failed: Sequence[PodView], current: Sequence[PodView]) -> _Failure:
    """Why the attempt failed, and whether it counts against backoffLimit.

    A permanent error anywhere wins. Otherwise any sign of the platform (preemption exit code, eviction, node
    loss, a DisruptionTarget condition on any pod of the gang) makes the failure uncounted: the other ranks then
    fail only because a peer vanished, and counting those would let spot preemptions exhaust the budget.
    """
    for pod in failed:
        if pod.exit_code == c.EXIT_INVALID:
            return _Failure(False, True, c.REASON_PERMANENT_ERROR, f"{_describe_exit(pod)} (permanent error: "
                            "the config or the data is wrong; not retried)")
    for pod in current:
        if pod.disrupted:
            return _Failure(False, False, c.REASON_DISRUPTED, f"{_describe_exit(pod)} (disrupted by the platform)")
    for pod in failed:
        if pod.exit_code == c.EXIT_PREEMPTED:
            return _Failure(False, False, c.REASON_PREEMPTED, f"{_describe_exit(pod)} (preempted; checkpoint saved)")
    for pod in failed:
        if pod.exit_code is not None and pod.exit_code in job.spec.retryable_exit_codes:
            return _Failure(False, False, c.REASON_RETRYABLE_EXIT_CODE,
                            f"{_describe_exit(pod)} (in retryableExitCodes)")
    first = min(failed, key=lambda p: p.rank)
    return _Failure(True, False, c.REASON_POD_FAILED, _describe_exit(first))


def _capacity_signal(pod: PodView, events: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    """(reason, message) of the newest scheduler/autoscaler event about an unscheduled pod, else its condition."""
    best: tuple[datetime.datetime, str, str] | None = None
    epoch = datetime.datetime.min.replace(tzinfo=datetime.UTC)
    for event in events:
        involved = event.get("involvedObject") or event.get("regarding") or {}
        if involved.get("name") != pod.name or event.get("reason") not in c.CAPACITY_EVENT_REASONS:
            continue
        when = (
            parse_time(event.get("lastTimestamp"))
            or parse_time((event.get("series") or {}).get("lastObservedTime"))
            or parse_time(event.get("eventTime"))
            or parse_time(event.get("firstTimestamp"))
            or parse_time((event.get("metadata") or {}).get("creationTimestamp"))
            or epoch
        )
        if best is None or when >= best[0]:
            best = (when, str(event["reason"]), str(event.get("message") or event.get("note") or ""))
    if best is not None:
        return best[1], best[2]
    if pod.unschedulable_message is not None:
        return "FailedScheduling", pod.unschedulable_message
    return None


def _cleanup_actions(policy: str, pods: Sequence[PodView]) -> list[Action]:
    """cleanPodPolicy on a finished job: All pods, the Running (not yet finished) ones, or None."""
    if policy == "None":
        return []
    return [DeletePod(p.name) for p in pods if not p.deleting and (policy == "All" or p.active)]


def _raw_clean_policy(body: Mapping[str, Any]) -> str:
    spec = body.get("spec")
    policy = spec.get("cleanPodPolicy") if isinstance(spec, Mapping) else None
    return policy if policy in ("All", "Running", "None") else "All"


def _finish(
    status: JobStatus,
    pods: Sequence[PodView],
    clean_policy: str,
    *,
    succeeded: bool,
    reason: str,
    message: str,
) -> list[Action]:
    """Enter Succeeded or Failed, pods cleaned by policy."""
    status.finish(succeeded=succeeded, reason=reason, message=message)
    return _cleanup_actions(clean_policy, pods)


# ---- decide ---------------------------------------------------------------------------------------------


def decide(
    job: Mapping[str, Any],
    pods: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    now: datetime.datetime,
    settings: DecideSettings,
    sample: ProgressSample | None = None,
) -> Decision:
    """What to do next for one FineTuneJob (the raw object, its labelled pods, those pods' Events)."""
    meta = parse_meta(job)
    current_status = job.get("status")
    status = JobStatus(current_status if isinstance(current_status, Mapping) else {}, now, meta.generation)
    actions: list[Action] = []
    requeue: list[datetime.datetime] = []

    def done() -> Decision:
        later = [(moment - now).total_seconds() for moment in requeue]
        return Decision(
            actions=tuple(actions),
            status=status.finalize(),
            events_to_emit=status.events_to_emit(),
            requeue_after=max(0.0, min(later)) if later else None,
        )

    # 1. A job being deleted is left to the garbage collector, which removes its children.
    if meta.deleting:
        return Decision((), dict(current_status or {}))

    # 2. Observe the pods: ours (rank and attempt labels), grouped by attempt.
    views = [v for v in (observe_pod(p) for p in pods) if v is not None]

    # 3. Parse the spec. An invalid one fails the job with an InvalidSpec condition naming the field; a later
    #    edit that fixes it (a new generation) starts the job again.
    try:
        parsed = parse_job(job)
    except InvalidSpecError as error:
        if status.phase in c.FINISHED_PHASES and not status.condition_true(c.CONDITION_INVALID_SPEC):
            return done()
        message = str(error)
        status.set_condition(c.CONDITION_INVALID_SPEC, True, c.REASON_INVALID_SPEC, message)
        actions += _finish(status, views, _raw_clean_policy(job), succeeded=False,
                           reason=c.REASON_INVALID_SPEC, message=message)
        if status.old_phase == c.PHASE_FAILED:
            # Already failed for this reason: keep the original completion time.
            status.keep_completion_time()
        return done()
    spec = parsed.spec
    if status.condition_true(c.CONDITION_INVALID_SPEC):
        status.set_condition(c.CONDITION_INVALID_SPEC, False, c.REASON_SPEC_VALID, "the spec is valid")
        if status.phase == c.PHASE_FAILED:
            # Start over as a new job; a new attempt number keeps any pods left behind out of the way.
            status.reopen(c.REASON_SPEC_VALID, "the spec was corrected")
            if views:
                status.set_attempt(max(v.attempt for v in views) + 1)

    # 4. The current attempt: the status's, or a newer one whose pods exist (a status write that was lost).
    attempt = max([status.get_int("attempt"), *(v.attempt for v in views)])
    job_now = replace(parsed, attempt=attempt)
    status.set_attempt(attempt)
    current = sorted((v for v in views if v.attempt == attempt), key=lambda v: v.rank)
    stale = [v for v in views if v.attempt != attempt]

    # 5. Finished jobs stay finished: apply cleanPodPolicy to what is left and delete the job after its TTL.
    if status.phase in c.FINISHED_PHASES:
        actions += _cleanup_actions(spec.clean_pod_policy, views)
        finished_at = status.time("completionTime")
        if finished_at is None:
            finished_at = now
            status.set_time("completionTime", now)
        if spec.ttl_seconds_after_finished is not None:
            expires = finished_at + datetime.timedelta(seconds=spec.ttl_seconds_after_finished)
            if now >= expires:
                actions.append(DeleteJob())
            else:
                requeue.append(expires)
        return done()

    # 6. Pods of older attempts are garbage: delete them (the restart already recorded why they stopped).
    actions += [DeletePod(v.name) for v in stale if not v.deleting]

    # 7. Suspend: no pods at all. A gang that had started comes back as a new attempt on resume.
    if spec.suspend:
        actions += [DeletePod(v.name) for v in current if not v.deleting]
        if status.phase != c.PHASE_SUSPENDED:
            if current:
                status.record_restart()
            status.enter(c.PHASE_SUSPENDED, c.REASON_SUSPENDED, "Suspended: the job has no pods until resumed")
            status.set_condition(c.CONDITION_SUSPENDED, True, c.REASON_SUSPENDED, "spec.suspend is true")
            status.clear_condition(c.CONDITION_RUNNING, c.REASON_SUSPENDED, "the job is suspended")
            status.clear_condition(c.CONDITION_WAITING_FOR_CAPACITY, c.REASON_SUSPENDED, "the job is suspended")
            # The active deadline counts running time since the last resume, as for a Kubernetes Job.
            status.clear_time("startTime")
            status.clear_time("restartAfter")
        return done()
    resuming = status.phase == c.PHASE_SUSPENDED

    # 8. Success: node rank 0 finished training and exported the model.
    rank0 = next((v for v in current if v.rank == 0), None)
    if rank0 is not None and rank0.phase == "Succeeded":
        model_uri = spec.output.model_uri
        status.record_model(model_uri, spec.export)
        # The trainer's final summary (termination message) is authoritative; the last scrape may be older.
        final = sample_from_result(rank0.termination_message) or sample
        if final is not None:
            status.record_progress(final, spec.output, spec.distributed.world_size)
        actions += _finish(status, views, spec.clean_pod_policy, succeeded=True,
                           reason=c.REASON_SUCCEEDED, message=f"Model written to {model_uri}")
        return done()

    # 9. Gang failure: a failed pod fails the attempt, and so does a pod that vanished after the gang started
    #    (the surviving ranks cannot re-rendezvous with a replacement). Permanent errors fail the job; the rest
    #    restart it, counted against backoffLimit unless the platform caused them.
    failed = [v for v in current if v.phase == "Failed"]
    present = {v.rank for v in current}
    missing = [rank for rank in range(spec.distributed.nodes) if rank not in present]
    failure: _Failure | None = None
    if failed:
        failure = _classify_gang_failure(job_now, failed, current)
    elif missing and status.phase == c.PHASE_RUNNING:
        names = ", ".join(f"node rank {rank}" for rank in missing)
        failure = _Failure(False, False, c.REASON_POD_MISSING, f"the pod of {names} was deleted while running")
    if failure is not None:
        if failure.permanent:
            actions += _finish(status, views, spec.clean_pod_policy, succeeded=False,
                               reason=c.REASON_PERMANENT_ERROR, message=failure.message)
            return done()
        counted = status.record_failure(failure.counted)
        if counted > spec.backoff_limit:
            message = f"{failure.message}; {counted} counted failures exceed backoffLimit {spec.backoff_limit}"
            actions += _finish(status, views, spec.clean_pod_policy, succeeded=False,
                               reason=c.REASON_BACKOFF_LIMIT_EXCEEDED, message=message)
            return done()
        restarts = status.get_int("restarts")
        delay = spec.restart_backoff.delay(restarts)
        restart_after = now + datetime.timedelta(seconds=delay)
        status.record_restart(restart_after)
        counted_text = "counted" if failure.counted else "not counted"
        status.enter(
            c.PHASE_RESTARTING,
            failure.reason,
            f"Attempt {attempt} failed: {failure.message} ({counted_text}: {counted}/{spec.backoff_limit} "
            f"failures); attempt {attempt + 1} starts in {delay}s",
            c.EVENT_WARNING,
        )
        status.clear_condition(c.CONDITION_RUNNING, failure.reason, failure.message)
        status.clear_condition(c.CONDITION_WAITING_FOR_CAPACITY, failure.reason, "the attempt failed")
        actions += [DeletePod(v.name) for v in current if not v.deleting]
        requeue.append(restart_after)
        return done()

    # 10. activeDeadlineSeconds: counted from the first moment all pods ran (since the last resume).
    started = status.time("startTime")
    if spec.active_deadline_seconds is not None and started is not None:
        deadline = started + datetime.timedelta(seconds=spec.active_deadline_seconds)
        if now >= deadline:
            actions += _finish(status, views, spec.clean_pod_policy, succeeded=False,
                               reason=c.REASON_DEADLINE_EXCEEDED,
                               message=f"Running longer than activeDeadlineSeconds {spec.active_deadline_seconds}")
            return done()
        requeue.append(deadline)

    # 11. Restart backoff: the next attempt waits for restartAfter and for the old gang to stop, so it resumes
    #     from the emergency checkpoint the old ranks are still writing and never shares their hostnames.
    if status.phase == c.PHASE_RESTARTING:
        restart_after_time = status.time("restartAfter")
        if restart_after_time is not None and now < restart_after_time:
            requeue.append(restart_after_time)
            return done()
    if not current and any(v.active for v in stale):
        return done()

    # 12a. Pods the API refused to create (the reconcile records the refusal in PodCreateFailed): a permanent
    #      refusal fails the job at once, any other once startupDeadlineSeconds have passed since the first.
    refusal = create_refusal_verdict(status, spec.startup_deadline_seconds, all_created=not missing)
    if refusal.failure is not None:
        actions += _finish(status, views, spec.clean_pod_policy, succeeded=False, reason=refusal.failure[0],
                           message=refusal.failure[1])
        return done()
    if refusal.retry_until is not None:
        requeue.append(refusal.retry_until)

    # 12. Startup deadline: a scheduled pod that cannot start (image pulls, bad config refs, stuck creation).
    for pod in current:
        if pod.phase != "Pending" or not pod.scheduled or pod.scheduled_at is None:
            continue
        deadline = pod.scheduled_at + datetime.timedelta(seconds=spec.startup_deadline_seconds)
        if now < deadline:
            requeue.append(deadline)
            continue
        reason = pod.waiting_reason if pod.waiting_reason in c.STARTUP_FAILURE_REASONS else c.REASON_CONTAINER_CREATING
        detail = f": {pod.waiting_message}" if pod.waiting_message else ""
        message = (f"pod {pod.name} is not running {spec.startup_deadline_seconds}s after it was scheduled "
                   f"({reason}{detail}; startupDeadlineSeconds {spec.startup_deadline_seconds})")
        actions += _finish(status, views, spec.clean_pod_policy, succeeded=False, reason=reason,
                           message=message)
        return done()

    # 13. Capacity: unscheduled pods with FailedScheduling / autoscaler events wait, with the scheduler's words
    #     in WaitingForCapacity, for capacityTimeoutSeconds counted from when the waiting began.
    signals = [
        (pod, signal)
        for pod in current
        if pod.phase == "Pending" and not pod.scheduled
        for signal in [_capacity_signal(pod, events)]
        if signal is not None
    ]
    if signals:
        pod, (reason, message) = signals[0]
        was_waiting = status.condition_true(c.CONDITION_WAITING_FOR_CAPACITY)
        status.set_condition(c.CONDITION_WAITING_FOR_CAPACITY, True, reason, message)
        if not was_waiting:
            status.emit(c.EVENT_WARNING, c.CONDITION_WAITING_FOR_CAPACITY, f"pod {pod.name}: {message}")
        waiting = status.condition(c.CONDITION_WAITING_FOR_CAPACITY) or {}
        since = parse_time(waiting.get("lastTransitionTime")) or now
        timeout_at = since + datetime.timedelta(seconds=spec.capacity_timeout_seconds)
        if now >= timeout_at:
            actions += _finish(
                status, views, spec.clean_pod_policy, succeeded=False, reason=c.REASON_CAPACITY_TIMEOUT,
                message=f"No capacity for {spec.capacity_timeout_seconds}s (capacityTimeoutSeconds): {message}",
            )
            return done()
        requeue.append(timeout_at)
    else:
        status.clear_condition(c.CONDITION_WAITING_FOR_CAPACITY, c.REASON_CAPACITY_AVAILABLE,
                               "every pod is scheduled or waiting for nothing")

    # 14. Create the gang of the current attempt: the Service and the ConfigMap (its config names the attempt),
    #     then every missing pod. Names are deterministic, so creating is idempotent.
    if missing:
        actions.append(CreateChild(build_service(job_now)))
        actions.append(CreateChild(build_config_map(job_now), update_existing=True))
        actions += [CreateChild(build_worker_pod(job_now, rank, settings.trainer_image)) for rank in missing]
    status.clear_time("restartAfter")
    if status.phase in (None, c.PHASE_SUSPENDED, c.PHASE_RESTARTING):
        if resuming:
            reason, verb = c.REASON_RESUMED, "Resumed"
            status.clear_condition(c.CONDITION_SUSPENDED, c.REASON_RESUMED, "spec.suspend is false")
        elif status.phase == c.PHASE_RESTARTING:
            reason, verb = c.REASON_RESTARTED, "Restarted"
        else:
            reason, verb = c.REASON_CREATED, "Created"
        status.enter(c.PHASE_PENDING, reason,
                     f"{verb}: attempt {attempt} with {spec.distributed.nodes} pod(s) is starting")

    # 15. Running: every pod of the attempt runs. startTime is the first time that happened.
    running = [v for v in current if v.phase == "Running" and not v.deleting]
    if len(running) == spec.distributed.nodes:
        if status.phase != c.PHASE_RUNNING:
            status.enter(c.PHASE_RUNNING, c.REASON_ALL_PODS_RUNNING,
                         f"Attempt {attempt}: all {spec.distributed.nodes} pod(s) running")
            status.set_condition(c.CONDITION_RUNNING, True, c.REASON_ALL_PODS_RUNNING,
                                 f"attempt {attempt}: all pods running")
        if status.time("startTime") is None:
            status.set_time("startTime", now)
            if spec.active_deadline_seconds is not None:
                requeue.append(now + datetime.timedelta(seconds=spec.active_deadline_seconds))
    elif status.phase == c.PHASE_PENDING:
        # The same wording from the first reconcile on, so the status changes only when the count does.
        status.set_message(f"Attempt {attempt}: {len(running)} of {spec.distributed.nodes} pod(s) running"
                           + (f"; waiting for capacity: {signals[0][1][1]}" if signals else ""))

    # 16. Progress and training metrics from rank 0's endpoint, read by the caller while the gang runs.
    if sample is not None and status.phase == c.PHASE_RUNNING:
        status.record_progress(sample, spec.output, spec.distributed.world_size)
    return done()

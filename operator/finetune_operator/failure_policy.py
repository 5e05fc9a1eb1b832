"""Gang failure: a failed attempt fails the job or restarts the whole gang as the next attempt after a backoff.

A permanent error or an exhausted backoffLimit fails the job; anything else restarts it, and disruptions by the
platform (preemption, eviction, node loss) do not count against backoffLimit.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass

from finetune_operator import constants as c
from finetune_operator.decision import DecisionDraft, ObservedJob
from finetune_operator.model_verification import record_model_verification
from finetune_operator.pod_view import PodView
from finetune_operator.spec import FineTuneJob


@dataclass(frozen=True)
class GangFailure:
    """Why an attempt failed; ``counted`` against backoffLimit, ``permanent`` when no retry can help."""

    counted: bool
    permanent: bool
    reason: str
    message: str


def describe_exit(pod: PodView) -> str:
    """The pod, its exit code, the kubelet's and the pod's reasons and the termination message, in one line."""
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


def classify_gang_failure(job: FineTuneJob, failed: Sequence[PodView], current: Sequence[PodView]) -> GangFailure:
    """Why the attempt failed, and whether it counts against backoffLimit.

    A permanent error anywhere wins. Otherwise any sign of the platform (preemption exit code, eviction, node
    loss, a DisruptionTarget condition on any pod of the gang) makes the failure uncounted: the other ranks then
    fail only because a peer vanished, and counting those would let spot preemptions exhaust the budget.
    """
    for pod in failed:
        if pod.exit_code == c.EXIT_INVALID:
            return GangFailure(False, True, c.REASON_PERMANENT_ERROR, f"{describe_exit(pod)} (permanent error: "
                               "the config or the data is wrong; not retried)")
    for pod in current:
        if pod.disrupted:
            return GangFailure(False, False, c.REASON_DISRUPTED, f"{describe_exit(pod)} (disrupted by the platform)")
    for pod in failed:
        if pod.exit_code == c.EXIT_PREEMPTED:
            return GangFailure(False, False, c.REASON_PREEMPTED, f"{describe_exit(pod)} (preempted; checkpoint saved)")
    for pod in failed:
        if pod.exit_code is not None and pod.exit_code in job.spec.retryable_exit_codes:
            return GangFailure(False, False, c.REASON_RETRYABLE_EXIT_CODE,
                               f"{describe_exit(pod)} (in retryableExitCodes)")
    first = min(failed, key=lambda p: p.rank)
    return GangFailure(True, False, c.REASON_POD_FAILED, describe_exit(first))


def gang_failure(observed: ObservedJob, phase: str | None) -> GangFailure | None:
    """Why the current attempt failed, or None while it has not: a failed pod fails it, and so does a pod that
    vanished after the gang started (the surviving ranks cannot re-rendezvous with a replacement)."""
    failed = [pod for pod in observed.current if pod.phase == "Failed"]
    if failed:
        return classify_gang_failure(observed.job, failed, observed.current)
    if observed.missing and phase == c.PHASE_RUNNING:
        names = ", ".join(f"node rank {rank}" for rank in observed.missing)
        return GangFailure(False, False, c.REASON_POD_MISSING, f"the pod of {names} was deleted while running")
    return None


def restart_or_fail(observed: ObservedJob, draft: DecisionDraft) -> bool:
    """Complete the decision when the attempt failed: a permanent error or an exhausted backoffLimit fails the job,
    anything else restarts the gang as the next attempt after the restart backoff."""
    status, spec, attempt = draft.status, observed.spec, observed.job.attempt
    failure = gang_failure(observed, status.phase)
    if failure is None:
        return False
    if failure.permanent:
        # A failed check of the exported model is a permanent error: ModelVerified=False names the file.
        record_model_verification(status, observed.current)
        draft.finish(succeeded=False, reason=c.REASON_PERMANENT_ERROR, message=failure.message)
        return True
    counted = status.record_failure(failure.counted)
    if counted > spec.backoff_limit:
        message = f"{failure.message}; {counted} counted failures exceed backoffLimit {spec.backoff_limit}"
        draft.finish(succeeded=False, reason=c.REASON_BACKOFF_LIMIT_EXCEEDED, message=message)
        return True
    delay = spec.restart_backoff.delay(status.get_int("restarts"))
    restart_after = draft.now + datetime.timedelta(seconds=delay)
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
    draft.delete_pods(observed.current)
    draft.requeue_at(restart_after)
    return True


def wait_for_restart(observed: ObservedJob, draft: DecisionDraft) -> bool:
    """Complete the decision (nothing to create yet) until restartAfter has passed and the previous attempt's pods
    have stopped: the next attempt resumes from the emergency checkpoint the old ranks are still writing and never
    shares their hostnames."""
    status = draft.status
    if status.phase == c.PHASE_RESTARTING:
        restart_after = status.time("restartAfter")
        if restart_after is not None and draft.now < restart_after:
            draft.requeue_at(restart_after)
            return True
    return not observed.current and any(pod.active for pod in observed.stale)


def delete_stale_pods(observed: ObservedJob, draft: DecisionDraft) -> bool:
    """Delete the pods of older attempts (the restart already recorded why they stopped); never completes."""
    draft.delete_pods(observed.stale)
    return False

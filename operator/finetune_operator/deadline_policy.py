"""Deadlines: activeDeadlineSeconds bounds a job's running time, startupDeadlineSeconds a scheduled pod's start."""

from __future__ import annotations

import datetime

from finetune_operator import constants as c
from finetune_operator.decision import DecisionDraft, ObservedJob


def fail_past_active_deadline(observed: ObservedJob, draft: DecisionDraft) -> bool:
    """Fail the job once it has run activeDeadlineSeconds, counted from the first moment all its pods ran (since
    the last resume); until then, look again at the deadline."""
    seconds = observed.spec.active_deadline_seconds
    started = draft.status.time("startTime")
    if seconds is None or started is None:
        return False
    deadline = started + datetime.timedelta(seconds=seconds)
    if draft.now < deadline:
        draft.requeue_at(deadline)
        return False
    draft.finish(succeeded=False, reason=c.REASON_DEADLINE_EXCEEDED,
                 message=f"Running longer than activeDeadlineSeconds {seconds}")
    return True


def fail_past_startup_deadline(observed: ObservedJob, draft: DecisionDraft) -> bool:
    """Fail the job when a pod of the attempt, scheduled startupDeadlineSeconds ago, has not started: an image
    that does not pull, a Secret or ConfigMap that does not exist, a creation stuck on the node. The reason is the
    kubelet's when it names one of those, else ContainerCreating."""
    seconds = observed.spec.startup_deadline_seconds
    for pod in observed.current:
        if pod.phase != "Pending" or not pod.scheduled or pod.scheduled_at is None:
            continue
        deadline = pod.scheduled_at + datetime.timedelta(seconds=seconds)
        if draft.now < deadline:
            draft.requeue_at(deadline)
            continue
        reason = pod.waiting_reason if pod.waiting_reason in c.STARTUP_FAILURE_REASONS else c.REASON_CONTAINER_CREATING
        detail = f": {pod.waiting_message}" if pod.waiting_message else ""
        message = (f"pod {pod.name} is not running {seconds}s after it was scheduled "
                   f"({reason}{detail}; startupDeadlineSeconds {seconds})")
        draft.finish(succeeded=False, reason=reason, message=message)
        return True
    return False

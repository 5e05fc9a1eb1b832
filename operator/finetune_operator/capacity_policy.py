"""Capacity: pods the scheduler cannot place wait in WaitingForCapacity, for capacityTimeoutSeconds at most.

The condition carries the scheduler's or the autoscaler's words; the timeout counts from when the waiting began,
and the waiting does not count against backoffLimit.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from finetune_operator import constants as c
from finetune_operator.decision import DecisionDraft, ObservedJob
from finetune_operator.pod_view import PodView
from finetune_operator.spec import parse_time


def capacity_signal(pod: PodView, events: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
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


def _first_waiting_pod(observed: ObservedJob) -> tuple[PodView, tuple[str, str]] | None:
    """The first unscheduled pod of the attempt (by rank) with a capacity signal, and the signal."""
    for pod in observed.current:
        if pod.phase == "Pending" and not pod.scheduled:
            signal = capacity_signal(pod, observed.events)
            if signal is not None:
                return pod, signal
    return None


def wait_for_capacity(observed: ObservedJob, draft: DecisionDraft) -> bool:
    """WaitingForCapacity with the scheduler's (or autoscaler's) words while an unscheduled pod of the attempt has
    them, an Event when the waiting begins, and the job failed once the waiting has lasted capacityTimeoutSeconds;
    the condition turns False when no pod waits any more."""
    status = draft.status
    first = _first_waiting_pod(observed)
    if first is None:
        status.clear_condition(c.CONDITION_WAITING_FOR_CAPACITY, c.REASON_CAPACITY_AVAILABLE,
                               "every pod is scheduled or waiting for nothing")
        return False
    pod, (reason, message) = first
    if not status.condition_true(c.CONDITION_WAITING_FOR_CAPACITY):
        status.emit(c.EVENT_WARNING, c.CONDITION_WAITING_FOR_CAPACITY, f"pod {pod.name}: {message}")
    status.set_condition(c.CONDITION_WAITING_FOR_CAPACITY, True, reason, message)
    waiting = status.condition(c.CONDITION_WAITING_FOR_CAPACITY) or {}
    since = parse_time(waiting.get("lastTransitionTime")) or draft.now
    timeout = observed.spec.capacity_timeout_seconds
    timeout_at = since + datetime.timedelta(seconds=timeout)
    if draft.now >= timeout_at:
        draft.finish(succeeded=False, reason=c.REASON_CAPACITY_TIMEOUT,
                     message=f"No capacity for {timeout}s (capacityTimeoutSeconds): {message}")
        return True
    draft.requeue_at(timeout_at)
    return False

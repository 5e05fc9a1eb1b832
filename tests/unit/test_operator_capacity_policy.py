"""Capacity: the scheduler's words in WaitingForCapacity, an Event when waiting begins, capacityTimeoutSeconds."""

from __future__ import annotations

from typing import Any

import pytest
from operator_factories import TWO_NODES, apply_policy, described, make_event, make_job, make_pod, ts

from finetune_operator.capacity_policy import capacity_signal, wait_for_capacity
from finetune_operator.decide import EventToEmit
from finetune_operator.pod_view import observe_pod

NO_ROOM = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
SCALE_UP = "pod triggered scale-up: [{gpu-pool 0->2}]"


def new_style_event(pod: str, reason: str, note: str, observed_at: float) -> dict[str, Any]:
    """An events.k8s.io/v1 Event: ``regarding`` and ``note``, its time in ``series``."""
    return {"apiVersion": "events.k8s.io/v1", "kind": "Event", "regarding": {"kind": "Pod", "name": pod},
            "reason": reason, "note": note, "series": {"count": 3, "lastObservedTime": ts(observed_at)}}


@pytest.mark.parametrize(
    ("pod", "events", "expected"),
    [
        pytest.param(make_pod(0), [make_event("job-a0-n0", "FailedScheduling", NO_ROOM)],
                     ("FailedScheduling", NO_ROOM), id="failed-scheduling"),
        pytest.param(make_pod(0), [make_event("job-a0-n0", "TriggeredScaleUp", SCALE_UP, 60),
                                   make_event("job-a0-n0", "FailedScheduling", NO_ROOM, 40)],
                     ("TriggeredScaleUp", SCALE_UP), id="the-newest-wins-whatever-the-order"),
        pytest.param(make_pod(0), [make_event("job-a0-n0", "FailedScheduling", NO_ROOM, 40),
                                   new_style_event("job-a0-n0", "NotTriggerScaleUp", "no pool fits", 50)],
                     ("NotTriggerScaleUp", "no pool fits"), id="events-k8s-io-series"),
        pytest.param(make_pod(0), [make_event("job-a0-n9", "FailedScheduling", "someone else's pod"),
                                   make_event("job-a0-n0", "Scheduled", "assigned to n1")], None,
                     id="other-pods-and-other-reasons-say-nothing"),
        pytest.param(make_pod(0, unschedulable=NO_ROOM), [], ("FailedScheduling", NO_ROOM),
                     id="the-unschedulable-condition-without-events"),
    ],
)
def test_what_holds_a_pod_back(pod: dict[str, Any], events: list[dict[str, Any]],
                               expected: tuple[str, str] | None) -> None:
    view = observe_pod(pod)
    assert view is not None
    assert capacity_signal(view, events) == expected


def pending(*conditions: dict[str, Any]) -> dict[str, Any]:
    status = {"phase": "Pending", "attempt": 0, "restarts": 0, "countedFailures": 0, "message": "x",
              "observedGeneration": 1}
    return {**status, "conditions": list(conditions)} if conditions else status


def waiting(reason: str, message: str, since: float, status: str = "True") -> dict[str, Any]:
    return {"type": "WaitingForCapacity", "status": status, "reason": reason, "message": message,
            "lastTransitionTime": ts(since), "observedGeneration": 1}


TIMED_OUT = f"No capacity for 60s (capacityTimeoutSeconds): {NO_ROOM}"
FAILED = {"type": "Failed", "status": "True", "reason": "CapacityTimeout", "message": TIMED_OUT,
          "lastTransitionTime": ts(100), "observedGeneration": 1}


@pytest.mark.parametrize(
    ("timeout", "before", "pods", "events", "expected_status", "emitted", "requeue_after"),
    [
        pytest.param(1800, pending(), [make_pod(0), make_pod(1)],
                     [make_event("job-a0-n1", "FailedScheduling", NO_ROOM)],
                     pending(waiting("FailedScheduling", NO_ROOM, 100)),
                     (EventToEmit("Warning", "WaitingForCapacity", f"pod job-a0-n1: {NO_ROOM}"),), 1800,
                     id="waiting-begins-with-an-event"),
        pytest.param(1800, pending(waiting("FailedScheduling", NO_ROOM, 40)), [make_pod(0), make_pod(1)],
                     [make_event("job-a0-n0", "FailedScheduling", NO_ROOM, 40),
                      make_event("job-a0-n0", "TriggeredScaleUp", SCALE_UP, 60),
                      make_event("job-a0-n9", "NotTriggerScaleUp", "someone else's pod", 90)],
                     pending(waiting("TriggeredScaleUp", SCALE_UP, 40)), (), 1740,
                     id="waiting-goes-on-with-the-newest-words-and-its-start"),
        pytest.param(60, pending(waiting("FailedScheduling", NO_ROOM, 40)), [make_pod(0), make_pod(1)],
                     [make_event("job-a0-n0", "FailedScheduling", NO_ROOM)],
                     {"phase": "Failed", "attempt": 0, "restarts": 0, "countedFailures": 0, "message": TIMED_OUT,
                      "completionTime": ts(100), "observedGeneration": 1,
                      "conditions": [waiting("CapacityTimeout", "the job finished", 100, "False"), FAILED]},
                     (EventToEmit("Warning", "CapacityTimeout", TIMED_OUT),), None, id="timeout-fails-the-job"),
        pytest.param(1800, pending(waiting("FailedScheduling", NO_ROOM, 40)),
                     [make_pod(0, node="n1", scheduled_at=90), make_pod(1, node="n2", scheduled_at=90)],
                     [make_event("job-a0-n0", "FailedScheduling", NO_ROOM, 40)],
                     pending(waiting("CapacityAvailable", "every pod is scheduled or waiting for nothing", 100,
                                     "False")), (), None, id="capacity-arrives"),
        pytest.param(1800, pending(), [make_pod(0, unschedulable=NO_ROOM), make_pod(1)], [],
                     pending(waiting("FailedScheduling", NO_ROOM, 100)),
                     (EventToEmit("Warning", "WaitingForCapacity", f"pod job-a0-n0: {NO_ROOM}"),), 1800,
                     id="unschedulable-condition-without-events"),
        pytest.param(1800, pending(), [make_pod(0), make_pod(1)], [], pending(), (), None,
                     id="never-waited-no-condition"),
    ],
)
def test_waiting_for_capacity(timeout: int, before: dict[str, Any], pods: list[dict[str, Any]],
                              events: list[dict[str, Any]], expected_status: dict[str, Any],
                              emitted: tuple[EventToEmit, ...], requeue_after: float | None) -> None:
    job = make_job({**TWO_NODES, "spec.capacityTimeoutSeconds": timeout, "status": before})
    completed, decision = apply_policy(wait_for_capacity, job, pods, events)
    assert completed is (expected_status["phase"] == "Failed")
    assert decision.status == expected_status
    assert decision.events_to_emit == emitted
    assert decision.requeue_after == requeue_after
    assert described(decision) == (["delete Pod job-a0-n0", "delete Pod job-a0-n1"]
                                   if expected_status["phase"] == "Failed" else [])

"""spec.suspend: no pods while suspended; a gang that had started comes back as a new attempt; quiet once suspended."""

from __future__ import annotations

from typing import Any

import pytest
from operator_factories import TWO_NODES, apply_policy, described, make_job, make_pod, running_status, ts

from finetune_operator.decide import EventToEmit
from finetune_operator.suspend_policy import suspend

SUSPENDED = {"type": "Suspended", "status": "True", "reason": "Suspended", "message": "spec.suspend is true",
             "lastTransitionTime": ts(100), "observedGeneration": 1}
STOPPED = {"type": "Running", "status": "False", "reason": "Suspended", "message": "the job is suspended",
           "lastTransitionTime": ts(100), "observedGeneration": 1}
ENTERED = (EventToEmit("Normal", "Suspended", "Suspended: the job has no pods until resumed"),)
GANG = [make_pod(0, 0, "Running"), make_pod(1, 0, "Running")]
NO_ROOM = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."


def restarting_status() -> dict[str, Any]:
    status = running_status(attempt=1, phase="Restarting", restartAfter=ts(110), message="Attempt 0 failed")
    status["conditions"][0].update(status="False", reason="PodFailed")
    return status


def suspended_status() -> dict[str, Any]:
    return {"phase": "Suspended", "attempt": 1, "restarts": 1, "countedFailures": 0, "message": "Suspended",
            "observedGeneration": 1, "conditions": [{**SUSPENDED, "lastTransitionTime": ts(50)}]}


def waiting_status() -> dict[str, Any]:
    return {"phase": "Pending", "attempt": 0, "restarts": 0, "countedFailures": 0, "message": "x",
            "observedGeneration": 1,
            "conditions": [{"type": "WaitingForCapacity", "status": "True", "reason": "FailedScheduling",
                            "message": NO_ROOM, "lastTransitionTime": ts(40), "observedGeneration": 1}]}


@pytest.mark.parametrize(
    ("status", "pods", "expected_status", "actions", "events"),
    [
        pytest.param({}, [], {
            "attempt": 0, "restarts": 0, "countedFailures": 0, "phase": "Suspended",
            "message": "Suspended: the job has no pods until resumed", "observedGeneration": 1,
            "conditions": [SUSPENDED],
        }, [], ENTERED, id="created-suspended"),
        pytest.param(running_status(), GANG, {
            "phase": "Suspended", "attempt": 1, "restarts": 1, "countedFailures": 0,
            "message": "Suspended: the job has no pods until resumed", "observedGeneration": 1,
            "conditions": [STOPPED, SUSPENDED],
        }, ["delete Pod job-a0-n0", "delete Pod job-a0-n1"], ENTERED, id="running-gang-goes-next-attempt-comes"),
        pytest.param(restarting_status(), [], {
            "phase": "Suspended", "attempt": 1, "restarts": 1, "countedFailures": 0,
            "message": "Suspended: the job has no pods until resumed", "observedGeneration": 1,
            "conditions": [restarting_status()["conditions"][0], SUSPENDED],
        }, [], ENTERED, id="pending-restart-cancelled"),
        pytest.param(waiting_status(), [make_pod(0), make_pod(1)], {
            "phase": "Suspended", "attempt": 1, "restarts": 1, "countedFailures": 0,
            "message": "Suspended: the job has no pods until resumed", "observedGeneration": 1,
            "conditions": [{"type": "WaitingForCapacity", "status": "False", "reason": "Suspended",
                            "message": "the job is suspended", "lastTransitionTime": ts(100),
                            "observedGeneration": 1}, SUSPENDED],
        }, ["delete Pod job-a0-n0", "delete Pod job-a0-n1"], ENTERED, id="waiting-for-capacity-stops-waiting"),
        pytest.param(suspended_status(), [make_pod(0, 1, "Running", deleting=True), make_pod(1, 1, "Running")],
                     suspended_status(), ["delete Pod job-a1-n1"], (), id="already-suspended-is-quiet"),
    ],
)
def test_a_suspended_job_has_no_pods(status: dict[str, Any], pods: list[dict[str, Any]],
                                     expected_status: dict[str, Any], actions: list[str],
                                     events: tuple[EventToEmit, ...]) -> None:
    completed, decision = apply_policy(suspend, make_job({**TWO_NODES, "spec.suspend": True, "status": status}), pods)
    assert completed is True
    assert decision.status == expected_status
    assert described(decision) == actions
    assert decision.events_to_emit == events
    assert decision.requeue_after is None


@pytest.mark.parametrize("status", [running_status(), suspended_status()], ids=["running", "suspended-resuming"])
def test_a_job_not_suspended_is_left_to_the_next_policies(status: dict[str, Any]) -> None:
    completed, decision = apply_policy(suspend, make_job({**TWO_NODES, "spec.suspend": False, "status": status}), GANG)
    assert completed is False
    assert decision.actions == ()
    assert decision.status["phase"] == status["phase"]

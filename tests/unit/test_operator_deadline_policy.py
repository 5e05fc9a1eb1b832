"""Deadlines: activeDeadlineSeconds from the first moment all pods ran, startupDeadlineSeconds from scheduling."""

from __future__ import annotations

from typing import Any

import pytest
from operator_factories import DELETE, TWO_NODES, apply_policy, described, make_job, make_pod, running_status, ts

from finetune_operator.deadline_policy import fail_past_active_deadline, fail_past_startup_deadline
from finetune_operator.decide import EventToEmit

GANG = [make_pod(0, 0, "Running"), make_pod(1, 0, "Running")]
PENDING = {"phase": "Pending", "attempt": 0, "restarts": 0, "countedFailures": 0, "message": "x",
           "observedGeneration": 1}


def failed(before: dict[str, Any], now: float, reason: str, message: str) -> dict[str, Any]:
    """``before`` once the job failed at ``now``: Running (when it was True) turned False, Failed True."""
    conditions = [{**item, "status": "False", "reason": reason, "message": message, "lastTransitionTime": ts(now)}
                  for item in before.get("conditions", []) if item["type"] == "Running"]
    conditions.append({"type": "Failed", "status": "True", "reason": reason, "message": message,
                       "lastTransitionTime": ts(now), "observedGeneration": 1})
    return {**before, "phase": "Failed", "message": message, "completionTime": ts(now), "conditions": conditions}


DEADLINE_PASSED = "Running longer than activeDeadlineSeconds 3600"


@pytest.mark.parametrize(
    ("deadline", "status", "now", "expected_status", "actions", "requeue_after"),
    [
        pytest.param(3600, running_status(), 600, running_status(), [], 3010, id="not-reached-looks-again-then"),
        pytest.param(3600, running_status(), 3610, failed(running_status(), 3610, "DeadlineExceeded", DEADLINE_PASSED),
                     ["delete Pod job-a0-n0", "delete Pod job-a0-n1"], None, id="passed-fails-the-job"),
        pytest.param(3600, PENDING, 10_000, PENDING, [], None, id="never-ran-no-clock"),
        pytest.param(DELETE, running_status(), 10_000, running_status(), [], None, id="no-deadline"),
    ],
)
def test_active_deadline(deadline: Any, status: dict[str, Any], now: float, expected_status: dict[str, Any],
                         actions: list[str], requeue_after: float | None) -> None:
    job = make_job({**TWO_NODES, "spec.activeDeadlineSeconds": deadline, "status": status})
    completed, decision = apply_policy(fail_past_active_deadline, job, GANG, now=now)
    assert completed is (expected_status["phase"] == "Failed")
    assert decision.status == expected_status
    assert described(decision) == actions
    assert decision.requeue_after == requeue_after


def not_started(reason: str, detail: str) -> str:
    return f"pod job-a0-n1 is not running 300s after it was scheduled ({reason}{detail}; startupDeadlineSeconds 300)"


@pytest.mark.parametrize(
    ("pod", "now", "reason", "message", "requeue_after"),
    [
        pytest.param(make_pod(1, node="n1", scheduled_at=5, waiting="ImagePullBackOff",
                              waiting_message="Back-off pulling image"), 306,
                     "ImagePullBackOff", not_started("ImagePullBackOff", ": Back-off pulling image"), None,
                     id="image-pull-backoff"),
        pytest.param(make_pod(1, node="n1", scheduled_at=5, waiting="CreateContainerConfigError",
                              waiting_message='secret "s3" not found'), 305,
                     "CreateContainerConfigError", not_started("CreateContainerConfigError", ': secret "s3" not found'),
                     None, id="missing-secret-at-the-deadline"),
        pytest.param(make_pod(1, node="n1", scheduled_at=5, waiting="SomethingElse"), 306, "ContainerCreating",
                     not_started("ContainerCreating", ""), None, id="unknown-waiting-reason-is-creating"),
        pytest.param(make_pod(1, node="n1", scheduled_at=5), 306, "ContainerCreating",
                     not_started("ContainerCreating", ""), None, id="stuck-creating"),
        pytest.param(make_pod(1, node="n1", scheduled_at=5, waiting="ErrImagePull"), 105, None, None, 200,
                     id="not-reached-looks-again-then"),
        pytest.param(make_pod(1), 10_000, None, None, None, id="unscheduled-is-capacitys-business"),
        pytest.param(make_pod(1, phase="Running", node="n1", scheduled_at=5), 10_000, None, None, None,
                     id="started"),
    ],
)
def test_startup_deadline(pod: dict[str, Any], now: float, reason: str | None, message: str | None,
                          requeue_after: float | None) -> None:
    job = make_job({**TWO_NODES, "spec.startupDeadlineSeconds": 300, "status": PENDING})
    completed, decision = apply_policy(fail_past_startup_deadline, job, [make_pod(0, phase="Running"), pod], now=now)
    assert completed is (reason is not None)
    if reason is None:
        assert decision.status == PENDING
        assert decision.actions == ()
    else:
        assert message is not None
        assert decision.status == failed(PENDING, now, reason, message)
        assert described(decision) == ["delete Pod job-a0-n0", "delete Pod job-a0-n1"]
        assert decision.events_to_emit == (EventToEmit("Warning", reason, message),)
    assert decision.requeue_after == requeue_after

"""Gang failure and restart: why an attempt failed, whether it counts, the restart after the backoff or the end."""

from __future__ import annotations

from typing import Any

import pytest
from operator_factories import TWO_NODES, apply_policy, at, described, make_job, make_pod, running_status, ts

from finetune_operator.decide import EventToEmit
from finetune_operator.decision import observe_job
from finetune_operator.failure_policy import (
    GangFailure,
    delete_stale_pods,
    gang_failure,
    restart_or_fail,
    wait_for_restart,
)
from finetune_operator.job_status import JobStatus
from finetune_operator.pod_view import observe_pods
from finetune_operator.spec import parse_job

RUNNING0 = make_pod(0, 0, "Running")


@pytest.mark.parametrize(
    ("pods", "phase", "expected"),
    [
        pytest.param([RUNNING0, make_pod(1, 0, "Failed", exit_code=1)], "Running",
                     GangFailure(True, False, "PodFailed", "pod job-a0-n1 exited with code 1"), id="crash-counted"),
        pytest.param([RUNNING0, make_pod(1, 0, "Failed", exit_code=137, termination_reason="OOMKilled",
                                         termination_message=" killed\n")], "Running",
                     GangFailure(True, False, "PodFailed", "pod job-a0-n1 exited with code 137 (OOMKilled): killed"),
                     id="oom-counted"),
        pytest.param([make_pod(0, 0, "Failed", exit_code=1), make_pod(1, 0, "Failed", exit_code=1)], "Running",
                     GangFailure(True, False, "PodFailed", "pod job-a0-n0 exited with code 1"),
                     id="the-lowest-rank-is-named"),
        pytest.param([RUNNING0, make_pod(1, 0, "Failed", exit_code=75)], "Running",
                     GangFailure(False, False, "Preempted",
                                 "pod job-a0-n1 exited with code 75 (preempted; checkpoint saved)"),
                     id="preempted-exit-code"),
        pytest.param([RUNNING0, make_pod(1, 0, "Failed", exit_code=134)], "Running",
                     GangFailure(False, False, "RetryableExitCode",
                                 "pod job-a0-n1 exited with code 134 (in retryableExitCodes)"),
                     id="retryable-exit-code"),
        pytest.param([RUNNING0, make_pod(1, 0, "Failed", pod_reason="Evicted")], "Running",
                     GangFailure(False, False, "PodDisrupted",
                                 "pod job-a0-n1 failed [Evicted] (disrupted by the platform)"),
                     id="evicted"),
        pytest.param([make_pod(0, 0, "Failed", exit_code=1), make_pod(1, 0, "Running", disrupted=True)], "Running",
                     GangFailure(False, False, "PodDisrupted", "pod job-a0-n1 failed (disrupted by the platform)"),
                     id="peer-crash-after-a-disruption-not-counted"),
        pytest.param([make_pod(0, 0, "Failed", exit_code=75), make_pod(1, 0, "Failed", exit_code=64,
                                                                       termination_message="dataset.uri: missing")],
                     "Running",
                     GangFailure(False, True, "PermanentError", "pod job-a0-n1 exited with code 64: dataset.uri: "
                                 "missing (permanent error: the config or the data is wrong; not retried)"),
                     id="a-permanent-error-wins"),
        pytest.param([RUNNING0], "Running",
                     GangFailure(False, False, "PodMissing", "the pod of node rank 1 was deleted while running"),
                     id="a-pod-vanished-while-running"),
        pytest.param([RUNNING0], "Pending", None, id="a-pod-not-created-yet-is-no-failure"),
        pytest.param([RUNNING0, make_pod(1, 0, "Running")], "Running", None, id="all-running"),
        pytest.param([make_pod(0, 0, "Failed", exit_code=1), make_pod(0, 1), make_pod(1, 1)], "Running", None,
                     id="an-older-attempts-failure-is-history"),
    ],
)
def test_why_an_attempt_failed(pods: list[dict[str, Any]], phase: str, expected: GangFailure | None) -> None:
    job = make_job({**TWO_NODES, "spec.retryableExitCodes": [134], "status": running_status(phase=phase)})
    observed = observe_job(parse_job(job), JobStatus(job["status"], at(100), 1), observe_pods(pods))
    assert gang_failure(observed, phase) == expected


def restarted(attempt: int, restarts: int, counted: int, delay: float, reason: str, failure: str,
              message: str) -> dict[str, Any]:
    """The status of a job whose gang of ``running_status()`` failed at second 1000 and restarts ``delay`` later."""
    return {
        "phase": "Restarting", "attempt": attempt, "restarts": restarts, "countedFailures": counted,
        "startTime": ts(10), "restartAfter": ts(1000 + delay), "message": message, "observedGeneration": 1,
        "conditions": [{"type": "Running", "status": "False", "reason": reason, "message": failure,
                        "lastTransitionTime": ts(1000), "observedGeneration": 1}],
    }


@pytest.mark.parametrize(
    ("before", "pods", "delay", "expected_status"),
    [
        pytest.param({}, [RUNNING0, make_pod(1, 0, "Failed", exit_code=1)], 10, restarted(
            1, 1, 1, 10, "PodFailed", "pod job-a0-n1 exited with code 1",
            "Attempt 0 failed: pod job-a0-n1 exited with code 1 (counted: 1/3 failures); attempt 1 starts in 10s"),
            id="first-crash-counted"),
        pytest.param({"restarts": 2, "countedFailures": 2}, [RUNNING0, make_pod(1, 0, "Failed", exit_code=75)], 40,
                     restarted(1, 3, 2, 40, "Preempted", "pod job-a0-n1 exited with code 75 (preempted; checkpoint "
                               "saved)", "Attempt 0 failed: pod job-a0-n1 exited with code 75 (preempted; checkpoint "
                               "saved) (not counted: 2/3 failures); attempt 1 starts in 40s"),
                     id="third-restart-preempted-waits-longer-uncounted"),
        pytest.param({"restarts": 10, "countedFailures": 3}, [RUNNING0, make_pod(1, 0, "Failed", exit_code=134)], 300,
                     restarted(1, 11, 3, 300, "RetryableExitCode", "pod job-a0-n1 exited with code 134 (in "
                               "retryableExitCodes)", "Attempt 0 failed: pod job-a0-n1 exited with code 134 (in "
                               "retryableExitCodes) (not counted: 3/3 failures); attempt 1 starts in 300s"),
                     id="backoff-capped-retryable-never-exhausts-the-limit"),
        pytest.param({}, [RUNNING0], 10, restarted(
            1, 1, 0, 10, "PodMissing", "the pod of node rank 1 was deleted while running",
            "Attempt 0 failed: the pod of node rank 1 was deleted while running (not counted: 0/3 failures); "
            "attempt 1 starts in 10s"), id="pod-vanished"),
    ],
)
def test_a_failed_attempt_restarts_the_gang(before: dict[str, Any], pods: list[dict[str, Any]], delay: float,
                                            expected_status: dict[str, Any]) -> None:
    job = make_job({**TWO_NODES, "spec.retryableExitCodes": [134], "status": running_status(**before)})
    completed, decision = apply_policy(restart_or_fail, job, pods, now=1000)
    assert completed is True
    assert decision.status == expected_status
    assert described(decision) == [f"delete Pod {pod['metadata']['name']}" for pod in pods]
    reason = expected_status["conditions"][0]["reason"]
    assert decision.events_to_emit == (EventToEmit("Warning", reason, expected_status["message"]),)
    assert decision.requeue_after == delay


def failed(counted: int, reason: str, message: str) -> dict[str, Any]:
    """The status of a job whose gang of ``running_status()`` failed for good at second 1000."""
    return {
        "phase": "Failed", "attempt": 0, "restarts": 0, "countedFailures": counted, "startTime": ts(10),
        "completionTime": ts(1000), "message": message, "observedGeneration": 1,
        "conditions": [
            {"type": "Running", "status": "False", "reason": reason, "message": message,
             "lastTransitionTime": ts(1000), "observedGeneration": 1},
            {"type": "Failed", "status": "True", "reason": reason, "message": message,
             "lastTransitionTime": ts(1000), "observedGeneration": 1},
        ],
    }


@pytest.mark.parametrize(
    ("limit", "counted_before", "exit_code", "expected_status"),
    [
        pytest.param(3, 0, 64, failed(0, "PermanentError", "pod job-a0-n1 exited with code 64 (permanent error: "
                                      "the config or the data is wrong; not retried)"), id="permanent-error"),
        pytest.param(3, 3, 1, failed(4, "BackoffLimitExceeded", "pod job-a0-n1 exited with code 1; 4 counted "
                                     "failures exceed backoffLimit 3"), id="limit-exhausted"),
        pytest.param(0, 0, 1, failed(1, "BackoffLimitExceeded", "pod job-a0-n1 exited with code 1; 1 counted "
                                     "failures exceed backoffLimit 0"), id="limit-zero-first-failure-fails"),
    ],
)
def test_a_failed_attempt_fails_the_job(limit: int, counted_before: int, exit_code: int,
                                        expected_status: dict[str, Any]) -> None:
    job = make_job({**TWO_NODES, "spec.backoffLimit": limit, "status": running_status(countedFailures=counted_before)})
    pods = [RUNNING0, make_pod(1, 0, "Failed", exit_code=exit_code)]
    completed, decision = apply_policy(restart_or_fail, job, pods, now=1000)
    assert completed is True
    assert decision.status == expected_status
    assert described(decision) == ["delete Pod job-a0-n0", "delete Pod job-a0-n1"]
    assert decision.events_to_emit == (EventToEmit("Warning", expected_status["conditions"][1]["reason"],
                                                   expected_status["message"]),)
    assert decision.requeue_after is None


@pytest.mark.parametrize(
    ("restarts", "backoff", "delay"),
    [
        pytest.param(0, {}, 10, id="first-initial"),
        pytest.param(1, {}, 20, id="doubles"),
        pytest.param(3, {}, 80, id="doubles-again"),
        pytest.param(10, {}, 300, id="capped-at-max"),
        pytest.param(2, {"initialSeconds": 5, "maxSeconds": 12}, 12, id="custom-cap"),
        pytest.param(4, {"initialSeconds": 0, "maxSeconds": 0}, 0, id="no-backoff"),
    ],
)
def test_restart_backoff_is_exponential_and_capped(restarts: int, backoff: dict[str, int], delay: int) -> None:
    job = make_job({**TWO_NODES, "status": running_status(restarts=restarts), "spec.restartBackoff": backoff,
                    "spec.backoffLimit": 100})
    pods = [RUNNING0, make_pod(1, 0, "Failed", exit_code=1)]
    completed, decision = apply_policy(restart_or_fail, job, pods, now=1000)
    assert completed is True
    status = decision.status
    assert status["restartAfter"] == ts(1000 + delay)
    assert status["restarts"] == restarts + 1


@pytest.mark.parametrize(
    ("limit", "counted_before", "exit_code", "phase"),
    [
        pytest.param(3, 2, 1, "Restarting", id="within-limit"),
        pytest.param(3, 3, 1, "Failed", id="limit-exhausted"),
        pytest.param(0, 0, 1, "Failed", id="limit-zero-first-failure-fails"),
        pytest.param(3, 3, 75, "Restarting", id="preemptions-never-exhaust-the-limit"),
    ],
)
def test_backoff_limit(limit: int, counted_before: int, exit_code: int, phase: str) -> None:
    job = make_job({**TWO_NODES, "spec.backoffLimit": limit, "status": running_status(countedFailures=counted_before)})
    completed, decision = apply_policy(restart_or_fail, job, [RUNNING0, make_pod(1, 0, "Failed", exit_code=exit_code)])
    assert completed is True
    status = decision.status
    assert status["phase"] == phase
    if phase == "Failed":
        assert status["conditions"][-1]["reason"] == "BackoffLimitExceeded"
        assert status["message"].endswith(f"{counted_before + 1} counted failures exceed backoffLimit {limit}")
        assert "restartAfter" not in status


def test_an_attempt_that_has_not_failed_is_left_to_the_next_policies() -> None:
    job = make_job({**TWO_NODES, "status": running_status()})
    completed, decision = apply_policy(restart_or_fail, job, [RUNNING0, make_pod(1, 0, "Running")], now=1000)
    assert completed is False
    assert decision.status == running_status()


def restarting(phase: str = "Restarting") -> dict[str, Any]:
    return running_status(attempt=1, phase=phase, restartAfter=ts(1010), message="Attempt 0 failed")


@pytest.mark.parametrize(
    ("status", "pods", "now", "waits", "requeue_after"),
    [
        pytest.param(restarting(), [], 1004, True, 6, id="backoff-not-over"),
        pytest.param(restarting(), [make_pod(0, 0, "Running", deleting=True), make_pod(1, 0, "Failed", exit_code=1)],
                     1020, True, None, id="backoff-over-old-gang-still-stopping"),
        pytest.param(restarting(), [make_pod(1, 0, "Failed", exit_code=1)], 1020, False, None,
                     id="backoff-over-old-gang-stopped"),
        pytest.param(restarting("Suspended"), [make_pod(0, 0, "Running", deleting=True)], 1004, True, None,
                     id="resuming-waits-for-the-suspended-gang"),
        pytest.param(restarting("Pending"), [make_pod(0, 0, "Running", deleting=True), make_pod(0, 1)], 1004,
                     False, None, id="the-new-gang-exists-already"),
    ],
)
def test_the_next_attempt_waits_for_the_backoff_and_the_old_gang(status: dict[str, Any], pods: list[dict[str, Any]],
                                                                 now: float, waits: bool,
                                                                 requeue_after: float | None) -> None:
    completed, decision = apply_policy(wait_for_restart, make_job({**TWO_NODES, "status": status}), pods, now=now)
    assert completed is waits
    assert decision.requeue_after == requeue_after
    assert decision.actions == ()
    assert decision.status == status


def test_pods_of_older_attempts_are_deleted_once() -> None:
    pods = [make_pod(0, 0, "Failed", exit_code=1), make_pod(1, 0, "Running", deleting=True), make_pod(0, 1, "Running"),
            make_pod(1, 1, "Running")]
    job = make_job({**TWO_NODES, "status": running_status(attempt=1)})
    completed, decision = apply_policy(delete_stale_pods, job, pods)
    assert completed is False
    assert described(decision) == ["delete Pod job-a0-n0"]

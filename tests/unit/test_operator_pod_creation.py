"""Pods the API server refuses to create: which are permanent, how one is recorded, what it means in the decision."""

from __future__ import annotations

from typing import Any

import pytest
from operator_factories import TWO_NODES, apply_policy, at, described, make_job, make_pod, ts

from finetune_operator.job_status import JobStatus
from finetune_operator.pod_creation import (
    RefusalVerdict,
    create_refusal_verdict,
    fail_on_refused_creates,
    record_create_refusal,
    refusal_is_permanent,
)

PSA = 'pods "job-a0-n0" is forbidden: violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false'
NO_PRIORITY_CLASS = 'pods "job-a0-n0" is forbidden: no PriorityClass with name urgent was found'


@pytest.mark.parametrize(
    ("http_status", "message", "permanent"),
    [
        pytest.param(422, 'Pod "job-a0-n0" is invalid: spec.tolerations[0].operator: Unsupported value', True,
                     id="invalid"),
        pytest.param(400, "bad request", True, id="bad-request"),
        pytest.param(403, PSA, True, id="pod-security"),
        pytest.param(403, NO_PRIORITY_CLASS, False, id="missing-priority-class"),
        pytest.param(403, 'error looking up service account ns/trainer: serviceaccount "trainer" not found', False,
                     id="missing-service-account"),
        pytest.param(403, 'exceeded quota: gpus, requested: requests.nvidia.com/gpu=8', False, id="quota"),
        pytest.param(403, 'User "system:serviceaccount:x:y" cannot create resource "pods"', False, id="rbac"),
        pytest.param(404, 'namespaces "ns" not found', False, id="namespace-gone"),
    ],
)
def test_which_refusals_are_permanent(http_status: int, message: str, permanent: bool) -> None:
    assert refusal_is_permanent(http_status, message) is permanent


def test_a_repeated_refusal_keeps_the_time_of_the_first() -> None:
    first = record_create_refusal({}, 403, NO_PRIORITY_CLASS, at(50), 1)
    again = record_create_refusal(first, 403, NO_PRIORITY_CLASS, at(90), 1)
    assert again["conditions"][0]["lastTransitionTime"] == ts(50)


def verdict(status: dict[str, Any], now: float, *, all_created: bool = False) -> tuple[RefusalVerdict, JobStatus]:
    next_status = JobStatus(status, at(now), 1)
    return create_refusal_verdict(next_status, 300, all_created=all_created), next_status


@pytest.mark.parametrize(
    ("http_status", "message", "now", "all_created", "expected"),
    [
        pytest.param(403, PSA, 51, False,
                     RefusalVerdict(failure=("PodRejected", f"The API server refused the pods: {PSA}")),
                     id="permanent-fails-at-once"),
        pytest.param(403, NO_PRIORITY_CLASS, 100, False, RefusalVerdict(retry_until=at(350)),
                     id="passing-retries-until-the-deadline"),
        pytest.param(403, NO_PRIORITY_CLASS, 350, False, RefusalVerdict(failure=(
            "FailedCreate",
            f"The API server refused the pods for 300s (startupDeadlineSeconds): {NO_PRIORITY_CLASS}")),
            id="passing-fails-at-the-deadline"),
        pytest.param(403, NO_PRIORITY_CLASS, 100, True, RefusalVerdict(), id="every-pod-exists-now"),
    ],
)
def test_a_recorded_refusal_means(http_status: int, message: str, now: float, all_created: bool,
                                  expected: RefusalVerdict) -> None:
    recorded = record_create_refusal({}, http_status, message, at(50), 1)
    answer, _ = verdict(recorded, now, all_created=all_created)
    assert answer == expected


def test_the_refusal_is_cleared_once_every_pod_exists() -> None:
    recorded = record_create_refusal({}, 403, NO_PRIORITY_CLASS, at(50), 1)
    _, status = verdict(recorded, 100, all_created=True)
    cleared = status.condition("PodCreateFailed")
    assert cleared is not None
    assert (cleared["status"], cleared["reason"], cleared["lastTransitionTime"]) == ("False", "PodsCreated", ts(100))


def test_no_refusal_recorded_means_nothing() -> None:
    assert verdict({"phase": "Pending"}, 100)[0] == RefusalVerdict()


def refused(http_status: int, message: str, since: float) -> dict[str, Any]:
    """The status of a pending job whose pod create the API server refused at second ``since``."""
    status = record_create_refusal({"phase": "Pending", "attempt": 0}, http_status, message, at(since), 1)
    return {**status, "restarts": 0, "countedFailures": 0}


def refusal_failed(before: dict[str, Any], reason: str, message: str, now: float) -> dict[str, Any]:
    failed = {"type": "Failed", "status": "True", "reason": reason, "message": message,
              "lastTransitionTime": ts(now), "observedGeneration": 1}
    return {**before, "phase": "Failed", "message": message, "completionTime": ts(now),
            "conditions": [*before["conditions"], failed]}


CREATED = {"type": "PodCreateFailed", "status": "False", "reason": "PodsCreated", "message": "every pod was created",
           "lastTransitionTime": ts(100), "observedGeneration": 1}


@pytest.mark.parametrize(
    ("before", "pods", "now", "expected_status", "actions", "requeue_after"),
    [
        pytest.param(refused(403, PSA, 99), [make_pod(1, node="n1")], 100,
                     refusal_failed(refused(403, PSA, 99), "PodRejected",
                                    f"The API server refused the pods: {PSA}", 100),
                     ["delete Pod job-a0-n1"], None, id="permanent-fails-at-once-and-cleans"),
        pytest.param(refused(403, NO_PRIORITY_CLASS, 50), [], 100, refused(403, NO_PRIORITY_CLASS, 50), [], 250,
                     id="passing-looks-again-at-the-deadline"),
        pytest.param(refused(403, NO_PRIORITY_CLASS, 50), [], 350,
                     refusal_failed(refused(403, NO_PRIORITY_CLASS, 50), "FailedCreate", "The API server refused the "
                                    f"pods for 300s (startupDeadlineSeconds): {NO_PRIORITY_CLASS}", 350),
                     [], None, id="passing-fails-at-the-deadline"),
        pytest.param(refused(403, NO_PRIORITY_CLASS, 50), [make_pod(0), make_pod(1)], 100,
                     {**refused(403, NO_PRIORITY_CLASS, 50), "conditions": [CREATED]}, [], None,
                     id="every-pod-exists-now"),
    ],
)
def test_a_refused_create_in_the_decision(before: dict[str, Any], pods: list[dict[str, Any]], now: float,
                                          expected_status: dict[str, Any], actions: list[str],
                                          requeue_after: float | None) -> None:
    job = make_job({**TWO_NODES, "spec.startupDeadlineSeconds": 300, "status": before})
    completed, decision = apply_policy(fail_on_refused_creates, job, pods, now=now)
    assert completed is (expected_status["phase"] == "Failed")
    assert decision.status == expected_status
    assert described(decision) == actions
    assert decision.requeue_after == requeue_after

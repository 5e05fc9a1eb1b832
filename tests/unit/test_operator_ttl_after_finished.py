"""Finished jobs: leftover pods cleaned by cleanPodPolicy, the job deleted ttlSecondsAfterFinished after it finished."""

from __future__ import annotations

from typing import Any

import pytest
from operator_factories import DELETE, apply_policy, described, make_job, make_pod, running_status, ts

from finetune_operator.ttl_after_finished import keep_finished

COUNTERS = {"attempt": 0, "restarts": 0, "countedFailures": 0, "observedGeneration": 1}


@pytest.mark.parametrize(
    ("status", "ttl", "now", "expected_status", "actions", "requeue_after"),
    [
        pytest.param({"phase": "Succeeded", "completionTime": ts(100)}, 60, 130,
                     {"phase": "Succeeded", "completionTime": ts(100), **COUNTERS}, [], 30, id="ttl-not-reached"),
        pytest.param({"phase": "Succeeded", "completionTime": ts(100)}, 60, 160,
                     {"phase": "Succeeded", "completionTime": ts(100), **COUNTERS}, ["delete FineTuneJob"], None,
                     id="ttl-reached"),
        pytest.param({"phase": "Failed", "completionTime": ts(100)}, 0, 100,
                     {"phase": "Failed", "completionTime": ts(100), **COUNTERS}, ["delete FineTuneJob"], None,
                     id="ttl-zero-deletes-at-once"),
        pytest.param({"phase": "Failed", "completionTime": ts(100)}, DELETE, 10_000,
                     {"phase": "Failed", "completionTime": ts(100), **COUNTERS}, [], None, id="no-ttl-kept-forever"),
        pytest.param({"phase": "Failed"}, 60, 500,
                     {"phase": "Failed", "completionTime": ts(500), **COUNTERS}, [], 60,
                     id="no-completion-time-counts-from-now"),
    ],
)
def test_a_finished_job_is_deleted_after_its_ttl(status: dict[str, Any], ttl: Any, now: float,
                                                  expected_status: dict[str, Any], actions: list[str],
                                                  requeue_after: float | None) -> None:
    job = make_job(status=status, spec__ttlSecondsAfterFinished=ttl)
    completed, decision = apply_policy(keep_finished, job, now=now)
    assert completed is True
    assert decision.status == expected_status
    assert described(decision) == actions
    assert decision.requeue_after == requeue_after
    assert decision.events_to_emit == ()


LEFTOVERS = [make_pod(0, 0, "Succeeded", exit_code=0), make_pod(1, 0, "Running"), make_pod(2, 0, "Running",
                                                                                          deleting=True),
             make_pod(0, 1, "Failed", exit_code=1)]


@pytest.mark.parametrize(
    ("policy", "deleted"),
    [
        pytest.param("All", ["delete Pod job-a0-n0", "delete Pod job-a0-n1", "delete Pod job-a1-n0"], id="All"),
        pytest.param("Running", ["delete Pod job-a0-n1"], id="Running"),
        pytest.param("None", [], id="None"),
    ],
)
def test_leftover_pods_of_every_attempt_are_cleaned_by_policy(policy: str, deleted: list[str]) -> None:
    job = make_job(status={"phase": "Succeeded", "completionTime": ts(100), "attempt": 1},
                   spec__cleanPodPolicy=policy)
    completed, decision = apply_policy(keep_finished, job, LEFTOVERS)
    assert completed is True
    assert described(decision) == deleted


@pytest.mark.parametrize("phase", [None, "Pending", "Running", "Restarting", "Suspended"])
def test_an_unfinished_job_is_left_to_the_next_policies(phase: str | None) -> None:
    status = running_status(phase=phase) if phase else {}
    job = make_job(status=status, spec__ttlSecondsAfterFinished=0)
    completed, decision = apply_policy(keep_finished, job, LEFTOVERS)
    assert completed is False
    assert (decision.actions, decision.requeue_after) == ((), None)
    assert "completionTime" not in decision.status

"""Success: rank 0 succeeded; the model, the final numbers (the trainer's summary first) and the finish."""

from __future__ import annotations

import json
from typing import Any

import pytest
from operator_factories import TWO_NODES, apply_policy, described, make_job, make_pod, running_status, ts

from finetune_operator.decide import EventToEmit
from finetune_operator.progress import ProgressSample
from finetune_operator.success_policy import finish_on_success

MODEL = "s3://out/job/model/"
WRITTEN = f"Model written to {MODEL}"
SUMMARY = json.dumps({"steps": 500, "maxSteps": 500, "epoch": 2.5, "trainLoss": 0.42, "evalLossAfter": 0.51})
SCRAPE = ProgressSample(step=480, total_steps=500, train_loss=0.5, steps_per_second=1.0)


def succeeded_status(**extra: Any) -> dict[str, Any]:
    """The running status of ``running_status()`` once rank 0 succeeded at second 1000."""
    return {
        "phase": "Succeeded", "attempt": 0, "restarts": 0, "countedFailures": 0, "startTime": ts(10),
        "message": WRITTEN, "observedGeneration": 1, "completionTime": ts(1000),
        "model": {"uri": MODEL, "export": "full"},
        "conditions": [
            {"type": "Running", "status": "False", "reason": "Succeeded", "message": WRITTEN,
             "lastTransitionTime": ts(1000), "observedGeneration": 1},
            {"type": "Succeeded", "status": "True", "reason": "Succeeded", "message": WRITTEN,
             "lastTransitionTime": ts(1000), "observedGeneration": 1},
        ],
        **extra,
    }


@pytest.mark.parametrize(
    ("pods", "sample", "expected_status", "actions"),
    [
        pytest.param([make_pod(0, 0, "Succeeded", exit_code=0), make_pod(1, 0, "Running")], None,
                     succeeded_status(), ["delete Pod job-a0-n0", "delete Pod job-a0-n1"], id="peer-still-running"),
        pytest.param([make_pod(0, 0, "Succeeded", exit_code=0), make_pod(1, 0, "Failed", exit_code=1)], None,
                     succeeded_status(), ["delete Pod job-a0-n0", "delete Pod job-a0-n1"],
                     id="a-failed-peer-does-not-matter"),
        pytest.param([make_pod(0, 0, "Succeeded", exit_code=0, termination_message=SUMMARY)], SCRAPE,
                     succeeded_status(
                         progress={"step": 500, "totalSteps": 500, "percent": 100.0, "epoch": 2.5,
                                   "summary": "500/500 (100%)"},
                         metrics={"loss": 0.42, "evalLoss": 0.51}),
                     ["delete Pod job-a0-n0"], id="the-trainer-summary-wins-over-the-last-scrape"),
        pytest.param([make_pod(0, 0, "Succeeded", exit_code=0, termination_message="done")], SCRAPE,
                     succeeded_status(
                         progress={"step": 480, "totalSteps": 500, "percent": 96.0, "summary": "480/500 (96%)"},
                         metrics={"loss": 0.5}),
                     ["delete Pod job-a0-n0"], id="no-summary-the-last-scrape-without-eta"),
    ],
)
def test_rank0_succeeded_finishes_the_job(pods: list[dict[str, Any]], sample: ProgressSample | None,
                                          expected_status: dict[str, Any], actions: list[str]) -> None:
    job = make_job({**TWO_NODES, "status": running_status()})
    completed, decision = apply_policy(finish_on_success, job, pods, now=1000, sample=sample)
    assert completed is True
    assert decision.status == expected_status
    assert described(decision) == actions
    assert decision.events_to_emit == (EventToEmit("Normal", "Succeeded", WRITTEN),)


@pytest.mark.parametrize(
    "pods",
    [
        pytest.param([make_pod(0, 0, "Running"), make_pod(1, 0, "Succeeded", exit_code=0)], id="only-a-peer"),
        pytest.param([make_pod(0, 0, "Failed", exit_code=1)], id="rank0-failed"),
        pytest.param([make_pod(1, 0, "Running")], id="rank0-missing"),
        pytest.param([make_pod(0, 0, "Succeeded", exit_code=0), make_pod(0, 1), make_pod(1, 1)],
                     id="rank0-of-an-older-attempt"),
    ],
)
def test_without_rank0_succeeded_the_job_is_left_to_the_next_policies(pods: list[dict[str, Any]]) -> None:
    job = make_job({**TWO_NODES, "status": running_status()})
    completed, decision = apply_policy(finish_on_success, job, pods, now=1000)
    assert completed is False
    assert decision.status["phase"] == "Running"
    assert decision.actions == ()

"""ModelVerified: the trainer's verdict on the exported model, from rank 0's termination message, on success and on a
permanent failure."""

from __future__ import annotations

import json
from typing import Any

import pytest
from operator_factories import (
    TWO_NODES,
    FakeSettings,
    apply_policy,
    at,
    condition,
    make_job,
    make_pod,
    running_status,
)

from finetune_operator.decide import decide
from finetune_operator.failure_policy import restart_or_fail
from finetune_operator.model_verification import verification_verdict
from finetune_operator.success_policy import finish_on_success

VERIFIED = json.dumps({"steps": 4, "maxSteps": 4, "trainLoss": 1.5,
                       "verification": {"ok": True, "seconds": 3.25, "files": 5, "answers": 2}})
BROKEN = ("rank 0: model verification failed: model/model.safetensors: tensor lm_head.weight has 1 non-finite "
          "values (NaN/Inf)")


@pytest.mark.parametrize(
    ("message", "verdict"),
    [
        pytest.param(VERIFIED, (True, "the exported model loaded back from storage in a fresh process: every weight "
                                      "finite in 5 files, 2 answers generated (3.2 s)"), id="summary-verified"),
        pytest.param(json.dumps({"steps": 4, "verification": {"ok": True}}),
                     (True, "the exported model loaded back from storage in a fresh process: every weight finite"),
                     id="summary-verified-without-figures"),
        pytest.param(BROKEN, (False, "model verification failed: model/model.safetensors: tensor lm_head.weight has "
                                     "1 non-finite values (NaN/Inf)"), id="failed-check-names-the-file"),
        pytest.param(json.dumps({"steps": 4, "trainLoss": 1.5}), None, id="summary-without-verification"),
        pytest.param(json.dumps({"steps": 4, "verification": {"ok": "yes"}}), None, id="malformed-verdict"),
        pytest.param("rank 0: training.learningRate: must be > 0", None, id="another-permanent-error"),
        pytest.param("{not json", None, id="broken-json"),
        pytest.param("", None, id="empty"),
        pytest.param(None, None, id="no-message"),
    ],
)
def test_verdict_from_the_termination_message(message: str | None, verdict: tuple[bool, str] | None) -> None:
    assert verification_verdict(message) == verdict


def verified_condition(decision_status: dict[str, Any]) -> dict[str, Any] | None:
    return next((c for c in decision_status.get("conditions", []) if c["type"] == "ModelVerified"), None)


@pytest.mark.parametrize(
    ("pods", "policy", "phase", "expected"),
    [
        pytest.param([make_pod(0, 0, "Succeeded", exit_code=0, termination_message=VERIFIED)], finish_on_success,
                     "Succeeded", ("True", "Verified", "every weight finite in 5 files"), id="succeeded-verified"),
        pytest.param([make_pod(0, 0, "Succeeded", exit_code=0, termination_message='{"steps": 4}')],
                     finish_on_success, "Succeeded", None, id="succeeded-without-verification"),
        pytest.param([make_pod(0, 0, "Failed", exit_code=64, termination_message=BROKEN), make_pod(1, 0, "Running")],
                     restart_or_fail, "Failed", ("False", "VerificationFailed", "model/model.safetensors: tensor"),
                     id="check-failed"),
        pytest.param([make_pod(0, 0, "Failed", exit_code=64, termination_message="rank 0: dataset.uri: no objects")],
                     restart_or_fail, "Failed", None, id="other-permanent-error"),
        pytest.param([make_pod(0, 0, "Failed", exit_code=1, termination_message="rank 0: RuntimeError: boom")],
                     restart_or_fail, "Restarting", None, id="crash-restarts-without-a-verdict"),
    ],
)
def test_model_verified_condition(pods: list[dict[str, Any]], policy: Any, phase: str,
                                  expected: tuple[str, str, str] | None) -> None:
    job = make_job({**TWO_NODES, "status": running_status()})
    completed, decision = apply_policy(policy, job, pods, now=1000)
    assert completed is True
    assert decision.status["phase"] == phase
    found = condition(decision, "ModelVerified")
    if expected is None:
        assert found is None
        return
    assert found is not None
    status, reason, fragment = expected
    assert (found["status"], found["reason"]) == (status, reason)
    assert fragment in found["message"]
    if status == "False":
        assert "model/model.safetensors" in decision.status["message"]


def test_decide_records_the_verdict_once_the_job_succeeds() -> None:
    job = make_job({"status": running_status()})
    pods = [make_pod(0, 0, "Succeeded", exit_code=0, termination_message=VERIFIED)]

    decision = decide(job, pods, [], at(1000), FakeSettings())
    assert decision.status["phase"] == "Succeeded"
    found = verified_condition(decision.status)
    assert found is not None and (found["status"], found["reason"]) == ("True", "Verified")

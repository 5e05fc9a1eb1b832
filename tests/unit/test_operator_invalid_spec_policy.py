"""Invalid specs: the job fails with InvalidSpec naming the field, quietly again, and starts over once corrected."""

from __future__ import annotations

from typing import Any

import pytest
from operator_factories import TWO_NODES, at, described, make_job, make_pod, running_status, ts

from finetune_operator.decide import EventToEmit
from finetune_operator.decision import start_draft
from finetune_operator.invalid_spec_policy import accept_spec
from finetune_operator.pod_view import observe_pods

BAD_TRAINING = {"spec.training": {"epochs": 1, "maxSteps": 5}}
RESERVED_ENV = {"spec.env": [{"name": "PET_NNODES", "value": "9"}]}
BAD_TRAINING_MESSAGE = "spec.training: set exactly one of training.epochs and training.maxSteps"
RESERVED_ENV_MESSAGE = "spec.env[0].name: env PET_NNODES is reserved: the operator sets it for every pod"
GANG = [make_pod(0, 0, "Running"), make_pod(1, 0, "Running")]


def invalid(message: str, since: float = 100) -> dict[str, Any]:
    """The status of a job failed at ``since`` for an invalid spec."""
    return {
        "phase": "Failed", "message": message, "completionTime": ts(since), "observedGeneration": 1,
        "conditions": [
            {"type": "InvalidSpec", "status": "True", "reason": "InvalidSpec", "message": message,
             "lastTransitionTime": ts(since), "observedGeneration": 1},
            {"type": "Failed", "status": "True", "reason": "InvalidSpec", "message": message,
             "lastTransitionTime": ts(since), "observedGeneration": 1},
        ],
    }


def stopped_running(message: str) -> dict[str, Any]:
    """``running_status()`` once an invalid spec failed it at second 100."""
    failed = invalid(message)
    running = {**running_status()["conditions"][0], "status": "False", "reason": "InvalidSpec", "message": message,
               "lastTransitionTime": ts(100)}
    return {**running_status(), **failed, "conditions": [running, *failed["conditions"]]}


def decided(job: dict[str, Any], pods: list[dict[str, Any]], now: float) -> tuple[Any, Any]:
    draft = start_draft(job, observe_pods(pods), at(now))
    return accept_spec(job, draft), draft.decision()


@pytest.mark.parametrize(
    ("paths", "status", "pods", "now", "expected_status", "actions", "events"),
    [
        pytest.param(BAD_TRAINING, {}, [], 100, invalid(BAD_TRAINING_MESSAGE), [],
                     (EventToEmit("Warning", "InvalidSpec", BAD_TRAINING_MESSAGE),), id="new-job"),
        pytest.param(BAD_TRAINING, invalid(BAD_TRAINING_MESSAGE), [], 200, invalid(BAD_TRAINING_MESSAGE), [], (),
                     id="again-quiet-keeps-the-completion-time"),
        pytest.param({**TWO_NODES, **RESERVED_ENV}, running_status(), GANG, 100, stopped_running(RESERVED_ENV_MESSAGE),
                     ["delete Pod job-a0-n0", "delete Pod job-a0-n1"],
                     (EventToEmit("Warning", "InvalidSpec", RESERVED_ENV_MESSAGE),), id="running-job-loses-its-pods"),
        pytest.param({**TWO_NODES, **RESERVED_ENV, "spec.cleanPodPolicy": "None"}, running_status(), GANG, 100,
                     stopped_running(RESERVED_ENV_MESSAGE), [],
                     (EventToEmit("Warning", "InvalidSpec", RESERVED_ENV_MESSAGE),),
                     id="clean-pod-policy-read-from-the-invalid-spec"),
        pytest.param(BAD_TRAINING, {"phase": "Succeeded", "completionTime": ts(50)}, [], 100,
                     {"phase": "Succeeded", "completionTime": ts(50), "observedGeneration": 1}, [], (),
                     id="a-finished-job-stays-as-it-finished"),
    ],
)
def test_an_invalid_spec_fails_the_job(paths: dict[str, Any], status: dict[str, Any], pods: list[dict[str, Any]],
                                       now: float, expected_status: dict[str, Any], actions: list[str],
                                       events: tuple[EventToEmit, ...]) -> None:
    parsed, decision = decided(make_job({**paths, "status": status}), pods, now)
    assert parsed is None
    assert decision.status == expected_status
    assert described(decision) == actions
    assert decision.events_to_emit == events


SPEC_VALID = {"type": "InvalidSpec", "status": "False", "reason": "SpecValid", "message": "the spec is valid",
              "lastTransitionTime": ts(200), "observedGeneration": 2}
CORRECTED = {"type": "Failed", "status": "False", "reason": "SpecValid", "message": "the spec was corrected",
             "lastTransitionTime": ts(200), "observedGeneration": 2}


@pytest.mark.parametrize(
    ("pods", "expected_status"),
    [
        pytest.param([], {"message": BAD_TRAINING_MESSAGE, "observedGeneration": 2,
                          "conditions": [SPEC_VALID, CORRECTED]}, id="no-pods-left"),
        pytest.param([make_pod(0, 2, "Failed", exit_code=1)],
                     {"message": BAD_TRAINING_MESSAGE, "observedGeneration": 2, "conditions": [SPEC_VALID, CORRECTED],
                      "attempt": 3, "restarts": 0, "countedFailures": 0}, id="pods-left-behind-get-a-new-attempt"),
    ],
)
def test_a_corrected_spec_starts_the_job_over(pods: list[dict[str, Any]], expected_status: dict[str, Any]) -> None:
    job = make_job(status=invalid(BAD_TRAINING_MESSAGE), metadata__generation=2)
    parsed, decision = decided(job, pods, 200)
    assert parsed is not None
    assert parsed.spec.training.max_steps == 100
    assert decision.status == expected_status
    assert decision.actions == ()
    assert decision.events_to_emit == ()


def test_a_valid_spec_changes_nothing() -> None:
    parsed, decision = decided(make_job({**TWO_NODES, "status": running_status()}), GANG, 100)
    assert parsed is not None
    assert parsed.spec.distributed.nodes == 2
    assert decision.status == running_status()

"""While rank 0 prepares the data, the job's Running condition says PreparingData with rows and ETA, read from the
trainer's own metrics, and says AllPodsRunning again once training starts."""

from __future__ import annotations

import math
from typing import Any

import pytest
from operator_factories import TWO_NODES, FakeSettings, at, condition, make_job, make_pod, running_status
from prometheus_client import generate_latest

from finetune_operator.decide import decide
from finetune_operator.progress import ProgressSample, parse_metrics
from finetune_trainer.metrics import TrainerMetrics

GANG = [make_pod(0, 0, "Running"), make_pod(1, 0, "Running")]
PREPARING = ProgressSample(step=0, data_progress=0.42, data_rows=420_000, data_eta_seconds=63.0)
READY = ProgressSample(step=0, data_progress=1.0, data_rows=1_000_000, data_eta_seconds=0.0)
TRAINING = ProgressSample(step=5, total_steps=100, data_progress=1.0)


def running(reason: str = "AllPodsRunning", message: str = "attempt 0: all pods running") -> dict[str, Any]:
    status = running_status()
    status["conditions"][0].update(reason=reason, message=message)
    return make_job({**TWO_NODES, "status": status})


def running_condition(job: dict[str, Any], sample: ProgressSample | None) -> tuple[str, str]:
    found = condition(decide(job, GANG, [], at(100), FakeSettings(), sample), "Running")
    assert found is not None and found["status"] == "True"
    return found["reason"], found["message"]


@pytest.mark.parametrize(
    ("job", "sample", "expected"),
    [
        pytest.param(running(), PREPARING, ("PreparingData", "preparing data: 42%, 420000 rows, ETA 1m03s"),
                     id="preparing"),
        pytest.param(running(), ProgressSample(step=0, data_progress=0.0), ("PreparingData", "preparing data: 0%"),
                     id="just-started-no-rows-no-eta"),
        pytest.param(running("PreparingData", "preparing data: 42%"), None, ("PreparingData", "preparing data: 42%"),
                     id="no-new-reading-keeps-it"),
        pytest.param(running("PreparingData", "preparing data: 99%"), READY,
                     ("AllPodsRunning", "attempt 0: all pods running"), id="ready"),
        pytest.param(running("PreparingData", "preparing data: 99%"), TRAINING,
                     ("AllPodsRunning", "attempt 0: all pods running"), id="training"),
        pytest.param(running(), ProgressSample(step=0, data_progress=-1.0), ("AllPodsRunning",
                     "attempt 0: all pods running"), id="not-started-yet"),
    ],
)
def test_the_running_condition_follows_the_data_preparation(
    job: dict[str, Any], sample: ProgressSample | None, expected: tuple[str, str]
) -> None:
    assert running_condition(job, sample) == expected


def test_the_lastTransitionTime_stays_while_the_reason_changes() -> None:  # noqa: N802 (the field's name)
    decision = decide(running(), GANG, [], at(100), FakeSettings(), PREPARING)
    found = condition(decision, "Running")
    assert found is not None and found["lastTransitionTime"] == running_status()["conditions"][0]["lastTransitionTime"]


def test_the_trainer_metrics_read_back_as_a_preparation() -> None:
    metrics = TrainerMetrics(rank=0, job_name="job", job_namespace="ns")
    assert parse_metrics(generate_latest(metrics.registry).decode()).preparing_data is False
    metrics.record_data_preparation(1200, 0.4, 30.0)
    sample = parse_metrics(generate_latest(metrics.registry).decode())
    assert (sample.preparing_data, sample.data_rows, sample.data_eta_seconds) == (True, 1200, 30.0)
    assert sample.data_progress is not None and math.isclose(sample.data_progress, 0.4)
    metrics.record_data_preparation(3000, 1.0, 0.0)  # the last chunk: still preparing until the data is saved
    assert parse_metrics(generate_latest(metrics.registry).decode()).preparing_data is True
    metrics.data_ready()
    assert parse_metrics(generate_latest(metrics.registry).decode()).preparing_data is False

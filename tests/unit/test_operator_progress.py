"""Reading rank 0's metrics: the trainer's names parsed from real exposition text, step rate, ETA, formats."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from finetune_operator.progress import (
    ProgressSample,
    StepRateTracker,
    format_eta,
    format_summary,
    parse_metrics,
)

LABELS = ("rank", "job_name", "job_namespace")


def exposition(rank_values: dict[str, dict[str, float]]) -> str:
    """Text as the trainer's registry serves it: one gauge per name, a series per rank."""
    registry = CollectorRegistry()
    gauges: dict[str, Gauge] = {}
    for rank, values in rank_values.items():
        for name, value in values.items():
            gauge = gauges.get(name) or Gauge(name, name, LABELS, registry=registry)
            gauges[name] = gauge
            gauge.labels(rank=rank, job_name="job", job_namespace="ns").set(value)
    return generate_latest(registry).decode()


def test_parses_the_trainer_metric_names_for_rank_0() -> None:
    text = exposition({
        "1": {"finetune_step": 999},
        "0": {"finetune_step": 120, "finetune_total_steps": 500, "finetune_epoch": 0.48, "finetune_train_loss": 1.25,
              "finetune_eval_loss": 1.5, "finetune_best_eval_loss": 1.4, "finetune_learning_rate": 2e-4,
              "finetune_tokens_per_second": 1000.0, "finetune_last_checkpoint_step": 100},
    })
    assert parse_metrics(text, observed_at=7.0) == ProgressSample(
        step=120, total_steps=500, epoch=0.48, train_loss=1.25, eval_loss=1.5, best_eval_loss=1.4,
        learning_rate=2e-4, tokens_per_second=1000.0, last_checkpoint_step=100, observed_at=7.0)


def test_nan_and_minus_one_mean_not_yet() -> None:
    text = exposition({"0": {"finetune_step": 0, "finetune_total_steps": 0, "finetune_eval_loss": math.nan,
                             "finetune_best_eval_loss": math.nan, "finetune_last_checkpoint_step": -1}})
    sample = parse_metrics(text)
    assert (sample.step, sample.total_steps, sample.eval_loss, sample.best_eval_loss, sample.last_checkpoint_step) == (
        0, None, None, None, None)


def test_unrelated_text_gives_an_empty_sample() -> None:
    assert parse_metrics("# nothing here\nother_metric 1\n") == ProgressSample()


def test_step_rate_and_eta() -> None:
    tracker = StepRateTracker(window_seconds=600)
    assert tracker.observe("j", ProgressSample(step=100, total_steps=500, observed_at=0)).steps_per_second is None
    sample = tracker.observe("j", ProgressSample(step=110, total_steps=500, observed_at=100))
    assert sample.steps_per_second == pytest.approx(0.1)
    assert sample.eta_seconds == 3900


def test_step_rate_forgets_history_when_a_restart_resumes_from_an_older_step() -> None:
    tracker = StepRateTracker()
    tracker.observe("j", ProgressSample(step=300, observed_at=0))
    assert tracker.observe("j", ProgressSample(step=250, observed_at=10)).steps_per_second is None
    assert tracker.observe("j", ProgressSample(step=260, observed_at=20)).steps_per_second == pytest.approx(1.0)


def test_step_rate_window_drops_old_readings() -> None:
    tracker = StepRateTracker(window_seconds=100)
    tracker.observe("j", ProgressSample(step=0, observed_at=0))
    tracker.observe("j", ProgressSample(step=10, observed_at=50))
    tracker.observe("j", ProgressSample(step=20, observed_at=100))
    assert tracker.observe("j", ProgressSample(step=100, observed_at=200)).steps_per_second == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (45, "45s"), (60, "1m00s"), (303, "5m03s"), (3720, "1h02m"), (86399, "23h59m"), (183600, "2d03h")],
)
def test_format_eta(seconds: int, text: str) -> None:
    assert format_eta(seconds) == text


@pytest.mark.parametrize(("step", "total", "text"), [(120, 500, "120/500 (24%)"), (7, None, "7"), (1, 3, "1/3 (33%)")])
def test_format_summary(step: int, total: int | None, text: str) -> None:
    assert format_summary(step, total) == text

"""The trainer's history.jsonl: which log events become lines, the upload at a save, the cut after a resume."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerControl, TrainerState, TrainingArguments

from finetune_trainer.history import HISTORY_NAME, HistoryCallback, history_entry, parse_history
from finetune_trainer.storage import open_store


@pytest.mark.parametrize(
    ("logs", "expected"),
    [
        pytest.param(
            {"loss": 2.5, "learning_rate": 0.001, "grad_norm": 1.5, "epoch": 0.5},
            {"step": 10, "epoch": 0.5, "time": 100.0, "loss": 2.5, "learningRate": 0.001, "gradNorm": 1.5,
             "tokensPerSecond": 800.0},
            id="training log",
        ),
        pytest.param(
            {"eval_loss": 3.0, "eval_runtime": 0.2, "epoch": 0.5},
            {"step": 10, "epoch": 0.5, "time": 100.0, "evalLoss": 3.0},
            id="evaluation: no rate",
        ),
        pytest.param({"train_runtime": 12.0, "train_loss": 2.7}, None, id="the run's summary is not a point"),
    ],
)
def test_log_events_become_history_lines(logs: dict[str, Any], expected: dict[str, Any] | None) -> None:
    assert history_entry(logs, step=10, epoch=0.5, now=100.0, tokens_per_second=800.0) == expected


def test_parse_history_cuts_after_the_resumed_step_and_skips_torn_lines() -> None:
    text = '{"step": 2, "loss": 3}\n{"step": 4, "loss": 2}\n{"step": 6, "loss": 1}\n{"step": 8, "lo'
    assert [e["step"] for e in parse_history(text)] == [2, 4, 6]
    assert [e["step"] for e in parse_history(text, up_to_step=4)] == [2, 4]


def _event(callback: HistoryCallback, name: str, state: TrainerState, **kwargs: Any) -> None:
    getattr(callback, name)(TrainingArguments(output_dir="unused", report_to=[]), state, TrainerControl(), **kwargs)


def stored_steps(root: Path) -> list[tuple[int, str]]:
    lines = (root / HISTORY_NAME).read_text().splitlines()
    return [(e["step"], "eval" if "evalLoss" in e else "train") for e in map(json.loads, lines)]


def test_history_is_uploaded_at_a_save_at_the_end_and_continued_after_a_resume(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    history = HistoryCallback(store, tokens_per_second=lambda: 50.0, preempt_deadline=lambda: None)
    state = TrainerState()
    _event(history, "on_train_begin", state)
    for step in (2, 4):
        state.global_step = step
        _event(history, "on_log", state, logs={"loss": 5.0 - step})
    _event(history, "on_log", state, logs={"eval_loss": 4.0})
    _event(history, "on_save", state)
    assert history.finish(deadline=time.monotonic() + 60)
    assert stored_steps(tmp_path) == [(2, "train"), (4, "train"), (4, "eval")]

    # A new attempt resumed from step 2: what the first attempt logged after step 2 is redone, not repeated.
    resumed = HistoryCallback(store, tokens_per_second=lambda: None, preempt_deadline=lambda: None)
    state = TrainerState()
    state.global_step = 2
    _event(resumed, "on_train_begin", state)
    state.global_step = 4
    _event(resumed, "on_log", state, logs={"loss": 1.5})
    assert resumed.finish(deadline=time.monotonic() + 60)
    assert stored_steps(tmp_path) == [(2, "train"), (4, "train")]
    assert json.loads((tmp_path / HISTORY_NAME).read_text().splitlines()[-1])["loss"] == 1.5


def test_a_failed_upload_is_reported_not_raised(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the store's folder should be")
    history = HistoryCallback(open_store(f"file://{blocked}"), lambda: None, lambda: None)
    assert history.upload(deadline=0.0) is False

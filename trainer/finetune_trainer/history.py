"""The run's history: rank 0's log events in ``<output.uri>/history.jsonl``, so loss curves outlive the pods.

One JSON object per line, one line per training log (every ``training.logEvery`` steps) and per evaluation::

    {"step": 10, "epoch": 0.42, "time": 1767225600.123, "loss": 2.31, "learningRate": 0.0028, "tokensPerSecond": 812.5}
    {"step": 10, "epoch": 0.42, "time": 1767225601.456, "evalLoss": 2.40}

``tokensPerSecond`` is rank 0's rate over the logging interval (as ``finetune_tokens_per_second``), ``time`` Unix
seconds. The file is uploaded whole with every checkpoint (in the background, like the checkpoint; synchronously
for the SIGTERM one) and once more at the end, after the final evaluation and before ``result.json``. A resumed
attempt starts from the stored file cut at the step it resumed from, so steps redone after a restart appear once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune_trainer.checkpoints import BACKGROUND_UPLOAD_BUDGET_S
from finetune_trainer.storage import ObjectStore

log = logging.getLogger(__name__)

HISTORY_NAME = "history.jsonl"
# HF's log keys and the names history.jsonl gives them (camelCase, like result.json).
LOGGED_VALUES = {"loss": "loss", "eval_loss": "evalLoss", "learning_rate": "learningRate", "grad_norm": "gradNorm"}


def history_entry(
    logs: Mapping[str, Any], *, step: int, epoch: float | None, now: float, tokens_per_second: float | None = None
) -> dict[str, Any] | None:
    """One line of history.jsonl from one of HF's log events; None for events with no loss (the run's summary)."""
    if "loss" not in logs and "eval_loss" not in logs:
        return None
    entry: dict[str, Any] = {"step": step, "epoch": round(epoch, 4) if epoch is not None else None,
                             "time": round(now, 3)}
    for key, name in LOGGED_VALUES.items():
        if isinstance(logs.get(key), int | float):
            entry[name] = float(logs[key])
    if "loss" in logs and tokens_per_second is not None:
        entry["tokensPerSecond"] = round(tokens_per_second, 3)
    return entry


def parse_history(text: str, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """The entries of a history.jsonl, those after ``up_to_step`` left out; unreadable lines are skipped."""
    entries = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            if up_to_step is None or entry["step"] <= up_to_step:
                entries.append(entry)
    return entries


class HistoryCallback(TrainerCallback):
    """Rank 0's side of the history: collects the log events and uploads history.jsonl.

    ``tokens_per_second`` returns the rate of the logging interval that just ended (the metrics callback, which
    runs first, computes it); ``preempt_deadline`` returns the SIGTERM checkpoint's deadline while one is being
    saved, else None.
    """

    def __init__(
        self,
        store: ObjectStore,
        tokens_per_second: Callable[[], float | None],
        preempt_deadline: Callable[[], float | None],
    ) -> None:
        self.store = store
        self.tokens_per_second = tokens_per_second
        self.preempt_deadline = preempt_deadline
        self.entries: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._upload: threading.Thread | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step == 0:
            return
        try:
            stored = self.store.get_bytes(HISTORY_NAME) if self.store.exists(HISTORY_NAME) else b""
        except Exception as exc:  # a history that cannot be read only loses the earlier attempts' lines
            log.warning("could not read the stored %s: %s", HISTORY_NAME, exc)
            return
        with self._lock:
            self.entries = parse_history(stored.decode(errors="replace"), up_to_step=state.global_step)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        entry = history_entry(
            logs or {}, step=state.global_step, epoch=state.epoch, now=time.time(),
            tokens_per_second=self.tokens_per_second(),
        )
        if entry is not None:
            with self._lock:
                self.entries.append(entry)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        deadline = self.preempt_deadline()
        if deadline is not None:
            self.upload(deadline)
        elif self._upload is None or not self._upload.is_alive():
            # A save while the previous upload still runs skips this one: the next save or the end uploads it all.
            self._upload = threading.Thread(
                target=self.upload, args=(time.monotonic() + BACKGROUND_UPLOAD_BUDGET_S,), name="history-upload",
                daemon=True,
            )
            self._upload.start()

    def upload(self, deadline: float) -> bool:
        """Upload history.jsonl as it is now, retrying until ``deadline``; False (logged) when it failed."""
        with self._lock:
            data = "".join(json.dumps(entry) + "\n" for entry in self.entries).encode()
        try:
            self.store.retrying_until(deadline).put_bytes(HISTORY_NAME, data)
        except Exception as exc:  # the history is a report: its loss must never stop training
            log.warning("%s not uploaded: %s", HISTORY_NAME, exc)
            return False
        return True

    def finish(self, deadline: float) -> bool:
        """The last upload, after the final evaluation: waits for one still running first."""
        if self._upload is not None:
            self._upload.join(max(deadline - time.monotonic(), 0.0))
        return self.upload(deadline)

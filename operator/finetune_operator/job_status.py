"""The next status of a FineTuneJob, changed only through verbs by ``decide`` and its policies.

It is built on a copy of the current status: phase transitions (each remembered for its Event), conditions
(lastTransitionTime moves only on a flip), times, attempts and restarts, the finish, progress and the final model.
"""

from __future__ import annotations

import copy
import datetime
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finetune_operator import constants as c
from finetune_operator.builders import checkpoint_uri
from finetune_operator.conditions import upsert_condition
from finetune_operator.progress import ProgressSample, format_eta, format_summary
from finetune_operator.spec import format_time, parse_time


@dataclass(frozen=True)
class EventToEmit:
    type: str
    reason: str
    message: str


class JobStatus:
    """The next status, built on a copy of the current one; remembers the phase transition for its Event."""

    def __init__(self, current: Mapping[str, Any], now: datetime.datetime, generation: int) -> None:
        self.old_phase: str | None = current.get("phase")
        self.data: dict[str, Any] = copy.deepcopy(dict(current))
        self.now = now
        self.generation = generation
        self.transition: EventToEmit | None = None
        self.extra_events: list[EventToEmit] = []
        self._current = current

    @property
    def phase(self) -> str | None:
        return self.data.get("phase")

    def get_int(self, key: str) -> int:
        value = self.data.get(key)
        return value if isinstance(value, int) else 0

    def time(self, key: str) -> datetime.datetime | None:
        return parse_time(self.data.get(key))

    def set_time(self, key: str, value: datetime.datetime) -> None:
        self.data[key] = format_time(value)

    def clear_time(self, key: str) -> None:
        self.data.pop(key, None)

    def set_message(self, message: str) -> None:
        self.data["message"] = message

    def enter(self, phase: str, reason: str, message: str, event_type: str = c.EVENT_NORMAL) -> None:
        self.data["phase"] = phase
        self.data["message"] = message
        self.transition = EventToEmit(event_type, reason, message)

    def emit(self, event_type: str, reason: str, message: str) -> None:
        """An Event beside the phase transition's."""
        self.extra_events.append(EventToEmit(event_type, reason, message))

    def events_to_emit(self) -> tuple[EventToEmit, ...]:
        """The phase transition's Event first (only when the phase really changed), then the others."""
        emitted = list(self.extra_events)
        if self.transition is not None and self.phase != self.old_phase:
            emitted.insert(0, self.transition)
        return tuple(emitted)

    def condition(self, kind: str) -> dict[str, Any] | None:
        for item in self.data.get("conditions") or []:
            if item.get("type") == kind:
                return dict(item)
        return None

    def condition_true(self, kind: str) -> bool:
        found = self.condition(kind)
        return found is not None and found.get("status") == "True"

    def set_condition(self, kind: str, status: bool, reason: str, message: str) -> None:
        """Add or update a condition; lastTransitionTime moves only when the status flips."""
        conditions = list(self.data.get("conditions") or [])
        text = "True" if status else "False"
        upsert_condition(conditions, {"type": kind, "status": text, "reason": reason, "message": message,
                                      "lastTransitionTime": format_time(self.now),
                                      "observedGeneration": self.generation})
        self.data["conditions"] = conditions

    def clear_condition(self, kind: str, reason: str, message: str) -> None:
        """Turn an existing True condition False; a condition never set stays absent."""
        if self.condition_true(kind):
            self.set_condition(kind, False, reason, message)

    def set_attempt(self, attempt: int) -> None:
        """The attempt the job is on; the restart and failure counters start at zero."""
        self.data["attempt"] = attempt
        self.data.setdefault("restarts", 0)
        self.data.setdefault("countedFailures", 0)

    def record_restart(self, restart_after: datetime.datetime | None = None) -> None:
        """The gang goes and comes back as the next attempt, not before ``restart_after`` when one is given."""
        self.data["restarts"] = self.get_int("restarts") + 1
        self.data["attempt"] = self.get_int("attempt") + 1
        if restart_after is not None:
            self.set_time("restartAfter", restart_after)

    def record_failure(self, counted: bool) -> int:
        """A failed attempt, counted against backoffLimit or not; returns the failures counted so far."""
        counted_failures = self.get_int("countedFailures") + (1 if counted else 0)
        self.data["countedFailures"] = counted_failures
        return counted_failures

    def finish(self, *, succeeded: bool, reason: str, message: str) -> None:
        """Enter Succeeded or Failed: conditions, completionTime, no restart pending, no ETA."""
        if succeeded:
            self.enter(c.PHASE_SUCCEEDED, reason, message)
            self.set_condition(c.CONDITION_SUCCEEDED, True, reason, message)
        else:
            self.enter(c.PHASE_FAILED, reason, message, c.EVENT_WARNING)
            self.set_condition(c.CONDITION_FAILED, True, reason, message)
        self.clear_condition(c.CONDITION_RUNNING, reason, message)
        self.clear_condition(c.CONDITION_WAITING_FOR_CAPACITY, reason, "the job finished")
        self.set_time("completionTime", self.now)
        self.data.pop("restartAfter", None)
        progress = self.data.get("progress")
        if isinstance(progress, dict):
            progress.pop("eta", None)
            progress.pop("etaSeconds", None)

    def keep_completion_time(self) -> None:
        """Keep the completionTime of the current status: a job that fails again keeps when it first failed."""
        self.data["completionTime"] = self._current.get("completionTime", self.data["completionTime"])

    def reopen(self, reason: str, message: str) -> None:
        """A failed job starts over as a new one: no phase, Failed turned False, no completionTime."""
        self.data.pop("phase", None)
        self.set_condition(c.CONDITION_FAILED, False, reason, message)
        self.data.pop("completionTime", None)

    def record_model(self, uri: str, export: str) -> None:
        self.data["model"] = {"uri": uri, "export": export}

    def record_progress(self, sample: ProgressSample, output_uri: str, world_size: int) -> None:
        """status.progress, status.metrics and the checkpoints from rank 0's metrics."""
        if sample.step is not None:
            self.data["progress"] = _progress(sample, sample.step)
        metrics: dict[str, Any] = dict(self.data.get("metrics") or {})
        metrics.update(_metrics(sample, world_size))
        if metrics:
            self.data["metrics"] = metrics
        if sample.last_checkpoint_step is not None:
            self.data["latestCheckpoint"] = {
                "uri": checkpoint_uri(output_uri, sample.last_checkpoint_step),
                "step": sample.last_checkpoint_step,
            }
        if sample.best_checkpoint_step is not None:
            best: dict[str, Any] = {
                "uri": checkpoint_uri(output_uri, sample.best_checkpoint_step),
                "step": sample.best_checkpoint_step,
            }
            if sample.best_eval_loss is not None:
                best["evalLoss"] = round(sample.best_eval_loss, 6)
            self.data["bestCheckpoint"] = best

    def record_data_preparation(self, sample: ProgressSample, running_message: str) -> None:
        """The Running condition says PreparingData (with rows and ETA) while rank 0 prepares the data, and goes
        back to ``running_message`` once it is done; a reconcile without a new sample changes nothing."""
        current = self.condition(c.CONDITION_RUNNING) or {}
        if sample.preparing_data:
            assert sample.data_progress is not None
            message = f"preparing data: {100 * sample.data_progress:.0f}%"
            if sample.data_rows is not None:
                message += f", {sample.data_rows} rows"
            if sample.data_eta_seconds is not None and math.isfinite(sample.data_eta_seconds):
                message += f", ETA {format_eta(int(sample.data_eta_seconds))}"
            self.set_condition(c.CONDITION_RUNNING, True, c.REASON_PREPARING_DATA, message)
        elif current.get("reason") == c.REASON_PREPARING_DATA:
            self.set_condition(c.CONDITION_RUNNING, True, c.REASON_ALL_PODS_RUNNING, running_message)

    def finalize(self) -> dict[str, Any]:
        self.data["observedGeneration"] = self.generation
        for item in self.data.get("conditions") or []:
            item["observedGeneration"] = self.generation
        return self.data


def _progress(sample: ProgressSample, step: int) -> dict[str, Any]:
    progress: dict[str, Any] = {"step": step, "summary": format_summary(step, sample.total_steps)}
    if sample.total_steps:
        progress["totalSteps"] = sample.total_steps
        progress["percent"] = round(min(100.0, 100.0 * step / sample.total_steps), 1)
    if sample.epoch is not None:
        progress["epoch"] = round(sample.epoch, 4)
    eta = sample.eta_seconds
    if eta is not None:
        progress["etaSeconds"] = eta
        progress["eta"] = format_eta(eta)
    return progress


def _metrics(sample: ProgressSample, world_size: int) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    if sample.train_loss is not None:
        metrics["loss"] = round(sample.train_loss, 6)
    if sample.eval_loss is not None:
        metrics["evalLoss"] = round(sample.eval_loss, 6)
    if sample.tokens_per_second is not None:
        # Rank 0's rate times the world size: data-parallel ranks run in lockstep on equal-sized batches.
        metrics["tokensPerSecond"] = round(sample.tokens_per_second * world_size, 2)
    if sample.learning_rate is not None:
        metrics["learningRate"] = sample.learning_rate
    return metrics

"""Training progress read from rank 0's Prometheus endpoint, with the step rate and ETA derived from it."""

from __future__ import annotations

import json
import math
import time
from collections import deque
from dataclasses import dataclass, replace

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from finetune_operator import constants as c

# Seconds of history the step rate is averaged over: long enough to smooth evaluation pauses.
RATE_WINDOW_SECONDS = 600.0
FETCH_TIMEOUT_SECONDS = 1.0


@dataclass(frozen=True)
class ProgressSample:
    """One reading of rank 0's metrics; None where the trainer has nothing yet (NaN, -1, missing)."""

    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    best_eval_loss: float | None = None
    learning_rate: float | None = None
    tokens_per_second: float | None = None
    last_checkpoint_step: int | None = None
    best_checkpoint_step: int | None = None
    steps_per_second: float | None = None
    data_progress: float | None = None
    data_rows: int | None = None
    data_eta_seconds: float | None = None
    # spec.tracking: the run rank 0 logs to, whether its latest call to the server succeeded, updates waiting.
    tracking_run_id: str | None = None
    tracking_experiment_id: str | None = None
    tracking_up: bool | None = None
    tracking_queued: int | None = None
    observed_at: float = 0.0

    @property
    def preparing_data(self) -> bool:
        """Rank 0 is preparing the dataset (started, not done, no step taken)."""
        return self.data_progress is not None and 0 <= self.data_progress < 1 and not self.step

    @property
    def eta_seconds(self) -> int | None:
        if self.step is None or not self.total_steps or not self.steps_per_second:
            return None
        remaining = max(0, self.total_steps - self.step)
        return int(math.ceil(remaining / self.steps_per_second))


def _finite(value: float | None) -> float | None:
    if value is None or math.isnan(value) or math.isinf(value):
        return None
    return value


def parse_metrics(text: str, *, rank: str = "0", observed_at: float = 0.0) -> ProgressSample:
    """The sample of one rank (label ``rank``; series without the label count too) from the text format."""
    values: dict[str, float] = {}
    run_labels: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("rank", rank) != rank:
                continue
            values.setdefault(sample.name, sample.value)
            if sample.name == c.METRIC_TRACKING_RUN_INFO and sample.value == 1 and not run_labels:
                run_labels = dict(sample.labels)

    def number(name: str) -> float | None:
        return _finite(values.get(name))

    def count(name: str, *, minimum: int = 0) -> int | None:
        value = number(name)
        if value is None or value < minimum:
            return None
        return int(value)

    return ProgressSample(
        step=count(c.METRIC_STEP),
        total_steps=count(c.METRIC_TOTAL_STEPS, minimum=1),
        epoch=number(c.METRIC_EPOCH),
        train_loss=number(c.METRIC_TRAIN_LOSS),
        eval_loss=number(c.METRIC_EVAL_LOSS),
        best_eval_loss=number(c.METRIC_BEST_EVAL_LOSS),
        learning_rate=number(c.METRIC_LEARNING_RATE),
        tokens_per_second=number(c.METRIC_TOKENS_PER_SECOND),
        # The trainer reports -1 before its first complete checkpoint.
        last_checkpoint_step=count(c.METRIC_LAST_CHECKPOINT_STEP),
        best_checkpoint_step=count(c.METRIC_BEST_CHECKPOINT_STEP),
        data_progress=number(c.METRIC_DATA_PREPARATION),
        data_rows=count(c.METRIC_DATA_ROWS),
        data_eta_seconds=number(c.METRIC_DATA_ETA),
        tracking_run_id=run_labels.get("run_id") or None,
        tracking_experiment_id=run_labels.get("experiment_id") or None,
        tracking_up=None if number(c.METRIC_TRACKING_UP) is None else number(c.METRIC_TRACKING_UP) == 1,
        tracking_queued=count(c.METRIC_TRACKING_QUEUED),
        observed_at=observed_at,
    )


class StepRateTracker:
    """Recent (time, step) readings per job; the rate is steps over the readings' time span."""

    def __init__(self, window_seconds: float = RATE_WINDOW_SECONDS) -> None:
        self.window_seconds = window_seconds
        self._history: dict[str, deque[tuple[float, int]]] = {}

    def observe(self, key: str, sample: ProgressSample) -> ProgressSample:
        """The sample with ``steps_per_second`` filled in from this job's history."""
        if sample.step is None:
            return sample
        history = self._history.setdefault(key, deque(maxlen=256))
        # A restarted attempt resumes from a checkpoint: an older step means the history no longer applies.
        if history and sample.step < history[-1][1]:
            history.clear()
        history.append((sample.observed_at, sample.step))
        while len(history) > 2 and sample.observed_at - history[0][0] > self.window_seconds:
            history.popleft()
        first_time, first_step = history[0]
        elapsed = sample.observed_at - first_time
        if elapsed <= 0 or sample.step <= first_step:
            return sample
        return replace(sample, steps_per_second=(sample.step - first_step) / elapsed)

    def forget(self, key: str) -> None:
        self._history.pop(key, None)


async def fetch_metrics_text(
    session: aiohttp.ClientSession, url: str, timeout: float = FETCH_TIMEOUT_SECONDS
) -> str | None:
    """The endpoint's text, or None when it does not answer in time (a busy or restarting trainer)."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            if response.status != 200:
                return None
            return await response.text()
    except (TimeoutError, aiohttp.ClientError, OSError):
        return None


async def fetch_progress(
    session: aiohttp.ClientSession,
    pod_ip: str,
    port: int,
    *,
    timeout: float = FETCH_TIMEOUT_SECONDS,
    now: float | None = None,
) -> ProgressSample | None:
    """Rank 0's sample from ``http://<pod IP>:<port>/metrics``; None when unreachable or unparseable."""
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    text = await fetch_metrics_text(session, f"http://{host}:{port}{c.METRICS_PATH}", timeout)
    if text is None:
        return None
    try:
        return parse_metrics(text, observed_at=time.time() if now is None else now)
    except ValueError:
        return None


def sample_from_result(message: str | None) -> ProgressSample | None:
    """The final numbers from a succeeded rank-0 pod's termination message (the trainer's result summary, JSON).

    After success the pod's metrics endpoint is gone, so this is how the last step, loss and eval loss reach the
    status; anything that is not such a summary gives None.
    """
    if not message or not message.lstrip().startswith("{"):
        return None
    try:
        result = json.loads(message)
    except ValueError:
        return None
    if not isinstance(result, dict) or not isinstance(result.get("steps"), int):
        return None

    def number(key: str) -> float | None:
        value = result.get(key)
        return _finite(float(value)) if isinstance(value, int | float) and not isinstance(value, bool) else None

    steps = int(result["steps"])
    found = result.get("tracking")
    tracking: dict[str, object] = found if isinstance(found, dict) else {}
    return ProgressSample(
        step=steps,
        total_steps=int(result["maxSteps"]) if isinstance(result.get("maxSteps"), int) else steps,
        epoch=number("epoch"),
        train_loss=number("trainLoss"),
        eval_loss=number("evalLossAfter"),
        best_eval_loss=number("bestEvalLoss"),
        tracking_run_id=_text(tracking.get("runId")),
        tracking_experiment_id=_text(tracking.get("experimentId")),
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def format_eta(seconds: int) -> str:
    """``45s``, ``5m03s``, ``1h02m``, ``2d03h``: two units at most, like kubectl's ages."""
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def format_summary(step: int, total_steps: int | None) -> str:
    """``120/500 (24%)``, or just the step when the total is not known yet."""
    if not total_steps:
        return str(step)
    return f"{step}/{total_steps} ({math.floor(100 * step / total_steps)}%)"

"""Experiment tracking's pure parts and its send queue: params, tags and metric points from the run, which run to
log to, the run id kept with each checkpoint, and one background thread that sends in order with retries.

Nothing here imports MLflow (``tracking_mlflow`` does): what to send is decided here, how is MLflow's. The send queue
is why an unreachable or slow tracking server never stalls training: the training loop only appends to a bounded
queue; one thread sends, retrying each call with exponential backoff until it succeeds, fails for good (the server
refused it: logged and dropped) or the run ends; at the end the queue is drained for a bounded time and whatever
could not be sent is reported.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune_trainer.config import TrainerConfig

log = logging.getLogger(__name__)

# The run id kept in every checkpoint folder (listed in its manifest like every other file).
RUN_FILE = "tracking.json"
# Config sections that make up the recipe; MLflow params are their flattened settings.
RECIPE_SECTIONS = ("model", "dataset", "output", "training", "deepspeed", "checkpoint")
# MLflow's limits: a param value's length, and entities per log_batch request.
MAX_PARAM_LENGTH = 6000
MAX_BATCH_METRICS = 1000
MAX_BATCH_PARAMS = 100
# HF's log keys and the MLflow metric names they are logged under (snake_case, MLflow's habit).
LOGGED_METRICS = {
    "loss": "loss",
    "eval_loss": "eval_loss",
    "learning_rate": "learning_rate",
    "grad_norm": "grad_norm",
    "epoch": "epoch",
}
# The tags that find a job's run again when no checkpoint names it yet.
TAG_JOB_UID = "finetune.job.uid"
TAG_OUTPUT_URI = "finetune.output.uri"


# ---- what is logged ---------------------------------------------------------------------------------------


def flatten_params(config: TrainerConfig) -> dict[str, str]:
    """The recipe as MLflow params: ``training.lora.r`` → ``"16"``, lists joined with commas, absent settings left
    out, values cut to MLflow's length limit. The config holds no secrets (credentials come from the environment)."""
    params: dict[str, str] = {}
    document = config.to_dict()

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}")
        elif value is not None:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            params[path] = text[:MAX_PARAM_LENGTH]

    for section in RECIPE_SECTIONS:
        walk(document.get(section, {}), section)
    params["export"] = config.export
    return params


def run_tags(config: TrainerConfig, *, world_size: int, model_etags: Mapping[str, str] | None = None) -> dict[str, str]:
    """Tags of the run: the owning job, the attempt, the base model and what identifies its weights."""
    job = config.job
    tags = {
        "finetune.job.name": job.name,
        "finetune.job.namespace": job.namespace,
        "finetune.job.attempt": str(job.attempt),
        "finetune.model.uri": config.model.uri,
        TAG_OUTPUT_URI: config.output.uri,
        "finetune.world_size": str(world_size),
        "finetune.config_hash": config.config_hash(),
    }
    if job.uid:
        tags[TAG_JOB_UID] = job.uid
    if config.model.sha256:
        tags["finetune.model.sha256"] = config.model.sha256
    if config.model.revision:
        tags["finetune.model.revision"] = config.model.revision
    for name, etag in sorted((model_etags or {}).items()):
        tags[f"finetune.model.etag.{name}"] = etag
    return tags


def model_etags(model_dir: Path) -> dict[str, str]:
    """The ETags of the base model's weight files, from the node cache's record of what it pulled ({} when none)."""
    marker = model_dir.parent / f"{model_dir.name}.complete"
    try:
        files = json.loads(marker.read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return {
        key: str(entry["etag"])
        for key, entry in files.items()
        if key.endswith((".safetensors", ".bin")) and isinstance(entry, dict) and entry.get("etag")
    }


@dataclass(frozen=True)
class MetricPoint:
    key: str
    value: float
    step: int
    timestamp_ms: int


def metric_points(
    logs: Mapping[str, Any], *, step: int, now: float, tokens_per_second: float | None = None
) -> list[MetricPoint]:
    """MLflow metric points from one of HF's log events: every finite number it names, tokens/s with the loss."""
    stamp = int(now * 1000)
    points = []
    for key, name in LOGGED_METRICS.items():
        value = logs.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            points.append(MetricPoint(name, float(value), step, stamp))
    if "loss" in logs and tokens_per_second is not None and math.isfinite(tokens_per_second):
        points.append(MetricPoint("tokens_per_second", float(tokens_per_second), step, stamp))
    return points


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI (the operator writes the same into status.tracking.url)."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


# ---- which run ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredRun:
    """The run a checkpoint was logged to (``tracking.json`` in its folder)."""

    run_id: str
    experiment_id: str
    tracking_uri: str

    def to_json(self) -> str:
        return json.dumps({"runId": self.run_id, "experimentId": self.experiment_id, "trackingUri": self.tracking_uri})


def read_stored_run(checkpoint_dir: Path | None) -> StoredRun | None:
    """The run named in a restored checkpoint; None when it has none (older checkpoints, tracking added later)."""
    if checkpoint_dir is None:
        return None
    try:
        data = json.loads((checkpoint_dir / RUN_FILE).read_text())
        return StoredRun(str(data["runId"]), str(data["experimentId"]), str(data["trackingUri"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class RunChoice:
    """Log to ``run_id`` (reuse), or create a new run (``run_id`` None); ``reason`` says why, for the log."""

    run_id: str | None
    reason: str


def choose_run(
    stored: StoredRun | None,
    tracking_uri: str,
    stored_state: str | None,
    tagged: Iterable[tuple[str, int]],
) -> RunChoice:
    """One run per job across restarts: the checkpoint's run while it is alive on this server, else the oldest
    live run tagged with the job's identity (a run created before any checkpoint named it), else a new one.

    ``stored_state`` is the stored run's lifecycle on the server ("active", "deleted", or None: not found or not
    asked); ``tagged`` are (run id, start time) of the live runs carrying the job's tag."""
    if stored is not None and stored.tracking_uri.rstrip("/") == tracking_uri.rstrip("/"):
        if stored_state == "active":
            return RunChoice(stored.run_id, "the run named in the checkpoint")
    tagged = sorted(tagged, key=lambda item: item[1])
    if tagged:
        return RunChoice(tagged[0][0], "the run tagged with this job")
    if stored is not None and stored.tracking_uri.rstrip("/") != tracking_uri.rstrip("/"):
        return RunChoice(None, f"the checkpoint's run is on another server ({stored.tracking_uri})")
    if stored is not None:
        return RunChoice(None, f"the checkpoint's run {stored.run_id} is {stored_state or 'gone'}")
    return RunChoice(None, "no run for this job yet")


# ---- the send queue -------------------------------------------------------------------------------------


@dataclass
class _Call:
    name: str
    send: Callable[[], None]


@dataclass
class SendReport:
    """What the queue could not deliver by the end."""

    unsent_points: int = 0
    unsent_calls: list[str] = field(default_factory=list)
    dropped_points: int = 0

    @property
    def complete(self) -> bool:
        return not (self.unsent_points or self.unsent_calls or self.dropped_points)

    def describe(self) -> str:
        parts = []
        if self.unsent_points:
            parts.append(f"{self.unsent_points} metric points")
        if self.unsent_calls:
            parts.append(f"{len(self.unsent_calls)} calls ({', '.join(self.unsent_calls[:5])})")
        if self.dropped_points:
            parts.append(f"{self.dropped_points} metric points dropped while the queue was full")
        return "; ".join(parts) or "nothing"


class SendQueue:
    """Calls and metric points sent in order; consecutive points go in batches, at most one partial batch every
    ``flush_interval`` seconds. ``pump`` makes at most one attempt
    and says when the next is due, so tests drive it with a fake clock; ``start`` runs it on a daemon thread.

    A failed attempt is retried after ``initial_backoff`` seconds, doubling up to ``max_backoff``; an error that
    ``is_permanent`` calls final (the server answered and refused) drops the item. Beyond ``max_points`` queued
    points the oldest are dropped (counted): memory stays bounded during a long outage.
    """

    def __init__(
        self,
        send_points: Callable[[list[MetricPoint]], None],
        *,
        is_permanent: Callable[[BaseException], bool] = lambda exc: False,
        on_state: Callable[[bool | None, int], None] = lambda up, queued: None,
        clock: Callable[[], float] = time.monotonic,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        max_points: int = 200_000,
        batch_size: int = MAX_BATCH_METRICS,
        flush_interval: float = 1.0,
    ) -> None:
        self._send_points = send_points
        self._is_permanent = is_permanent
        self._on_state = on_state
        self._clock = clock
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.max_points = max_points
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self._next_points_at = 0.0
        self._flushing = False
        self._items: deque[_Call | MetricPoint] = deque()
        self._points = 0
        self.dropped_points = 0
        self.failures = 0
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._items)

    def call(self, name: str, send: Callable[[], None]) -> None:
        with self._lock:
            self._items.append(_Call(name, send))
        self._wake.set()

    def points(self, points: Iterable[MetricPoint]) -> None:
        with self._lock:
            for point in points:
                self._items.append(point)
                self._points += 1
            while self._points > self.max_points:
                self._drop_oldest_point()
        self._wake.set()

    def _drop_oldest_point(self) -> None:
        for i, item in enumerate(self._items):
            if isinstance(item, MetricPoint):
                del self._items[i]
                self._points -= 1
                self.dropped_points += 1
                return

    def pump(self) -> float:
        """One attempt if one is due; seconds until the next is due (0: now, inf: nothing queued)."""
        now = self._clock()
        if now < self._retry_at:
            return self._retry_at - now
        with self._lock:
            if not self._items:
                return math.inf
            head = self._items[0]
            batch: list[MetricPoint] = []
            if isinstance(head, MetricPoint):
                for item in self._items:
                    if not isinstance(item, MetricPoint) or len(batch) == self.batch_size:
                        break
                    batch.append(item)
            # Points wait up to flush_interval for company (a call behind them, a full batch or the close do not):
            # one request a second instead of one per log event keeps the sending off the training's CPU.
            partial = len(batch) == len(self._items) and len(batch) < self.batch_size
        if batch and partial and not self._flushing and now < self._next_points_at:
            return self._next_points_at - now
        try:
            if batch:
                self._send_points(batch)
            else:
                assert isinstance(head, _Call)
                head.send()
        except Exception as exc:  # every failure is the queue's to handle: training must never see it
            if not self._is_permanent(exc):
                return self._retry_later(head, batch, exc)
            log.warning("tracking: %s refused for good, dropped: %s", self._name(head, batch), exc)
        self._remove(head, batch)
        if batch:
            self._next_points_at = now + self.flush_interval
        self.failures = 0
        self._retry_at = 0.0
        self._on_state(True, self.queued)
        return 0.0 if self.queued else math.inf

    def _retry_later(self, head: _Call | MetricPoint, batch: list[MetricPoint], exc: BaseException) -> float:
        delay = float(min(self.max_backoff, self.initial_backoff * 2.0 ** min(self.failures, 30)))
        self.failures += 1
        self._retry_at = self._clock() + delay
        if self.failures == 1:
            log.warning("tracking: %s failed (%s); retrying in the background", self._name(head, batch), exc)
        self._on_state(False, self.queued)
        return delay

    @staticmethod
    def _name(head: _Call | MetricPoint, batch: list[MetricPoint]) -> str:
        return f"{len(batch)} metric points" if batch else getattr(head, "name", "call")

    def _remove(self, head: _Call | MetricPoint, batch: list[MetricPoint]) -> None:
        with self._lock:
            if not batch:
                if self._items and self._items[0] is head:
                    self._items.popleft()
                return
            # By identity: a full queue may have dropped some of the batch's points meanwhile.
            sent = {id(point) for point in batch}
            while self._items and id(self._items[0]) in sent:
                self._items.popleft()
                self._points -= 1

    def report(self) -> SendReport:
        with self._lock:
            calls = [item.name for item in self._items if isinstance(item, _Call)]
            return SendReport(self._points, calls, self.dropped_points)

    # the thread ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tracking-send", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            delay = self.pump()
            if delay > 0:
                self._wake.wait(None if math.isinf(delay) else delay)
                self._wake.clear()

    def close(self, timeout: float, *, retry_every: float = 2.0) -> SendReport:
        """Send what is queued for at most ``timeout`` seconds (retrying at least every ``retry_every``), stop the
        thread and return what was left; the run's end must not wait on a tracking server for longer."""
        deadline = self._clock() + timeout
        self._flushing = True
        self.max_backoff = min(self.max_backoff, retry_every)
        self._retry_at = min(self._retry_at, self._clock() + retry_every)
        self._wake.set()
        while self.queued and self._clock() < deadline and self._thread is not None and self._thread.is_alive():
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - self._clock()) + 1.0)
        return self.report()

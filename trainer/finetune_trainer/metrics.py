"""Prometheus metrics of one trainer rank: an HTTP endpoint on every rank and, on rank 0, pushes to a Pushgateway.

Every rank serves ``/metrics`` on port ``metrics.port + LOCAL_RANK``, bound to the address the pod's own hostname
resolves to (``0.0.0.0`` when it does not resolve). Every series carries the labels ``rank`` (global rank),
``job_name`` and ``job_namespace`` (the owning FineTuneJob; not ``job``/``namespace``, which Prometheus and the
Pushgateway set on their own). The operator reads rank 0's endpoint for the job's progress.

Metric names:

============================================  =========  =======================================================
name                                          type       meaning
============================================  =========  =======================================================
``finetune_train_loss``                       gauge      training loss averaged over the last logging interval
``finetune_eval_loss``                        gauge      loss on the eval split at the latest evaluation
``finetune_best_eval_loss``                   gauge      lowest eval loss so far (NaN before the first evaluation)
``finetune_learning_rate``                    gauge      learning rate of the latest optimizer step
``finetune_step``                             gauge      optimizer steps done (global step)
``finetune_total_steps``                      gauge      optimizer steps planned for the whole run
``finetune_epoch``                            gauge      fractional epoch
``finetune_tokens_per_second``                gauge      non-padding tokens this rank trained on per second
``finetune_samples_per_second``               gauge      sequences this rank trained on per second
``finetune_tokens_total``                     counter    non-padding tokens this rank trained on (this attempt)
``finetune_samples_total``                    counter    sequences this rank trained on (this attempt)
``finetune_gpu_memory_bytes``                 gauge      GPU memory allocated by this rank (0 on CPU)
``finetune_checkpoint_upload_seconds``        histogram  wall time of one checkpoint upload (this node's share)
``finetune_s3_bytes_total{direction}``        counter    bytes moved to (``upload``) or from (``download``) storage
``finetune_last_checkpoint_step``             gauge      step of the newest complete checkpoint (-1: none yet)
``finetune_best_checkpoint_step``             gauge      step of the complete checkpoint with the lowest eval loss
                                                         (-1: none; rank 0 only, where manifests are written)
``finetune_started_timestamp_seconds``        gauge      Unix time this rank started
``finetune_finished_timestamp_seconds``       gauge      Unix time this rank finished (0 while running)
============================================  =========  =======================================================

Rates are per rank: sum ``finetune_tokens_per_second`` over ``rank`` for the job's throughput.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, push_to_gateway, start_http_server
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)

LABELS = ("rank", "job_name", "job_namespace")
# Checkpoints of small models upload in well under a second, large ones in minutes.
UPLOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, float("inf"))
PUSH_TIMEOUT_S = 5.0


def bind_address() -> str:
    """The address the pod's own hostname resolves to: pods sharing a network namespace each get their own."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "0.0.0.0"


class TrainerMetrics:
    """The metrics of one rank, in a registry of its own (so tests can run several in one process)."""

    def __init__(self, rank: int, job_name: str, job_namespace: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"rank": str(rank), "job_name": job_name, "job_namespace": job_namespace}

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, LABELS, registry=self.registry).labels(**labels)

        self.train_loss = gauge("finetune_train_loss", "Training loss averaged over the last logging interval.")
        self.eval_loss = gauge("finetune_eval_loss", "Loss on the eval split at the latest evaluation.")
        self.best_eval_loss = gauge("finetune_best_eval_loss", "Lowest eval loss so far.")
        self.learning_rate = gauge("finetune_learning_rate", "Learning rate of the latest optimizer step.")
        self.step = gauge("finetune_step", "Optimizer steps done.")
        self.total_steps = gauge("finetune_total_steps", "Optimizer steps planned.")
        self.epoch = gauge("finetune_epoch", "Fractional epoch.")
        self.tokens_per_second = gauge("finetune_tokens_per_second", "Non-padding tokens per second on this rank.")
        self.samples_per_second = gauge("finetune_samples_per_second", "Sequences per second on this rank.")
        self.gpu_memory_bytes = gauge("finetune_gpu_memory_bytes", "GPU memory allocated by this rank.")
        self.last_checkpoint_step = gauge("finetune_last_checkpoint_step", "Step of the newest complete checkpoint.")
        self.best_checkpoint_step = gauge(
            "finetune_best_checkpoint_step", "Step of the complete checkpoint with the lowest eval loss."
        )
        self.data_progress = gauge(
            "finetune_data_preparation_progress",
            "Fraction of the dataset this rank has prepared: -1 before preparation starts, 1 when the data is ready.",
        )
        self.data_rows = gauge("finetune_data_prepared_rows", "Rows this rank's data preparation has read.")
        self.data_eta = gauge(
            "finetune_data_preparation_eta_seconds", "Seconds this rank's data preparation needs at its current speed."
        )
        self.started = gauge("finetune_started_timestamp_seconds", "Unix time this rank started.")
        self.finished = gauge("finetune_finished_timestamp_seconds", "Unix time this rank finished.")
        self.checkpoint_upload_seconds = Histogram(
            "finetune_checkpoint_upload_seconds",
            "Wall time of one checkpoint upload (this node's share).",
            LABELS,
            buckets=UPLOAD_BUCKETS,
            registry=self.registry,
        ).labels(**labels)
        self.tokens_total = Counter(
            "finetune_tokens", "Non-padding tokens this rank trained on.", LABELS, registry=self.registry
        ).labels(**labels)
        self.samples_total = Counter(
            "finetune_samples", "Sequences this rank trained on.", LABELS, registry=self.registry
        ).labels(**labels)
        s3_bytes = Counter(
            "finetune_s3_bytes",
            "Bytes moved to or from object storage.",
            (*LABELS, "direction"),
            registry=self.registry,
        )
        self._s3_upload = s3_bytes.labels(**labels, direction="upload")
        self._s3_download = s3_bytes.labels(**labels, direction="download")
        self.best_eval_loss.set(math.nan)
        self.eval_loss.set(math.nan)
        self.train_loss.set(math.nan)
        self.last_checkpoint_step.set(-1)
        self.data_progress.set(-1)
        self.best_checkpoint_step.set(-1)
        self.started.set(time.time())
        self.best_eval = math.nan
        self._server: Any = None
        self._pusher: _Pusher | None = None

    def record_data_preparation(self, rows: int, fraction: float, seconds_left: float) -> None:
        """Progress of the data preparation (``data_prepare``'s hook), kept below 1 until the data is ready."""
        self.data_rows.set(rows)
        self.data_progress.set(min(fraction, 0.999))
        self.data_eta.set(seconds_left)

    def data_ready(self) -> None:
        self.data_progress.set(1)
        self.data_eta.set(0)

    def record_eval_loss(self, loss: float) -> None:
        self.eval_loss.set(loss)
        if math.isnan(self.best_eval) or loss < self.best_eval:
            self.best_eval = loss
            self.best_eval_loss.set(loss)

    def count_s3_bytes(self, direction: str, count: int) -> None:
        (self._s3_upload if direction == "upload" else self._s3_download).inc(count)

    def serve(self, port: int, address: str | None = None) -> str | None:
        """Start the endpoint; a taken port is logged, not fatal: training matters more than its metrics."""
        address = address or bind_address()
        try:
            self._server, _ = start_http_server(port, addr=address, registry=self.registry)
        except OSError as exc:
            log.warning("metrics endpoint %s:%d not started: %s", address, port, exc)
            return None
        return f"http://{address}:{port}/metrics"

    def enable_push(self, url: str, job_name: str, grouping_key: dict[str, str]) -> None:
        self._pusher = _Pusher(lambda: push_to_gateway(url, job_name, self.registry, grouping_key, PUSH_TIMEOUT_S))

    def push_soon(self) -> None:
        """Ask for a push without waiting for it: a slow Pushgateway must not slow training down."""
        if self._pusher is not None:
            self._pusher.request()

    def close(self) -> None:
        """Mark the rank finished, push once more synchronously (rank 0) and stop the endpoint."""
        self.finished.set(time.time())
        if self._pusher is not None:
            self._pusher.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Pusher:
    """One daemon thread pushing the newest state when asked; requests made while a push runs coalesce."""

    def __init__(self, push: Callable[[], None]) -> None:
        self._push = push
        self._wanted = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="metrics-push", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._wanted.set()

    def stop(self) -> None:
        self._stopping = True
        self._wanted.set()
        self._thread.join(PUSH_TIMEOUT_S * 2)
        self._push_once()

    def _loop(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stopping:
                return
            self._push_once()

    def _push_once(self) -> None:
        try:
            self._push()
        except Exception as exc:  # any failure to push is only logged: training goes on
            log.warning("push to the Pushgateway failed: %s", exc)


class TokenCounter:
    """Non-padding tokens and sequences of the training batches this rank trained on; counted on the CPU.

    HF's ``include_num_input_tokens_seen`` gathers a count across ranks after every micro-step, a synchronisation
    this avoids: rates are per rank, and the run's total is summed once at the end. Batches are measured when
    collated and counted when a training step consumes them, because the data loader collates one batch ahead.
    """

    def __init__(self, measure: Callable[[dict[str, Any]], int] | None = None) -> None:
        # Non-padding tokens of a collated batch (the data module knows packed batches); default: every token.
        self.measure = measure or (lambda batch: int(batch["input_ids"].numel()))
        self.tokens = 0
        self.samples = 0
        # Tokens of the run before the checkpoint it resumed from (rank 0 holds them, the others 0).
        self.restored_tokens = 0
        self._collated: deque[tuple[int, int]] = deque()

    def collated(self, batch: dict[str, Any]) -> None:
        self._collated.append((self.measure(batch), int(batch["input_ids"].shape[0])))

    def consumed(self) -> None:
        if self._collated:
            tokens, samples = self._collated.popleft()
            self.tokens += tokens
            self.samples += samples


class MetricsCallback(TrainerCallback):
    """Keeps the gauges current from the Trainer's events; rank 0 pushes after every log."""

    def __init__(self, metrics: TrainerMetrics, counter: TokenCounter) -> None:
        self.metrics = metrics
        self.counter = counter
        self._last_time = time.monotonic()
        self._last_tokens = 0
        self._last_samples = 0
        self._counted_tokens = 0
        self._counted_samples = 0
        # Tokens per second of the logging interval that ended last (the history records it too).
        self.last_tokens_per_second: float | None = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.metrics.total_steps.set(state.max_steps)
        self.metrics.step.set(state.global_step)
        self._reset_rates()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        m = self.metrics
        m.step.set(state.global_step)
        m.epoch.set(state.epoch or 0.0)
        m.tokens_total.inc(self.counter.tokens - self._counted_tokens)
        m.samples_total.inc(self.counter.samples - self._counted_samples)
        self._counted_tokens, self._counted_samples = self.counter.tokens, self.counter.samples

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        m = self.metrics
        if "loss" in logs:
            m.train_loss.set(logs["loss"])
            now = time.monotonic()
            elapsed = max(now - self._last_time, 1e-9)
            self.last_tokens_per_second = (self.counter.tokens - self._last_tokens) / elapsed
            m.tokens_per_second.set(self.last_tokens_per_second)
            m.samples_per_second.set((self.counter.samples - self._last_samples) / elapsed)
            self._reset_rates()
        if "learning_rate" in logs:
            m.learning_rate.set(logs["learning_rate"])
        if "eval_loss" in logs:
            m.record_eval_loss(logs["eval_loss"])
        if torch.cuda.is_available():
            m.gpu_memory_bytes.set(torch.cuda.memory_allocated())
        m.push_soon()

    def _reset_rates(self) -> None:
        self._last_time = time.monotonic()
        self._last_tokens = self.counter.tokens
        self._last_samples = self.counter.samples

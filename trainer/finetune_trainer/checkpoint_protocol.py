"""The checkpoint protocol: when to save, the background upload, the manifest committed last, retention, SIGTERM.

Saving: every ``checkpoint.everySteps`` steps and/or ``everyMinutes`` minutes a step ends with a save; HF and
DeepSpeed write the checkpoint on every rank (each rank its own ZeRO shard and RNG state, on its own node's disk).
Then each node's local rank 0 uploads, in a background thread while training goes on, the files its node wrote (a
file several nodes wrote is uploaded by the lowest node only). At step boundaries the ranks agree, in one tiny
all_reduce on a gloo group (shared with the SIGTERM and time checks; run at the steps the ranks agreed on, about
every ``CONTROL_INTERVAL_S``), on whether every node's upload has ended; then the nodes' file lists are
all_gathered and global rank 0 writes the manifest and applies retention (see ``checkpoints``). At most one
checkpoint is in flight: a save due while the previous upload still runs waits for it. An upload that fails after
its retries leaves the checkpoint incomplete; training goes on. Local copies are deleted once uploaded: node-local
disk is the scarcer resource and resume always reads from storage.

SIGTERM: at the next flag exchange (a step boundary within about ``CONTROL_INTERVAL_S``) the ranks agree
(all_reduce MAX, so a SIGTERM on any rank counts) to save now; the emergency checkpoint is uploaded synchronously,
within ``checkpoint.gracePeriodSeconds`` of the SIGTERM minus a safety margin, and training stops; the trainer then
exits with PREEMPTED (also when the upload could not finish in time: the reason then names the newest complete
one). A SIGTERM arriving after the last step lets the export finish.

Retries live in the storage layer only (``storage.errors.call_with_retries``): every store call here goes through
a store bounded by the checkpoint's deadline (``ObjectStore.retrying_until``), so a storage restart is ridden out
request by request, and nothing here retries a call again.

``CheckpointProtocol`` holds all of this and knows nothing of HF's Trainer; ``CheckpointCallback`` is the shell that
feeds it the Trainer's events and turns its answers into ``TrainerControl`` flags.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune_trainer.checkpoints import (
    BACKGROUND_UPLOAD_BUDGET_S,
    CHECKPOINTS_DIR,
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    assign_uploads,
    best_step,
    checkpoint_key,
    list_local_files,
    local_checkpoint_dir,
    parse_checkpoint_name,
    retained_steps,
)
from finetune_trainer.config import TrainerConfig
from finetune_trainer.distributed import DistContext, Preemption
from finetune_trainer.metrics import TokenCounter, TrainerMetrics
from finetune_trainer.storage import ObjectStore, sha256_file

log = logging.getLogger(__name__)

# Reserved for closing the emergency checkpoint and the process after the upload.
GRACE_MARGIN_S = 5.0
UPLOAD_NICENESS = 10
# How often (in wall time) the ranks exchange their control flags; and the most steps between two exchanges.
CONTROL_INTERVAL_S = 0.5
MAX_EXCHANGE_INTERVAL = 32


@dataclass
class NodeUpload:
    """One node's share of one checkpoint, uploaded by a background thread on the node's local rank 0."""

    step: int
    files: list[tuple[str, Path]]
    destination: str
    store: ObjectStore
    metrics: TrainerMetrics | None
    deadline: float
    # False for the SIGTERM checkpoint: training has stopped and the grace period is short, so every stream helps.
    background: bool = True
    entries: list[FileEntry] = field(default_factory=list)
    error: str | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"upload-step-{self.step}", daemon=True)
        self.thread.start()

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def wait(self, deadline: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
        if self.running:
            self.error = self.error or "upload did not finish before the deadline"

    def _run(self) -> None:
        started = time.monotonic()
        with contextlib.suppress(OSError, AttributeError):
            # Threads are tasks on Linux: only this one (and the part uploaders it starts) yield the CPU to training.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), UPLOAD_NICENESS)
        try:
            store = self.store.retrying_until(self.deadline)
            for relative, local in self.files:
                size = local.stat().st_size
                digest = sha256_file(local)
                store.upload_file(local, self.destination + relative, background=self.background)
                self.entries.append(FileEntry(relative, size, digest))
        except Exception as exc:  # reported to every rank at the next step boundary; training goes on
            self.error = f"{type(exc).__name__}: {exc}"
        if self.metrics is not None:
            self.metrics.checkpoint_upload_seconds.observe(time.monotonic() - started)


@dataclass(frozen=True)
class Flags:
    """What the ranks agree on at an exchange: any SIGTERM, a time-based save due, any upload still running."""

    preempt: bool
    time_due: bool
    busy: bool


@dataclass(frozen=True)
class StepDecision:
    """What training does after a step: save a checkpoint now; stop (after that save, with no evaluation first)."""

    save: bool = False
    stop: bool = False


@dataclass
class Pending:
    """A checkpoint whose upload has started but is not complete yet; identical on every rank."""

    step: int
    eval_loss: float | None
    tokens_seen: int
    local_dir: Path
    upload: NodeUpload | None


class CheckpointProtocol:
    """Decides when to save, uploads what was saved, commits manifests, applies retention, handles SIGTERM.

    Every rank holds one and calls ``begin``, ``after_step``, ``saved`` and ``finish`` at the same points of
    training: those are collective.
    """

    def __init__(
        self,
        config: TrainerConfig,
        store: ObjectStore,
        ctx: DistContext,
        preemption: Preemption,
        counter: TokenCounter,
        metrics: TrainerMetrics | None = None,
        complete: dict[int, float | None] | None = None,
        resumed_dir: Path | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.ctx = ctx
        self.preemption = preemption
        self.counter = counter
        self.metrics = metrics
        # Complete checkpoints in storage {step: eval loss}; known and used on rank 0 only.
        self.complete: dict[int, float | None] = dict(complete or {})
        self.resumed_dir = resumed_dir
        self.pending: Pending | None = None
        self.preempted = False
        self.preempt_deadline: float | None = None
        self.emergency_step: int | None = None
        # Rank 0 only: the step whose manifest could not be written (the gathered uploads had succeeded).
        self.commit_failed_step: int | None = None
        self.last_complete_step: int | None = max(self.complete) if self.complete else None
        self._eval_losses: dict[int, float] = {}
        self._last_save = time.monotonic()
        self._commit: threading.Thread | None = None
        self._next_exchange = 0
        self._last_exchange_step = 0
        self._last_exchange_time = time.monotonic()
        self._every_steps = config.checkpoint.everySteps
        minutes = config.checkpoint.effective_every_minutes
        self._every_seconds = None if minutes is None else minutes * 60.0

    @property
    def emergency_checkpoint_complete(self) -> bool:
        """Whether the SIGTERM checkpoint was uploaded (on rank 0: and its manifest written)."""
        step = self.emergency_step
        return step is not None and self.last_complete_step == step and self.commit_failed_step != step

    # training's events ---------------------------------------------------------------------------------------

    def begin(self, step: int) -> None:
        """Training starts (or resumes) at ``step``: SIGTERM now means an emergency checkpoint."""
        self._last_save = time.monotonic()
        self._last_exchange_step, self._last_exchange_time = step, time.monotonic()
        self._next_exchange = step + 1
        self.preemption.armed = True
        if self.metrics is not None and self.last_complete_step is not None:
            self.metrics.last_checkpoint_step.set(self.last_complete_step)
        self._publish_best()

    def after_step(self, step: int) -> StepDecision:
        """Step ``step`` is done: exchange flags when due, finish an ended upload, and say whether to save or stop."""
        if self.resumed_dir is not None and self.ctx.is_node_leader:
            # Only now are model, optimizer and RNG state all loaded from it.
            shutil.rmtree(self.resumed_dir, ignore_errors=True)
        self.resumed_dir = None
        steps_due = self._every_steps is not None and step % self._every_steps == 0
        if step < self._next_exchange:
            return StepDecision(save=steps_due)
        flags = self._exchange(step)
        if self.pending is not None and not flags.busy:
            self._finish_pending()
        if flags.preempt:
            self.preempted = True
            self.preempt_deadline = (
                (self.preemption.requested_at or time.monotonic())
                + self.config.checkpoint.gracePeriodSeconds
                - GRACE_MARGIN_S
            )
            if self.ctx.rank == 0:
                log.warning("SIGTERM: saving an emergency checkpoint at step %d and stopping", step)
            return StepDecision(save=True, stop=True)
        return StepDecision(save=steps_due or flags.time_due)

    def record_eval_loss(self, step: int, loss: float) -> None:
        self._eval_losses[step] = loss

    def saved(self, step: int, local_dir: Path) -> None:
        """Every rank wrote its part of the checkpoint of ``step`` into ``local_dir``: start uploading it.

        The emergency checkpoint is uploaded and committed before this returns."""
        deadline = self.preempt_deadline if self.preempted else None
        # At most one checkpoint in flight: the previous one completes (or fails) first.
        self._drain(deadline)
        self._last_save = time.monotonic()
        # Other ranks may still be writing their RNG state into the folder.
        self.ctx.barrier()
        self.pending = self._start_upload(step, local_dir, deadline)
        if self.preempted:
            self.emergency_step = step
            self._drain(deadline)
            self.wait_for_commit(deadline)
            self.ctx.barrier()

    def finish(self, deadline: float | None = None) -> None:
        """Complete whatever is in flight (collective: every rank calls it)."""
        self._drain(deadline)
        self.wait_for_commit(deadline)

    def wait_for_commit(self, deadline: float | None = None) -> None:
        if self._commit is not None:
            self._commit.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
            self._commit = None

    # the exchange --------------------------------------------------------------------------------------------

    def _exchange(self, step: int) -> Flags:
        """Combine every rank's flags with MAX (collective) and agree on the step of the next exchange.

        Exchanging at every step would cost a round trip per step, a few percent of a short step; instead each rank
        proposes an interval of about ``CONTROL_INTERVAL_S`` worth of its recent steps and the largest wins, so all
        ranks exchange at the same steps while SIGTERM, time-based saves and finished uploads are noticed within
        about that long (at every step once steps take longer than that).
        """
        now = time.monotonic()
        steps_since = max(step - self._last_exchange_step, 1)
        step_seconds = (now - self._last_exchange_time) / steps_since
        proposed = min(MAX_EXCHANGE_INTERVAL, max(1, int(CONTROL_INTERVAL_S / max(step_seconds, 1e-6))))
        pending = self.pending
        preempt, time_due, busy, interval = self.ctx.all_reduce_max(
            [
                int(self.preemption.requested),
                int(self._every_seconds is not None and now - self._last_save >= self._every_seconds),
                int(pending is not None and pending.upload is not None and pending.upload.running),
                proposed,
            ]
        )
        self._last_exchange_step, self._last_exchange_time = step, now
        self._next_exchange = step + interval
        return Flags(preempt=bool(preempt), time_due=bool(time_due), busy=bool(busy))

    # upload and commit ---------------------------------------------------------------------------------------

    def _start_upload(self, step: int, local_dir: Path, deadline: float | None) -> Pending:
        """Share out the nodes' files and start this node's upload (collective)."""
        listing = list_local_files(local_dir) if self.ctx.is_node_leader and local_dir.is_dir() else None
        gathered = self.ctx.all_gather(
            {"node": self.ctx.node_rank, "files": listing, "tokens": self.counter.tokens}
            if self.ctx.is_node_leader
            else {"tokens": self.counter.tokens}
        )
        tokens_seen = sum(int(g["tokens"]) for g in gathered) + self.counter.restored_tokens
        leaders = self.ctx.node_leaders(gathered)
        owned = assign_uploads([None if leader is None else leader["files"] for leader in leaders])
        upload = None
        if self.ctx.is_node_leader:
            upload = NodeUpload(
                step=step,
                files=[(rel, local_dir / rel) for rel in owned[self.ctx.node_rank]],
                destination=checkpoint_key(step),
                store=self.store,
                metrics=self.metrics,
                deadline=deadline or time.monotonic() + BACKGROUND_UPLOAD_BUDGET_S,
                background=not self.preempted,
            )
            upload.start()
        return Pending(step, self._eval_losses.get(step), tokens_seen, local_dir, upload)

    def _drain(self, deadline: float | None) -> None:
        """Wait until the pending checkpoint's uploads ended on every node, then finish it (collective)."""
        if self.pending is None:
            return
        if self.pending.upload is not None:
            self.pending.upload.wait(deadline)
        self._finish_pending()

    def _finish_pending(self) -> None:
        """Every node's upload has ended: gather the outcome; rank 0 commits the manifest (collective)."""
        pending, self.pending = self.pending, None
        assert pending is not None
        upload = pending.upload
        report = (
            {"node": self.ctx.node_rank, "entries": [asdict(e) for e in upload.entries], "error": upload.error}
            if upload is not None
            else None
        )
        leaders = self.ctx.node_leaders(self.ctx.all_gather(report))
        if self.ctx.is_node_leader:
            shutil.rmtree(pending.local_dir, ignore_errors=True)
        errors = [
            f"node {node}: {'no report' if leader is None else leader['error']}"
            for node, leader in enumerate(leaders)
            if leader is None or leader["error"]
        ]
        if errors:
            if self.ctx.rank == 0:
                log.error(
                    "checkpoint at step %d is incomplete and will not be used: %s", pending.step, "; ".join(errors)
                )
            return
        if self.metrics is not None:
            self.metrics.last_checkpoint_step.set(pending.step)
        self.last_complete_step = pending.step
        if self.ctx.rank != 0:
            return
        entries = sorted(
            (FileEntry(**entry) for leader in leaders for entry in leader["entries"]), key=lambda e: e.path
        )
        manifest = Manifest(
            step=pending.step,
            configHash=self.config.config_hash(),
            worldSize=self.ctx.world_size,
            time=datetime.now(UTC).isoformat(timespec="seconds"),
            files=entries,
            evalLoss=pending.eval_loss,
            tokensSeen=pending.tokens_seen,
        )
        self.wait_for_commit(self.preempt_deadline)
        self._commit = threading.Thread(
            target=self._commit_manifest, args=(manifest,), name=f"commit-step-{pending.step}", daemon=True
        )
        self._commit.start()

    def _commit_manifest(self, manifest: Manifest) -> None:
        destination = checkpoint_key(manifest.step)
        deadline = self.preempt_deadline or time.monotonic() + BACKGROUND_UPLOAD_BUDGET_S
        try:
            self.store.retrying_until(deadline).put_bytes(destination + MANIFEST_NAME, manifest.to_json())
        except Exception as exc:  # the checkpoint stays incomplete; training goes on
            log.error("checkpoint at step %d: manifest not written: %s", manifest.step, exc)
            self.commit_failed_step = manifest.step
            return
        log.info("checkpoint at step %d is complete (%d files)", manifest.step, len(manifest.files))
        self.complete[manifest.step] = manifest.evalLoss
        try:
            self._apply_retention(protect=manifest.step)
        except Exception as exc:  # leftovers are deleted by a later retention pass
            log.warning("retention after step %d failed: %s", manifest.step, exc)
        self._publish_best()

    def _publish_best(self) -> None:
        best = best_step(self.complete)
        if self.metrics is not None and best is not None and self.ctx.rank == 0:
            self.metrics.best_checkpoint_step.set(best)

    def _apply_retention(self, protect: int) -> None:
        kept = retained_steps(self.complete, self.config.checkpoint.keep) | {protect}
        stored = self.store.list(f"{CHECKPOINTS_DIR}/")
        steps = {parse_checkpoint_name(info.key.split("/")[1]) for info in stored if info.key.count("/") >= 2}
        # Anything newer than this commit may be the next checkpoint, uploading right now.
        for step in sorted(s for s in steps if s is not None and s not in kept and s < protect):
            self.store.delete_prefix(checkpoint_key(step))
            self.complete.pop(step, None)
            log.info("deleted checkpoint step %d (retention keeps %s)", step, sorted(kept))


class CheckpointCallback(TrainerCallback):
    """HF Trainer's side of the checkpoint protocol: its events in, ``TrainerControl`` flags out."""

    def __init__(self, protocol: CheckpointProtocol) -> None:
        self.protocol = protocol

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.protocol.begin(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        decision = self.protocol.after_step(state.global_step)
        if decision.save:
            control.should_save = True
        if decision.stop:
            control.should_evaluate = False
            control.should_training_stop = True

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if metrics and "eval_loss" in metrics:
            self.protocol.record_eval_loss(state.global_step, float(metrics["eval_loss"]))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.protocol.saved(state.global_step, local_checkpoint_dir(str(args.output_dir), state.global_step))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.protocol.finish()

"""Checkpoints in object storage: cadence, background upload with the manifest written last, retention, resume, SIGTERM.

Layout: ``<output.uri>/checkpoints/step-NNNNNNNN/`` holds the files HF Trainer + DeepSpeed wrote locally into
``<local.workDir>/checkpoints/checkpoint-N/`` (same relative paths) and ``manifest.json``, written LAST: every
file's relative path, size and sha256, the step, ``TrainerConfig.config_hash()``, the world size, the time, the
eval loss measured at that step and the tokens trained on so far. A checkpoint without a valid manifest does not
exist: it is never resumed from and retention deletes it.

Saving (``CheckpointCallback``): every ``checkpoint.everySteps`` steps and/or ``everyMinutes`` minutes the callback
sets ``control.should_save``; HF and DeepSpeed write the checkpoint on every rank (each rank its own ZeRO shard and
RNG state, on its own node's disk). Then each node's local rank 0 uploads, in a background thread while training
goes on, the files its node wrote (a file several nodes wrote is uploaded by the lowest node only). At step
boundaries the ranks agree, in one tiny all_reduce on a gloo group (shared with the SIGTERM and time checks; run at
the steps the ranks agreed on, about every ``CONTROL_INTERVAL_S``), on whether every node's upload has ended;
then the nodes' file lists are all_gathered and global rank 0 writes the manifest and applies retention. At most
one checkpoint is in flight: a save due while the previous upload still runs waits for it. An upload that fails
after its retries leaves the checkpoint incomplete; training goes on.

Retention: the newest ``checkpoint.keep`` complete checkpoints plus the best one (lowest eval loss measured at its
step) stay; everything else under ``checkpoints/`` older than the newest complete one is deleted (newer folders
may be the upload in flight). Local copies are deleted once uploaded: node-local
disk is the scarcer resource and resume always reads from storage.

Resume (``restore_checkpoint``): rank 0 lists the checkpoints newest first and keeps those whose manifest parses
and whose files are all present with the manifest's sizes; each node's local rank 0 downloads the candidate
(DeepSpeed needs the files of every rank on every node) and verifies sha256; the ranks agree, and a candidate
that failed anywhere is skipped with a warning for the next older one. A different config hash is a warning. A
different world size (the job was suspended and given another number of nodes or GPUs) under ZeRO stages 1-3,
whose optimizer shards are per rank: every node converts the checkpoint with DeepSpeed's ``ds_to_universal`` into
a universal checkpoint (weights and Adam states per parameter, loadable by any world size) and DeepSpeed loads that
(``checkpoint.load_universal``); model, optimizer, scheduler and step carry over, the global batch changes with
the world size, and the data order (each rank's shard of the shuffled rows) is not the one the old world size
would have followed. A conversion that fails makes the checkpoint unusable like a failed download. No
checkpoint: training starts fresh.

SIGTERM (``Preemption``): before training starts the handler raises ``Preempted`` (nothing to save yet). Once
training runs it only sets a flag: the step in progress (forward, backward, optimizer step, and any evaluation or
save that step triggers) finishes normally, because a rank interrupted inside a collective would hang the others.
At the next flag exchange (a step boundary within about ``CONTROL_INTERVAL_S``) the ranks agree (all_reduce MAX,
so a SIGTERM on any rank counts) to save now; the emergency checkpoint is uploaded synchronously, within
``checkpoint.gracePeriodSeconds`` of the SIGTERM minus a safety margin, and training stops; the trainer then exits
with PREEMPTED (also when the upload could not finish in time: the reason then names the newest complete one).
A SIGTERM arriving after the last step lets the export finish.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from finetune_trainer.config import TrainerConfig
from finetune_trainer.metrics import TokenCounter, TrainerMetrics
from finetune_trainer.storage import ObjectStore, StorageError, sha256_file

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
# Reserved for closing the emergency checkpoint and the process after the upload.
GRACE_MARGIN_S = 5.0
# A background upload keeps retrying (storage restarts, throttling) this long before the checkpoint is abandoned.
BACKGROUND_UPLOAD_BUDGET_S = 600.0
UPLOAD_NICENESS = 10
# How often (in wall time) the ranks exchange their control flags; and the most steps between two exchanges.
CONTROL_INTERVAL_S = 0.5
MAX_EXCHANGE_INTERVAL = 32


class Preempted(BaseException):
    """SIGTERM arrived; raised where there is nothing to checkpoint yet (before training starts).

    A BaseException, like KeyboardInterrupt: the ``except Exception`` around storage and download code must not
    mistake it for a failed request."""


class ManifestError(ValueError):
    """A manifest does not parse or does not describe a usable checkpoint."""


# --- names --------------------------------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_key(step: int) -> str:
    """The checkpoint's folder, relative to ``output.uri`` (the root of the trainer's output store)."""
    return f"{CHECKPOINTS_DIR}/{checkpoint_name(step)}/"


def parse_checkpoint_name(name: str) -> int | None:
    if len(name) == 13 and name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    return None


def local_checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    """Where HF Trainer writes (and resume places) the checkpoint of ``step``."""
    return Path(output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


# --- manifest -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    step: int
    configHash: str
    worldSize: int
    time: str
    files: list[FileEntry]
    evalLoss: float | None = None
    tokensSeen: int = 0
    format: int = MANIFEST_FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            raw = json.loads(data)
            files = [FileEntry(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in raw["files"]]
            manifest = cls(
                step=int(raw["step"]),
                configHash=str(raw["configHash"]),
                worldSize=int(raw["worldSize"]),
                time=str(raw["time"]),
                files=files,
                evalLoss=None if raw.get("evalLoss") is None else float(raw["evalLoss"]),
                tokensSeen=int(raw.get("tokensSeen", 0)),
                format=int(raw.get("format", MANIFEST_FORMAT)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ManifestError(f"manifest does not parse: {exc}") from exc
        if manifest.format != MANIFEST_FORMAT:
            raise ManifestError(f"manifest format {manifest.format} is not {MANIFEST_FORMAT}")
        if not files:
            raise ManifestError("manifest lists no files")
        for entry in files:
            if entry.path.startswith("/") or ".." in Path(entry.path).parts or entry.path == MANIFEST_NAME:
                raise ManifestError(f"manifest names an unsafe path {entry.path!r}")
            if entry.size < 0 or len(entry.sha256) != 64:
                raise ManifestError(f"manifest entry {entry.path!r} has no valid size or sha256")
        return manifest

    def missing_or_wrong(self, stored_sizes: dict[str, int]) -> list[str]:
        """Files of this manifest absent from ``stored_sizes`` or stored with another size."""
        return [f.path for f in self.files if stored_sizes.get(f.path) != f.size]


def list_local_files(folder: Path) -> list[str]:
    """Relative paths of the regular files under ``folder``, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# --- pure decisions -----------------------------------------------------------------------------------------------


def retained_steps(complete: dict[int, float | None], keep: int) -> set[int]:
    """Steps to keep among complete checkpoints {step: eval loss}: the newest ``keep`` plus the lowest eval loss."""
    kept = set(sorted(complete, reverse=True)[:keep])
    best = best_step(complete)
    if best is not None:
        kept.add(best)
    return kept


def best_step(complete: dict[int, float | None]) -> int | None:
    """The complete checkpoint with the lowest eval loss (None when none has one)."""
    scored = [(loss, step) for step, loss in complete.items() if loss is not None and not math.isnan(loss)]
    return min(scored)[1] if scored else None


def assign_uploads(listings: list[list[str] | None]) -> list[list[str]]:
    """Per node, the files it uploads: each file once, by the lowest node that has it."""
    taken: set[str] = set()
    owned: list[list[str]] = []
    for files in listings:
        mine = [f for f in (files or []) if f not in taken]
        taken.update(mine)
        owned.append(mine)
    return owned


# --- the ranks --------------------------------------------------------------------------------------------------


@dataclass
class DistContext:
    """This rank's place in the gang (torchrun's environment) and a gloo group for small control messages."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    group: Any = None

    @classmethod
    def from_env(cls) -> DistContext:
        env = os.environ
        rank = int(env.get("RANK", "0"))
        local_world_size = int(env.get("LOCAL_WORLD_SIZE", "1"))
        return cls(
            rank=rank,
            local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=int(env.get("WORLD_SIZE", "1")),
            local_world_size=local_world_size,
            node_rank=int(env.get("GROUP_RANK", str(rank // max(local_world_size, 1)))),
        )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def num_nodes(self) -> int:
        return max(self.world_size // max(self.local_world_size, 1), 1)

    @property
    def is_node_leader(self) -> bool:
        return self.local_rank == 0

    def open_control_group(self) -> None:
        """A gloo group of its own: no CUDA synchronisation, and never interleaved with DeepSpeed's traffic."""
        if self.distributed and self.group is None:
            self.group = dist.new_group(backend="gloo")

    def all_reduce_max(self, values: list[int]) -> list[int]:
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return [int(v) for v in tensor.tolist()]

    def all_gather(self, value: Any) -> list[Any]:
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def broadcast(self, value: Any) -> Any:
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def node_leaders(self, gathered: list[Any]) -> list[Any]:
        """From an all_gather, the values of each node's local rank 0, by node."""
        by_node: dict[int, Any] = {}
        for value in gathered:
            if isinstance(value, dict) and "node" in value:
                by_node[int(value["node"])] = value
        return [by_node.get(node) for node in range(self.num_nodes)]


# --- SIGTERM ------------------------------------------------------------------------------------------------------


class Preemption:
    """SIGTERM handling on one rank: raise before training, set a flag during it (see the module docstring)."""

    def __init__(self) -> None:
        self.requested_at: float | None = None
        self.armed = False
        self._previous: Any = None

    def install(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()
        if not self.armed:
            raise Preempted("SIGTERM before training started")


# --- storage I/O ---------------------------------------------------------------------------------------------
# Retries live in the storage layer only (storage.errors.call_with_retries): each store call here goes through a
# store bounded by the checkpoint's deadline (``ObjectStore.retrying_until``), so a storage restart is ridden out
# request by request, and nothing here retries a call again.


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
                key = self.destination + relative
                store.upload_file(local, key, background=self.background)
                self.entries.append(FileEntry(relative, size, digest))
        except Exception as exc:  # reported to every rank at the next step boundary; training goes on
            self.error = f"{type(exc).__name__}: {exc}"
        if self.metrics is not None:
            self.metrics.checkpoint_upload_seconds.observe(time.monotonic() - started)


# --- the callback -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flags:
    """What the ranks agree on at an exchange: any SIGTERM, a time-based save due, any upload still running."""

    preempt: bool
    time_due: bool
    busy: bool


@dataclass
class Pending:
    """A checkpoint whose upload has started but is not complete yet; identical on every rank."""

    step: int
    eval_loss: float | None
    tokens_seen: int
    local_dir: Path
    upload: NodeUpload | None


class CheckpointCallback(TrainerCallback):
    """Decides when to save, uploads what was saved, commits manifests, applies retention, handles SIGTERM."""

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

    # HF events ------------------------------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._last_save = time.monotonic()
        self._last_exchange_step, self._last_exchange_time = state.global_step, time.monotonic()
        self._next_exchange = state.global_step + 1
        self.preemption.armed = True
        if self.metrics is not None and self.last_complete_step is not None:
            self.metrics.last_checkpoint_step.set(self.last_complete_step)
        self._publish_best()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.resumed_dir is not None and self.ctx.is_node_leader:
            # Only now are model, optimizer and RNG state all loaded from it.
            shutil.rmtree(self.resumed_dir, ignore_errors=True)
        self.resumed_dir = None
        step = state.global_step
        if self._every_steps is not None and step % self._every_steps == 0:
            control.should_save = True
        if step < self._next_exchange:
            return
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
            control.should_save = True
            control.should_evaluate = False
            control.should_training_stop = True
        elif flags.time_due:
            control.should_save = True

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

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if metrics and "eval_loss" in metrics:
            self._eval_losses[state.global_step] = float(metrics["eval_loss"])

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        step = state.global_step
        deadline = self.preempt_deadline if self.preempted else None
        # At most one checkpoint in flight: the previous one completes (or fails) first.
        self._drain(deadline)
        self._last_save = time.monotonic()
        local_dir = local_checkpoint_dir(str(args.output_dir), step)
        # Other ranks may still be writing their RNG state into the folder.
        self.ctx.barrier()
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
        eval_loss = self._eval_losses.get(step)
        self.pending = Pending(step, eval_loss, tokens_seen, local_dir, upload)
        if self.preempted:
            self.emergency_step = step
            self._drain(deadline)
            self.wait_for_commit(deadline)
            self.ctx.barrier()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.finish()

    @property
    def emergency_checkpoint_complete(self) -> bool:
        """Whether the SIGTERM checkpoint was uploaded (on rank 0: and its manifest written)."""
        step = self.emergency_step
        return step is not None and self.last_complete_step == step and self.commit_failed_step != step

    # the protocol ---------------------------------------------------------------------------------------------

    def finish(self, deadline: float | None = None) -> None:
        """Complete whatever is in flight (collective: every rank calls it)."""
        self._drain(deadline)
        self.wait_for_commit(deadline)

    def wait_for_commit(self, deadline: float | None = None) -> None:
        if self._commit is not None:
            self._commit.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))
            self._commit = None

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


# --- resume -------------------------------------------------------------------------------------------------------


@dataclass
class Restored:
    """The checkpoint training resumes from, on this node's disk."""

    step: int
    path: Path
    manifest: Manifest
    # Converted for another world size: DeepSpeed must load it with ``checkpoint.load_universal``.
    universal: bool = False


def needs_universal(config: TrainerConfig, manifest: Manifest, world_size: int) -> bool:
    """Whether the checkpoint's ZeRO shards were cut for another world size."""
    return manifest.worldSize != world_size and config.deepspeed.zeroStage > 0


UNIVERSAL_SUFFIX = "_universal"


def convert_to_universal(checkpoint_dir: Path, *, workers: int | None = None) -> str:
    """Convert the DeepSpeed checkpoint in ``checkpoint_dir`` (its ``latest`` tag) into a universal one beside it.

    Writes ``<tag>_universal/`` and ``latest_universal``, which DeepSpeed reads when ``checkpoint.load_universal``
    is on; returns the new tag. Runs DeepSpeed's converter in a child process (it forks workers of its own, which a
    rank holding process groups and threads should not do). RuntimeError with the converter's last lines.
    """
    tag = (checkpoint_dir / "latest").read_text().strip()
    universal = f"{tag}{UNIVERSAL_SUFFIX}"
    shutil.rmtree(checkpoint_dir / universal, ignore_errors=True)
    workers = workers or max(1, min(4, len(os.sched_getaffinity(0))))
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(checkpoint_dir / tag),
        "--output_folder",
        str(checkpoint_dir / universal),
        "--num_extract_workers",
        str(workers),
        "--num_merge_workers",
        str(max(1, workers // 2)),
        "--inject_missing_state",
    ]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (checkpoint_dir / "latest_universal").is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"converting {checkpoint_dir / tag} to a universal checkpoint failed:\n{tail}")
    log.info("converted %s to a universal checkpoint in %.1f s", checkpoint_dir / tag, time.monotonic() - started)
    return universal


def find_candidates(config: TrainerConfig, store: ObjectStore) -> tuple[list[Manifest], dict[int, float | None]]:
    """Usable checkpoints newest first, and every complete one {step: eval loss} (for retention); rank 0 only."""
    by_step: dict[int, dict[str, int]] = {}
    for info in store.list(f"{CHECKPOINTS_DIR}/"):
        _, name, rest = info.key.split("/", 2) if info.key.count("/") >= 2 else ("", "", "")
        step = parse_checkpoint_name(name)
        if step is not None and rest:
            by_step.setdefault(step, {})[rest] = info.size
    candidates: list[Manifest] = []
    complete: dict[int, float | None] = {}
    for step in sorted(by_step, reverse=True):
        files = by_step[step]
        if MANIFEST_NAME not in files:
            log.warning("checkpoint step %d has no manifest (upload interrupted?): skipped", step)
            continue
        try:
            manifest = Manifest.from_json(store.get_bytes(checkpoint_key(step) + MANIFEST_NAME))
        except ManifestError as exc:
            log.warning("checkpoint step %d: %s: skipped", step, exc)
            continue
        if manifest.step != step:
            log.warning("checkpoint step %d: its manifest says step %d: skipped", step, manifest.step)
            continue
        missing = manifest.missing_or_wrong(files)
        if missing:
            log.warning("checkpoint step %d: files missing or of the wrong size (%s): skipped", step, missing[:5])
            continue
        complete[step] = manifest.evalLoss
        if manifest.configHash != config.config_hash():
            log.warning(
                "checkpoint step %d was written with another recipe (config hash %s, now %s): resuming anyway",
                step,
                manifest.configHash,
                config.config_hash(),
            )
        candidates.append(manifest)
    return candidates, complete


def download_checkpoint(store: ObjectStore, manifest: Manifest, target: Path) -> None:
    """Download every file of ``manifest`` into ``target``, verified against its size and sha256 (StorageError)."""
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    source = checkpoint_key(manifest.step)
    store = store.retrying_until(time.monotonic() + BACKGROUND_UPLOAD_BUDGET_S)
    for entry in manifest.files:
        local = staging / entry.path
        local.parent.mkdir(parents=True, exist_ok=True)
        # The store verifies size and sha256 (downloading once more on a mismatch) before the file appears.
        store.download_file(source + entry.path, local, expected_size=entry.size, sha256=entry.sha256)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


def restore_checkpoint(
    config: TrainerConfig,
    store: ObjectStore,
    ctx: DistContext,
    output_dir: Path,
) -> tuple[Restored | None, dict[int, float | None]]:
    """Bring the newest usable checkpoint onto every node (collective); (it or None, complete checkpoints)."""
    if ctx.is_node_leader:
        # Leftovers of an earlier attempt on this disk would be uploaded with the next checkpoint.
        shutil.rmtree(output_dir, ignore_errors=True)
        output_dir.mkdir(parents=True, exist_ok=True)
    found: dict[str, Any] = {}
    if ctx.rank == 0:
        try:
            found["candidates"], found["complete"] = find_candidates(config, store)
        except StorageError as exc:  # shared with the other ranks (an exception does not pickle), raised everywhere
            found["error"] = (f"listing checkpoints failed: {exc}", exc.uri, exc.permanent)
    found = ctx.broadcast(found)
    if "error" in found:
        message, uri, permanent = found["error"]
        raise StorageError(message, uri=uri, permanent=permanent)
    candidates: list[Manifest] = found["candidates"]
    complete: dict[int, float | None] = found["complete"]
    for manifest in candidates:
        target = local_checkpoint_dir(output_dir, manifest.step)
        universal = needs_universal(config, manifest, ctx.world_size)
        if universal and ctx.rank == 0:
            log.warning(
                "checkpoint step %d was written by %d ranks and this run has %d: converting its ZeRO-%d shards to "
                "a universal checkpoint; the global batch is now %d rows and the data order differs from the "
                "earlier run's",
                manifest.step,
                manifest.worldSize,
                ctx.world_size,
                config.deepspeed.zeroStage,
                config.training.batchSize * config.training.gradientAccumulationSteps * ctx.world_size,
            )
        problem = ""
        if ctx.is_node_leader:
            try:
                download_checkpoint(store, manifest, target)
                if universal:
                    convert_to_universal(target)
            except Exception as exc:  # this candidate is unusable; the next older one is tried
                problem = f"{type(exc).__name__}: {exc}"
        (failed,) = ctx.all_reduce_max([int(bool(problem))])
        if problem:
            log.warning(
                "checkpoint step %d could not be restored on node %d: %s", manifest.step, ctx.node_rank, problem
            )
        if failed:
            if ctx.is_node_leader:
                shutil.rmtree(target, ignore_errors=True)
            complete.pop(manifest.step, None)
            continue
        if ctx.rank == 0:
            log.warning("resuming from checkpoint step %d", manifest.step)
        return Restored(manifest.step, target, manifest, universal), complete
    if ctx.rank == 0:
        log.warning("no usable checkpoint under %s/%s/: starting fresh", store.uri, CHECKPOINTS_DIR)
    return None, complete

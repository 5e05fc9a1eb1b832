"""Resume: the newest usable checkpoint found in storage, brought onto every node, converted for a new world size.

``restore_checkpoint``: rank 0 lists the checkpoints newest first and keeps those whose manifest parses and whose
files are all present with the manifest's sizes; each node's local rank 0 downloads the candidate (DeepSpeed needs
the files of every rank on every node) and verifies sha256; the ranks agree, and a candidate that failed anywhere
is skipped with a warning for the next older one. A different config hash is a warning. A different world size
(the job was suspended and given another number of nodes or GPUs) under ZeRO stages 1-3, whose optimizer shards
are per rank: every node converts the checkpoint with DeepSpeed's ``ds_to_universal`` into a universal checkpoint
(weights and Adam states per parameter, loadable by any world size) and DeepSpeed loads that
(``checkpoint.load_universal``); model, optimizer, scheduler and step carry over, the global batch changes with
the world size, and the data order (each rank's shard of the shuffled rows) is not the one the old world size
would have followed. A conversion that fails makes the checkpoint unusable like a failed download. No checkpoint:
training starts fresh.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_trainer.checkpoints import (
    BACKGROUND_UPLOAD_BUDGET_S,
    CHECKPOINTS_DIR,
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    checkpoint_key,
    local_checkpoint_dir,
    needs_universal,
    parse_checkpoint_name,
)
from finetune_trainer.config import TrainerConfig
from finetune_trainer.distributed import DistContext
from finetune_trainer.storage import ObjectStore, StorageError

log = logging.getLogger(__name__)

UNIVERSAL_SUFFIX = "_universal"


@dataclass
class Restored:
    """The checkpoint training resumes from, on this node's disk."""

    step: int
    path: Path
    manifest: Manifest
    # Converted for another world size: DeepSpeed must load it with ``checkpoint.load_universal``.
    universal: bool = False


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

"""Preparing a dataset once: rows read and tokenized by every core of the node into memory-mappable token arrays.

The files are cut into chunks (JSON lines by byte ranges on line boundaries, Parquet by row groups, a JSON array
whole); a pool of worker processes, one per available CPU, turns each chunk into token ids, a trained-token mask and
example lengths with ``ExampleBuilder``; the results are taken in chunk order, so examples keep the order of the
rows, and malformed rows spend the ``maxMalformedRows`` budget in row order, exactly as one process reading every
row would. The examples are appended to flat files (``tokens.i32``, ``trained.u8``) with their offsets; the eval
split and the packing are then decided on example indices and lengths alone, so no step holds the dataset in memory.
See ``data_store`` for the layout and ``MappedDataset`` for how a rank reads it.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from finetune_trainer.config import TrainerConfig
from finetune_trainer.data import (
    IGNORE_INDEX,
    DataFile,
    DataStats,
    ExampleBuilder,
    MalformedBudget,
    Segment,
    file_and_name,
)
from finetune_trainer.data_rows import DataError, MalformedRow, parquet_row_groups, read_rows

log = logging.getLogger(__name__)

# A worker's unit of work: big enough that per-chunk overhead (a pickled result) is noise, small enough that a few
# hundred chunks spread over the cores evenly and progress moves.
CHUNK_BYTES = 4 << 20
# Below this much data the pool's start (a process per core importing the tokenizer) costs more than it saves.
POOL_MIN_BYTES = 16 << 20
ENCODE_BATCH_ROWS = 512
PROGRESS_EVERY_S = 5.0

Int32Array = npt.NDArray[np.int32]
Int64Array = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Chunk:
    """Part of one data file: JSON lines ``[start, end)`` bytes from line ``first_line``, a Parquet row group
    whose first row is ``first_line``, or (``end`` of -1) a whole JSON array file."""

    path: Path
    name: str
    columns: tuple[str, ...]
    start: int
    end: int
    first_line: int
    size: int
    row_group: int | None = None


@dataclass
class ChunkResult:
    """One chunk tokenized: flat ids and trained mask of its examples, their lengths and the chunk's counts."""

    ids: Int32Array
    trained: npt.NDArray[np.uint8]
    lengths: Int32Array
    rows: int = 0
    malformed: list[tuple[str, str]] = field(default_factory=list)
    truncated: int = 0
    dropped_untrained: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    size: int = 0


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a pod's CPU limit)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def plan_chunks(files: Sequence[DataFile], columns: Sequence[str], chunk_bytes: int | None = None) -> list[Chunk]:
    """Every file cut into chunks, in file order; unreadable or unsupported files raise DataError here."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    chunks: list[Chunk] = []
    for item in files:
        path, name = file_and_name(item)
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            first = 1
            for index, rows, size in parquet_row_groups(path, name, columns):
                chunks.append(Chunk(path, name, tuple(columns), 0, 0, first, size, row_group=index))
                first += rows
        elif suffix in (".jsonl", ".json"):
            chunks += _json_chunks(path, name, tuple(columns), chunk_bytes)
        else:
            raise DataError(f"{name}: unsupported file type {suffix or '(none)'} (expected .jsonl, .json or .parquet)")
    return chunks


def _json_chunks(path: Path, name: str, columns: tuple[str, ...], chunk_bytes: int) -> list[Chunk]:
    size = path.stat().st_size
    with path.open("rb") as handle:
        first = handle.read(64).lstrip()
        if path.suffix.lower() == ".json" and first.startswith(b"["):
            return [Chunk(path, name, columns, 0, -1, 1, size)]
        chunks = []
        start, line = 0, 1
        while start < size:
            handle.seek(min(size, start + chunk_bytes))
            handle.readline()  # on to the next line boundary
            end = min(size, handle.tell()) if start + chunk_bytes < size else size
            chunks.append(Chunk(path, name, columns, start, end, line, end - start))
            handle.seek(start)
            line += handle.read(end - start).count(b"\n")
            start = end
    return chunks


# ---- the worker -----------------------------------------------------------------------------------------------

_builder: ExampleBuilder | None = None


def _init_worker(builder: ExampleBuilder) -> None:
    global _builder
    _builder = builder


def tokenize_chunk(chunk: Chunk) -> ChunkResult:
    """The examples of one chunk (in row order) with the builder ``_init_worker`` gave this process."""
    builder = _builder
    assert builder is not None, "_init_worker first"
    result = ChunkResult(np.empty(0, np.int32), np.empty(0, np.uint8), np.empty(0, np.int32), size=chunk.size)
    ids: list[int] = []
    trained: list[int] = []
    lengths: list[int] = []
    pending: list[list[Segment]] = []

    def flush() -> None:
        for example_ids, labels in builder.encode(pending):
            if len(example_ids) > builder.max_seq_length:
                result.truncated += 1
                example_ids, labels = example_ids[: builder.max_seq_length], labels[: builder.max_seq_length]
            mask = [label != IGNORE_INDEX for label in labels]
            trained_count = sum(mask[1:])
            if trained_count == 0:
                result.dropped_untrained += 1
                continue
            result.tokens += len(example_ids)
            result.trained_tokens += trained_count
            ids.extend(example_ids)
            trained.extend(mask)
            lengths.append(len(example_ids))
        pending.clear()

    rows = read_rows(chunk.path, chunk.name, chunk.columns, start=chunk.start, end=None if chunk.end < 0 else chunk.end,
                     first_line=chunk.first_line, row_group=chunk.row_group)
    for location, row, problem in rows:
        result.rows += 1
        if problem is None:
            try:
                pending.append(builder.segments(row))
            except MalformedRow as malformed:
                problem = str(malformed)
        if problem is not None:
            result.malformed.append((location, problem))
        if len(pending) >= ENCODE_BATCH_ROWS:
            flush()
    flush()
    result.ids = np.asarray(ids, dtype=np.int32)
    result.trained = np.asarray(trained, dtype=np.uint8)
    result.lengths = np.asarray(lengths, dtype=np.int32)
    return result


def tokenize_chunks(chunks: Sequence[Chunk], builder: ExampleBuilder, workers: int) -> Iterator[ChunkResult]:
    """Each chunk's result in chunk order, from a pool of ``workers`` processes (in this process when 1)."""
    if workers <= 1:
        _init_worker(builder)
        for chunk in chunks:
            yield tokenize_chunk(chunk)
        return
    # spawn, not fork: the trainer has threads (DeepSpeed, tokenizers, gloo) by now, and a forked lock can deadlock.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(builder,)) as pool:
        yield from pool.imap(tokenize_chunk, chunks)


# ---- the whole preparation --------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """What ``prepare`` wrote: the example offsets, the train and eval example indices, their packing bounds."""

    offsets: Int64Array
    train: Int64Array
    eval: Int64Array
    train_packs: Int64Array | None
    eval_packs: Int64Array | None
    stats: DataStats


ProgressHook = Callable[[int, float, float], None]


class _Progress:
    """Rows/s and ETA in the log every few seconds, and to ``hook`` (rows, fraction done, seconds left)."""

    def __init__(self, total_bytes: int, hook: ProgressHook | None) -> None:
        self.total_bytes = max(1, total_bytes)
        self.hook = hook
        self.started = self.logged = time.monotonic()
        self.rows = 0
        self.bytes = 0

    def add(self, rows: int, size: int) -> None:
        self.rows += rows
        self.bytes += size
        now = time.monotonic()
        fraction = min(1.0, self.bytes / self.total_bytes)
        elapsed = max(now - self.started, 1e-6)
        left = elapsed / fraction - elapsed if fraction > 0 else float("inf")
        if self.hook is not None:
            self.hook(self.rows, fraction, left)
        if now - self.logged >= PROGRESS_EVERY_S:
            self.logged = now
            log.info("preparing data: %d rows (%.0f%%), %.0f rows/s, ETA %.0f s", self.rows, 100 * fraction,
                     self.rows / elapsed, left)


def prepare(
    config: TrainerConfig,
    tokenizer: Any,
    train_files: Sequence[DataFile],
    eval_files: Sequence[DataFile] | None,
    folder: Path,
    *,
    workers: int | None = None,
    on_progress: ProgressHook | None = None,
) -> Prepared:
    """Tokenize ``train_files`` (then ``eval_files``) into ``folder``, split and pack; see the module docstring."""
    dataset, training = config.dataset, config.training
    builder = ExampleBuilder(tokenizer, dataset, training.maxSeqLength)
    train_chunks = plan_chunks(train_files, builder.columns)
    eval_chunks = plan_chunks(eval_files or [], builder.columns)
    chunks = [*train_chunks, *eval_chunks]
    total = sum(c.size for c in chunks)
    if workers is None:
        workers = available_cpus() if total >= POOL_MIN_BYTES else 1
    workers = max(1, min(workers, len(chunks)))
    budget = MalformedBudget(dataset.maxMalformedRows)
    stats = DataStats(files=len(train_files) + len(eval_files or []))
    progress = _Progress(total, on_progress)
    lengths: list[Int32Array] = []
    train_examples = 0
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "tokens.i32").open("wb") as ids_file, (folder / "trained.u8").open("wb") as mask_file:
        for index, result in enumerate(tokenize_chunks(chunks, builder, workers)):
            for location, problem in result.malformed:
                budget.reject(location, problem)
            stats.rows += result.rows
            stats.truncated += result.truncated
            stats.dropped_untrained += result.dropped_untrained
            stats.tokens += result.tokens
            stats.trained_tokens += result.trained_tokens
            stats.examples += len(result.lengths)
            ids_file.write(result.ids.tobytes())
            mask_file.write(result.trained.tobytes())
            lengths.append(result.lengths)
            if index < len(train_chunks):
                train_examples += len(result.lengths)
            progress.add(result.rows, result.size)
    stats.skipped = budget.skipped
    all_lengths = np.concatenate(lengths) if lengths else np.empty(0, np.int32)
    offsets = np.zeros(len(all_lengths) + 1, dtype=np.int64)
    np.cumsum(all_lengths, out=offsets[1:])
    if eval_files:
        train = np.arange(train_examples, dtype=np.int64)
        evaluation = np.arange(train_examples, len(all_lengths), dtype=np.int64)
    else:
        train, evaluation = split_for_eval(len(all_lengths), dataset.effective_eval_split, training.seed)
    names = ", ".join(file_and_name(f)[1] for f in [*train_files, *(eval_files or [])])
    if not len(train):
        raise DataError(f"{names}: no usable training rows ({stats.rows} rows read, {stats.skipped} malformed)")
    if stats.dropped_untrained:
        log.warning("%d examples had no trained token left after truncation to %d tokens and were dropped",
                    stats.dropped_untrained, training.maxSeqLength)
    stats.train_examples, stats.eval_examples = len(train), len(evaluation)
    stats.train_tokens = int(all_lengths[train].sum())
    train_packs = eval_packs = None
    if training.packing:
        train_packs = pack_bounds(all_lengths[train], training.maxSeqLength)
        eval_packs = pack_bounds(all_lengths[evaluation], training.maxSeqLength)
    stats.train_sequences = len(train) if train_packs is None else len(train_packs) - 1
    stats.eval_sequences = len(evaluation) if eval_packs is None else len(eval_packs) - 1
    elapsed = time.monotonic() - progress.started
    log.info("prepared %d rows into %d examples (%d tokens) in %.1f s with %d processes (%.0f rows/s)", stats.rows,
             stats.examples, stats.tokens, elapsed, workers, stats.rows / max(elapsed, 1e-6))
    return Prepared(offsets, train, evaluation, train_packs, eval_packs, stats)


def split_for_eval(count: int, ratio: float, seed: int) -> tuple[Int64Array, Int64Array]:
    """``(train, eval)`` example indices, each ascending: a seeded random ``ratio`` of ``count`` examples (at least
    one when there are two) held out."""
    every = np.arange(count, dtype=np.int64)
    if ratio <= 0 or count < 2:
        return every, np.empty(0, np.int64)
    order = list(range(count))
    random.Random(seed).shuffle(order)
    n_eval = min(count - 1, max(1, round(count * ratio)))
    held_out = np.zeros(count, dtype=bool)
    held_out[np.asarray(order[:n_eval], dtype=np.int64)] = True
    return every[~held_out], every[held_out]


def pack_bounds(lengths: npt.NDArray[np.integer[Any]], max_seq_length: int) -> Int64Array:
    """Packed sequences as bounds into ``lengths``: sequence ``i`` holds examples ``bounds[i]:bounds[i + 1]``.
    Examples are appended in order while they fit; one that does not fit starts the next sequence."""
    bounds = [0]
    used = 0
    for index, n in enumerate(lengths.tolist()):
        if n > max_seq_length:
            raise ValueError(f"an example of {n} tokens is longer than max_seq_length {max_seq_length}")
        if used + n > max_seq_length and used:
            bounds.append(index)
            used = 0
        used += n
    if len(lengths):
        bounds.append(len(lengths))
    return np.asarray(bounds, dtype=np.int64)

"""Prepared datasets on disk: the content key, the node cache and its optional S3 copy, and the memory-mapped reads.

Layout of one prepared dataset, ``<local.cacheDir>/prepared/<key>/``:
    ``tokens.i32`` and ``trained.u8``: every example's token ids (int32) and whether each token carries a loss,
    back to back; ``offsets.npy``: example ``i`` is ``[offsets[i], offsets[i + 1])``; ``train.npy`` / ``eval.npy``:
    the example indices of each split, in data order; ``train_packs.npy`` / ``eval_packs.npy`` (packing only):
    packed sequence ``j`` holds split examples ``packs[j]:packs[j + 1]``; ``meta.json``: the key's inputs and the
    statistics.

The key is a SHA-256 over what decides the contents: each data file's ETag (its content hash when there is none)
and size, the tokenizer (its whole definition, chat template and special tokens), the data settings and this
layout's version. Local rank 0 of each node prepares under a lock, into a temporary folder renamed into place when
complete (a crash never leaves a folder that loads); the other ranks wait for the folder, then every rank maps the
same files, so the data costs each rank almost no memory and the page cache holds one copy per node. With
``dataset.cache`` (an S3 or file URI) the node leader first looks there, and global rank 0 uploads what it prepared
(``meta.json`` last), so later attempts, other nodes and later jobs skip the work. Old prepared datasets are evicted
oldest first once the folder holds more than ``local.preparedDataLimitGB``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from torch.utils.data import Dataset

from finetune_trainer.config import TrainerConfig
from finetune_trainer.data import IGNORE_INDEX, DataFile, DataStats, PaddingCollator, file_and_name
from finetune_trainer.data_prepare import Prepared, ProgressHook, prepare
from finetune_trainer.storage import ByteHook, open_store, pull_dataset, sha256_file

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1
META = "meta.json"
ARRAYS = ("offsets", "train", "eval", "train_packs", "eval_packs")
WAIT_TIMEOUT_S = 6 * 3600.0


# ---- the key --------------------------------------------------------------------------------------------------


def tokenizer_identity(tokenizer: Any) -> str:
    """A hash of everything about the tokenizer that changes token ids: its definition, chat template, specials."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    parts = {
        "definition": hashlib.sha256(definition.encode()).hexdigest(),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")},
        "class": type(tokenizer).__name__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def file_identity(item: DataFile) -> dict[str, Any]:
    """A data file by content: its ETag when it came from object storage, else its SHA-256; and its size."""
    path, name = file_and_name(item)
    etag = getattr(item, "etag", None)
    return {"name": name, "size": path.stat().st_size, "content": etag or f"sha256:{sha256_file(path)}"}


def preparation_key(
    config: TrainerConfig, tokenizer: Any, train_files: Sequence[DataFile], eval_files: Sequence[DataFile] | None
) -> tuple[str, dict[str, Any]]:
    """The prepared dataset's key and what it was computed from (kept in ``meta.json``)."""
    dataset, training = config.dataset, config.training
    inputs = {
        "layout": LAYOUT_VERSION,
        "train": [file_identity(f) for f in train_files],
        "eval": [file_identity(f) for f in eval_files or []],
        "tokenizer": tokenizer_identity(tokenizer),
        "dataset": {
            "format": dataset.format,
            "fields": [dataset.textField, dataset.promptField, dataset.completionField, dataset.messagesField],
            "maxMalformedRows": dataset.maxMalformedRows,
            "evalSplit": 0.0 if eval_files else dataset.effective_eval_split,
        },
        "training": {"maxSeqLength": training.maxSeqLength, "packing": training.packing, "seed": training.seed},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32], inputs


# ---- reading a prepared dataset -----------------------------------------------------------------------------


class MappedDataset(Dataset[dict[str, npt.NDArray[np.int32]]]):
    """One split of a prepared dataset, read through memory maps opened lazily in each process (so a DataLoader
    worker maps the files itself); items are those ``PaddingCollator`` takes."""

    def __init__(self, folder: Path, split: str, packed: bool) -> None:
        self.folder, self.split, self.packed = folder, split, packed
        self._index = np.load(folder / f"{split}.npy", mmap_mode="r")
        self._packs = np.load(folder / f"{split}_packs.npy", mmap_mode="r") if packed else None
        self._maps: tuple[Any, Any, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None}

    def _arrays(self) -> tuple[Any, Any, Any]:
        if self._maps is None:
            tokens = np.memmap(self.folder / "tokens.i32", dtype=np.int32, mode="r")
            trained = np.memmap(self.folder / "trained.u8", dtype=np.uint8, mode="r")
            self._maps = (tokens, trained, np.load(self.folder / "offsets.npy", mmap_mode="r"))
        return self._maps

    def __len__(self) -> int:
        return len(self._index) if self._packs is None else len(self._packs) - 1

    def example(self, position: int) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
        """Token ids and labels of the split's ``position``-th example."""
        tokens, trained, offsets = self._arrays()
        number = int(self._index[position])
        start, end = int(offsets[number]), int(offsets[number + 1])
        ids = np.array(tokens[start:end], dtype=np.int32)
        return ids, np.where(trained[start:end] != 0, ids, IGNORE_INDEX).astype(np.int32)

    def __getitem__(self, index: int) -> dict[str, npt.NDArray[np.int32]]:
        if self._packs is None:
            ids, labels = self.example(index)
            return {"input_ids": ids, "labels": labels}
        return packed_item([self.example(p) for p in range(int(self._packs[index]), int(self._packs[index + 1]))])


def packed_item(pieces: Sequence[tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]]) -> dict[str, Any]:
    """Examples (ids, labels) in one packed sequence: positions restart at each example, and no loss term predicts
    an example's first token from the example before it (see ``data``'s docstring)."""
    ids = np.concatenate([piece_ids for piece_ids, _ in pieces])
    labels = np.concatenate([piece_labels for _, piece_labels in pieces])
    starts = np.cumsum([0, *(len(piece_ids) for piece_ids, _ in pieces[:-1])])
    labels[starts] = IGNORE_INDEX
    positions = np.concatenate([np.arange(len(piece_ids), dtype=np.int32) for piece_ids, _ in pieces])
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


@dataclass
class PreparedData:
    train: MappedDataset
    eval: MappedDataset | None
    collator: PaddingCollator
    stats: DataStats


def open_prepared(folder: Path, tokenizer: Any) -> PreparedData:
    meta = json.loads((folder / META).read_text())
    packed = bool(meta["inputs"]["training"]["packing"])
    stats = DataStats(**meta["stats"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    evaluation = MappedDataset(folder, "eval", packed)
    return PreparedData(
        train=MappedDataset(folder, "train", packed),
        eval=evaluation if len(evaluation) else None,
        collator=PaddingCollator(pad if pad is not None else 0),
        stats=stats,
    )


# ---- writing and caching ----------------------------------------------------------------------------------------


def save_prepared(folder: Path, prepared: Prepared, key: str, inputs: dict[str, Any], seconds: float) -> None:
    """The index arrays and ``meta.json`` beside the token files ``prepare`` wrote (``meta.json`` last)."""
    for name in ARRAYS:
        array = getattr(prepared, name)
        if array is not None:
            np.save(folder / f"{name}.npy", array)
    meta = {"key": key, "inputs": inputs, "stats": vars(prepared.stats), "preparedSeconds": round(seconds, 3)}
    (folder / META).write_text(json.dumps(meta, indent=1, sort_keys=True))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _wait_for(folder: Path, local_rank: int) -> None:
    deadline = time.monotonic() + WAIT_TIMEOUT_S
    delay = 0.05
    while not (folder / META).is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"local rank {local_rank} waited {WAIT_TIMEOUT_S:.0f} s for local rank 0 to prepare the data into "
                f"{folder}; see local rank 0's log"
            )
        time.sleep(delay)
        delay = min(1.0, delay * 1.5)


def _fetch_from_cache(cache_uri: str, key: str, target: Path, config: TrainerConfig,
                      on_bytes: ByteHook | None) -> bool:
    """The prepared dataset ``key`` from ``dataset.cache`` into ``target``; False when it is not there."""
    store = open_store(f"{cache_uri.rstrip('/')}/{key}", config.storage, on_bytes=on_bytes)
    try:
        if store.head(META) is None:
            return False
        started = time.monotonic()
        for info in store.list():
            store.download_file(info.key, target / info.key, expected_size=info.size, etag=info.etag)
        log.info("prepared data %s: fetched from %s in %.1f s", key, store.uri, time.monotonic() - started)
        return True
    finally:
        store.close()


def _upload_to_cache(cache_uri: str, key: str, folder: Path, config: TrainerConfig,
                     on_bytes: ByteHook | None) -> None:
    store = open_store(f"{cache_uri.rstrip('/')}/{key}", config.storage, on_bytes=on_bytes)
    try:
        if store.head(META) is not None:
            return
        started = time.monotonic()
        for path in sorted(folder.iterdir()):
            if path.name != META:
                store.upload_file(path, path.name)
        store.upload_file(folder / META, META)  # last: its presence means the copy is complete
        log.info("prepared data %s: copied to %s in %.1f s", key, store.uri, time.monotonic() - started)
    finally:
        store.close()


def evict(root: Path, keep: str, limit_bytes: float) -> None:
    """Remove the least recently used prepared datasets (never ``keep``) until ``root`` holds ``limit_bytes``."""
    entries = []
    for folder in root.iterdir():
        if folder.is_dir() and (folder / META).is_file():
            size = sum(p.stat().st_size for p in folder.iterdir())
            entries.append(((folder / META).stat().st_atime, folder, size))
    total = sum(size for _, _, size in entries)
    for _, folder, size in sorted(entries):
        if total <= limit_bytes:
            return
        if folder.name != keep:
            shutil.rmtree(folder, ignore_errors=True)
            total -= size
            log.info("prepared data %s: evicted (%.0f MB) to keep the cache under its limit", folder.name, size / 1e6)


def _prepare_here(
    config: TrainerConfig,
    tokenizer: Any,
    train_files: Sequence[DataFile],
    eval_files: Sequence[DataFile] | None,
    key: str,
    inputs: dict[str, Any],
    root: Path,
    on_bytes: ByteHook | None,
    on_progress: ProgressHook | None,
) -> None:
    """The node leader's part, under the lock: the cache's copy, or a fresh preparation; renamed in when whole."""
    final = root / key
    if (final / META).is_file():
        os.utime(final / META)  # recently used: the eviction keeps it
        log.info("prepared data %s: reused from %s", key, final)
        return
    for stale in root.glob(f".{key}.*"):
        shutil.rmtree(stale, ignore_errors=True)  # what a killed preparation left
    temporary = root / f".{key}.{os.getpid()}"
    temporary.mkdir(parents=True)
    try:
        cache = config.dataset.cache
        if not (cache and _fetch_from_cache(cache, key, temporary, config, on_bytes)):
            started = time.monotonic()
            prepared = prepare(config, tokenizer, train_files, eval_files, temporary, on_progress=on_progress)
            save_prepared(temporary, prepared, key, inputs, time.monotonic() - started)
            if cache and int(os.environ.get("RANK", "0")) == 0:
                _upload_to_cache(cache, key, temporary, config, on_bytes)
        os.rename(temporary, final)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    evict(root, key, config.local.preparedDataLimitGB * 1e9)


def build_datasets(
    config: TrainerConfig,
    tokenizer: Any,
    *,
    local_rank: int = 0,
    on_bytes: ByteHook | None = None,
    on_progress: ProgressHook | None = None,
    train_files: Sequence[DataFile] | None = None,
    eval_files: Sequence[DataFile] | None = None,
) -> PreparedData:
    """Train and eval datasets and their collator, prepared once per node (see the module docstring); files are
    pulled from ``dataset.uri`` / ``evalUri`` into the node cache (local rank 0 downloads) unless given."""
    dataset = config.dataset
    cache_dir = config.local.cacheDir
    if train_files is None:
        train_files = pull_dataset(dataset.uri, cache_dir, config.storage, local_rank=local_rank, on_bytes=on_bytes)
    if eval_files is None and dataset.evalUri:
        eval_files = pull_dataset(dataset.evalUri, cache_dir, config.storage, local_rank=local_rank,
                                  on_bytes=on_bytes)
    key, inputs = preparation_key(config, tokenizer, train_files, eval_files)
    root = Path(cache_dir) / "prepared"
    root.mkdir(parents=True, exist_ok=True)
    if local_rank == 0:
        with _locked(root / f"{key}.lock"):
            _prepare_here(config, tokenizer, train_files, eval_files, key, inputs, root, on_bytes, on_progress)
    else:
        _wait_for(root / key, local_rank)
    return open_prepared(root / key, tokenizer)

"""The node-local pull cache: a model or dataset in object storage downloaded once per node, then reused.

``<cache_dir>/models/<name>-<hash of uri>/`` mirrors the objects under the URI (``datasets/`` for data: one file, or
every .jsonl/.json/.parquet under a prefix). ``<that>.complete`` (JSON: uri, each file's size and ETag, the sha256
checked) is written last; a pull whose listing matches it (and whose files are there with their sizes) downloads
nothing. Local rank 0 takes ``<that>.lock`` (flock) and downloads what is missing or changed, small files
concurrently, big ones one after another (each in parallel ranges); other local ranks list the same URI and wait
until the ``.complete`` marker matches that listing, or fail after ``wait_timeout_s`` with a message naming rank 0.
No torch.distributed is involved. ``model.sha256`` applies to the model's only weights file (``*.safetensors``,
else ``*.bin``); a model with several is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from finetune_trainer.config import StorageConfig
from finetune_trainer.storage.errors import RetryPolicy, StorageError
from finetune_trainer.storage.file_store import write_json_atomically
from finetune_trainer.storage.object_store import ByteHook, ObjectInfo, ObjectList, ObjectStore, TransferSettings
from finetune_trainer.storage.uris import open_store, parent_uri

log = logging.getLogger(__name__)

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class PulledFile(NamedTuple):
    """A file in the node cache, the URI it came from (error messages about its rows name the URI) and its ETag
    there, when the store has one (prepared data is keyed by it)."""

    path: Path
    uri: str
    etag: str | None = None


def pull_model(
    uri: str,
    cache_dir: str | Path,
    storage_config: StorageConfig | None = None,
    *,
    local_rank: int,
    sha256: str | None = None,
    on_bytes: ByteHook | None = None,
    wait_timeout_s: float = 3600.0,
    retry: RetryPolicy | None = None,
    transfer: TransferSettings | None = None,
) -> Path:
    """The model folder at ``uri`` in ``<cache_dir>/models/``, downloaded once per node (by local rank 0)."""
    store = open_store(uri, storage_config, on_bytes=on_bytes, retry=retry, transfer=transfer)
    try:
        objects = store.list()
        if not objects:
            raise StorageError(f"{uri}: no objects under this prefix", uri=uri, permanent=True)
        checked: str | None = None
        if sha256:
            weights = [o.key for o in objects if o.key.endswith(".safetensors")] or [
                o.key for o in objects if o.key.endswith(".bin")
            ]
            if len(weights) != 1:
                raise StorageError(
                    f"{uri}: model.sha256 is set but the model has {len(weights)} weight files "
                    f"({', '.join(weights) or 'none'}); it can only check a single-file model",
                    uri=uri,
                    permanent=True,
                )
            checked = weights[0]
        return _pull_into_cache(
            store,
            objects,
            Path(cache_dir) / "models",
            local_rank=local_rank,
            sha256_key=checked,
            sha256=sha256,
            wait_timeout_s=wait_timeout_s,
        )
    finally:
        store.close()


def pull_dataset(
    uri: str,
    cache_dir: str | Path,
    storage_config: StorageConfig | None = None,
    *,
    local_rank: int,
    on_bytes: ByteHook | None = None,
    wait_timeout_s: float = 3600.0,
    retry: RetryPolicy | None = None,
    transfer: TransferSettings | None = None,
) -> list[PulledFile]:
    """A .jsonl/.json/.parquet file, or every such file under a prefix (sorted by key), in ``<cache_dir>/datasets/``."""
    single = uri.endswith(DATA_SUFFIXES)
    root, name = parent_uri(uri) if single else (uri, "")
    store = open_store(root, storage_config, on_bytes=on_bytes, retry=retry, transfer=transfer)
    try:
        if single:
            found = store.head(name)
            if found is None:
                raise StorageError(f"{uri}: no such object", uri=uri, permanent=True)
            objects = [found]
        else:
            objects = [o for o in store.list() if o.key.endswith(DATA_SUFFIXES)]
            if not objects:
                raise StorageError(
                    f"{uri}: no .jsonl, .json or .parquet files under this prefix", uri=uri, permanent=True
                )
        folder = _pull_into_cache(
            store,
            objects,
            Path(cache_dir) / "datasets",
            local_rank=local_rank,
            sha256_key=None,
            sha256=None,
            wait_timeout_s=wait_timeout_s,
            name_from=uri,
        )
        return [PulledFile(folder / o.key, store.uri_for(o.key), o.etag) for o in objects]
    finally:
        store.close()


def cache_folder_name(uri: str) -> str:
    """``<last path segment>-<12 hex of sha256(uri)>``: readable, and distinct for distinct URIs."""
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", uri.rstrip("/").rpartition("/")[2])[:60] or "root"
    return f"{tail}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def _pull_into_cache(
    store: ObjectStore,
    objects: ObjectList,
    cache_root: Path,
    *,
    local_rank: int,
    sha256_key: str | None,
    sha256: str | None,
    wait_timeout_s: float,
    name_from: str | None = None,
) -> Path:
    source = name_from or store.uri
    name = cache_folder_name(source)
    target = cache_root / name
    marker = cache_root / f"{name}.complete"
    manifest: dict[str, Any] = {
        "uri": source,
        "files": {o.key: {"size": o.size, "etag": o.etag} for o in objects},
        "sha256": {sha256_key: sha256} if sha256_key else {},
    }
    cache_root.mkdir(parents=True, exist_ok=True)
    if local_rank != 0:
        _wait_for_marker(marker, manifest, target, source, local_rank, wait_timeout_s)
        return target
    with _exclusive_lock(cache_root / f"{name}.lock", source, wait_timeout_s):
        previous = _read_marker(marker)
        if previous == manifest and all(
            (target / key).is_file() and (target / key).stat().st_size == entry["size"]
            for key, entry in manifest["files"].items()
        ):
            log.info("%s: already in the node cache at %s", source, target)
            return target
        marker.unlink(missing_ok=True)
        started = time.monotonic()
        old_files = previous.get("files", {}) if previous else {}
        old_sha = previous.get("sha256", {}) if previous else {}
        wanted = []
        for info in objects:
            dest = target / info.key
            unchanged = old_files.get(info.key) == manifest["files"][info.key] and (
                info.key != sha256_key or old_sha.get(info.key) == sha256
            )
            if not (unchanged and dest.is_file() and dest.stat().st_size == info.size):
                wanted.append(info)

        def fetch(info: ObjectInfo) -> None:
            sha = sha256 if info.key == sha256_key else None
            store.download_file(info.key, target / info.key, expected_size=info.size, etag=info.etag, sha256=sha)

        # Small files (configs, tokenizer) together, as their time is request latency; big ones one at a time,
        # each already spread over parallel ranges.
        small = [info for info in wanted if info.size <= store.transfer.min_range_size]
        if small:
            with ThreadPoolExecutor(max_workers=min(8, len(small)), thread_name_prefix="pull-small") as pool:
                for future in [pool.submit(fetch, info) for info in small]:
                    future.result()
        for info in wanted:
            if info.size > store.transfer.min_range_size:
                fetch(info)
        fetched = sum(info.size for info in wanted)
        _remove_unlisted(target, set(manifest["files"]))
        write_json_atomically(marker, manifest)
        elapsed = time.monotonic() - started
        log.info(
            "%s: pulled %d files, %.1f MB in %.1f s (%.0f MB/s) into %s",
            source,
            len(objects),
            fetched / 1e6,
            elapsed,
            fetched / 1e6 / max(elapsed, 1e-6),
            target,
        )
    return target


def _read_marker(marker: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _remove_unlisted(target: Path, keys: set[str]) -> None:
    """Files a previous pull left that the listing no longer has (journals of finished downloads included)."""
    if not target.is_dir():
        return
    for path in sorted(target.rglob("*"), reverse=True):
        key = path.relative_to(target).as_posix()
        if path.is_file() and key not in keys and not key.endswith((".partial", ".partial.json")):
            path.unlink()


def _wait_for_marker(
    marker: Path, manifest: dict[str, Any], target: Path, uri: str, local_rank: int, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while _read_marker(marker) != manifest:
        if time.monotonic() > deadline:
            raise StorageError(
                f"{uri}: local rank {local_rank} waited {timeout_s:.0f} s for local rank 0 to pull it into "
                f"{target}, and {marker.name} is still missing or stale; see local rank 0's log",
                uri=uri,
            )
        time.sleep(delay)
        delay = min(1.0, delay * 1.5)


@contextlib.contextmanager
def _exclusive_lock(path: Path, uri: str, timeout_s: float) -> Iterator[None]:
    with path.open("a") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StorageError(
                        f"{uri}: another process held {path} for more than {timeout_s:.0f} s", uri=uri
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

"""What every store offers: objects under one URI, keyed relative to it, and the transfer settings they share.

Keys are ``/``-separated and relative to the store's root (a store at ``s3://b/runs/x`` writes ``put_bytes(
"result.json", ...)`` to ``s3://b/runs/x/result.json``). ``on_bytes(direction, n)`` (``"download"`` /
``"upload"``) is called from worker threads as bytes move, so metrics can count them; it must be thread-safe.
"""

from __future__ import annotations

import copy
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Self

from finetune_trainer.storage.errors import RetryPolicy

ByteHook = Callable[[str, int], None]
DOWNLOAD = "download"
UPLOAD = "upload"
MiB = 1024 * 1024


class ObjectInfo(NamedTuple):
    key: str
    size: int
    etag: str | None


# An alias: inside the store classes ``list`` names the method.
ObjectList = list[ObjectInfo]


def background_upload_streams(cpus: int, upload_concurrency: int) -> int:
    """Parts in flight for a background upload: fewer streams spread the upload's CPU (ours and, on a shared
    machine, the server's) over a longer window instead of a burst that takes cores from training. 2, or 1 per 8
    CPUs on big nodes where more still fit beside training, but never more than half a foreground upload's, so a
    background upload stays the gentler one on any node."""
    return max(1, min(max(2, cpus // 8), upload_concurrency // 2))


@dataclass(frozen=True)
class TransferSettings:
    # Parallel ranged GETs per object: 16 on a GPU node; fewer on a small machine, where more streams only
    # add CPU (thread switching, smaller ranges) that the copy into the page cache needs.
    concurrency: int = field(default_factory=lambda: min(16, max(4, 2 * len(os.sched_getaffinity(0)))))
    min_range_size: int = 8 * MiB
    max_range_size: int = 64 * MiB
    multipart_threshold: int = 16 * MiB
    upload_part_size: int = 16 * MiB
    upload_concurrency: int = 8
    # Parts in flight for a background upload (a checkpoint while training goes on); 0: background_upload_streams
    # of this node's CPUs.
    background_upload_concurrency: int = 0

    def __post_init__(self) -> None:
        if self.background_upload_concurrency <= 0:
            streams = background_upload_streams(len(os.sched_getaffinity(0)), self.upload_concurrency)
            object.__setattr__(self, "background_upload_concurrency", streams)

    def range_size(self, size: int, part_size: int | None = None) -> int:
        """Bytes per ranged GET of an object of ``size`` bytes uploaded in parts of ``part_size``."""
        # About two ranges per thread: fewer requests, yet the first ranges finish early enough for the
        # read-back hasher to overlap the rest of the download.
        wanted = math.ceil(size / max(1, self.concurrency * 2) / MiB) * MiB
        chosen = min(self.max_range_size, max(self.min_range_size, wanted))
        if part_size:  # whole parts per range, so each range's parts are hashed where they arrive
            chosen = max(1, round(chosen / part_size)) * part_size
        return chosen


class ObjectStore(ABC):
    """Objects under one URI; keys are relative to it."""

    def __init__(
        self,
        uri: str,
        *,
        on_bytes: ByteHook | None = None,
        retry: RetryPolicy | None = None,
        transfer: TransferSettings | None = None,
    ) -> None:
        self.uri = uri.rstrip("/")
        self.on_bytes = on_bytes
        self.retry = retry or RetryPolicy()
        self.transfer = transfer or TransferSettings()

    def uri_for(self, key: str) -> str:
        return f"{self.uri}/{key}" if key else self.uri

    def retrying_until(self, deadline: float) -> Self:
        """This store retrying transient failures until the monotonic ``deadline``, over every request made through
        it, instead of per request; it shares the original's connections (close only the original)."""
        bounded = copy.copy(self)
        bounded.retry = self.retry.until(deadline)
        return bounded

    def _count(self, direction: str, n: int) -> None:
        if self.on_bytes is not None and n:
            self.on_bytes(direction, n)

    def _refuse_empty_prefix(self, prefix: str) -> None:
        if not prefix:
            raise ValueError(f"{self.uri}: refusing to delete every object under the store's root (empty prefix)")

    @abstractmethod
    def list(self, prefix: str = "") -> ObjectList:
        """Objects whose key starts with ``prefix``, sorted by key."""

    @abstractmethod
    def head(self, key: str) -> ObjectInfo | None:
        """The object's size and ETag, or None when it does not exist."""

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    @abstractmethod
    def get_bytes(self, key: str) -> bytes: ...

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def upload_file(self, src: str | Path, key: str, *, background: bool = False) -> ObjectInfo:
        """Upload ``src`` to ``key``; ``background``: gently (TransferSettings.background_upload_concurrency)."""

    @abstractmethod
    def download_file(
        self,
        key: str,
        dest: str | Path,
        *,
        expected_size: int | None = None,
        etag: str | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        """Fetch ``key`` into ``dest`` (atomically, verified); ``expected_size``/``etag`` guard against a change."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with ``prefix``; returns how many."""

    def close(self) -> None:  # noqa: B027 - optional: only stores holding connections override it
        """Release connections (a no-op where there are none)."""

"""file:// stores: a local folder with S3's keys and semantics, and the atomic writes every local file here uses.

A write goes to a temporary name beside its target (``.<name>.<8 hex>.tmp``, never listed) and is renamed into
place, so a reader sees the old file or the new one, never half of one. Downloads copy the file (size and sha256
checked).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_trainer.storage.checksums import sha256_file
from finetune_trainer.storage.errors import RetryPolicy, StorageError
from finetune_trainer.storage.object_store import (
    DOWNLOAD,
    UPLOAD,
    ByteHook,
    ObjectInfo,
    ObjectList,
    ObjectStore,
    TransferSettings,
)


def atomic_write(path: Path, fill: Callable[[Path], object]) -> None:
    """Create or replace ``path`` with what ``fill`` writes into a temporary file beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fill(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json_atomically(path: Path, data: Any) -> None:
    atomic_write(path, lambda temporary: temporary.write_text(json.dumps(data, sort_keys=True)))


class FileStore(ObjectStore):
    """A folder as a store: same keys and semantics as S3 (prefix match on keys); writes are atomic renames."""

    TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")

    def __init__(
        self,
        uri: str,
        root: Path,
        *,
        on_bytes: ByteHook | None = None,
        retry: RetryPolicy | None = None,
        transfer: TransferSettings | None = None,
    ) -> None:
        super().__init__(uri, on_bytes=on_bytes, retry=retry, transfer=transfer)
        self.root = root

    def _path(self, key: str) -> Path:
        if not key or any(part in ("", ".", "..") for part in key.split("/")):
            raise StorageError(f"{self.uri_for(key)}: not a valid key", uri=self.uri_for(key), permanent=True)
        return self.root / key

    def _missing(self, key: str) -> StorageError:
        return StorageError(f"{self.uri_for(key)}: no such file", uri=self.uri_for(key), permanent=True)

    def list(self, prefix: str = "") -> ObjectList:
        found: ObjectList = []
        for folder, _, names in os.walk(self.root):
            for name in names:
                if self.TEMPORARY.match(name):
                    continue
                path = Path(folder) / name
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix) and path.is_file():
                    found.append(ObjectInfo(key, path.stat().st_size, None))
        return sorted(found)

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        return ObjectInfo(key, path.stat().st_size, None) if path.is_file() else None

    def get_bytes(self, key: str) -> bytes:
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            raise self._missing(key) from None
        self._count(DOWNLOAD, len(data))
        return data

    def put_bytes(self, key: str, data: bytes) -> None:
        atomic_write(self._path(key), lambda tmp: tmp.write_bytes(data))
        self._count(UPLOAD, len(data))

    def upload_file(self, src: str | Path, key: str, *, background: bool = False) -> ObjectInfo:
        size = Path(src).stat().st_size
        atomic_write(self._path(key), lambda tmp: shutil.copyfile(src, tmp))
        self._count(UPLOAD, size)
        return ObjectInfo(key, size, None)

    def download_file(
        self,
        key: str,
        dest: str | Path,
        *,
        expected_size: int | None = None,
        etag: str | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        source = self._path(key)
        uri = self.uri_for(key)
        if not source.is_file():
            raise self._missing(key)
        dest = Path(dest)

        def copy(tmp: Path) -> None:
            shutil.copyfile(source, tmp)
            size = tmp.stat().st_size
            if expected_size is not None and size != expected_size:
                raise StorageError(f"{uri}: changed since it was listed (size {expected_size} -> {size})", uri=uri)
            if sha256:
                actual = sha256_file(tmp)
                if actual != sha256.lower():
                    raise StorageError(
                        f"{uri}: does not match its sha256: expected {sha256}, got {actual}", uri=uri, permanent=True
                    )

        atomic_write(dest, copy)
        size = dest.stat().st_size
        self._count(DOWNLOAD, size)
        return ObjectInfo(key, size, None)

    def delete_prefix(self, prefix: str) -> int:
        self._refuse_empty_prefix(prefix)
        found = self.list(prefix)
        for info in found:
            path = self.root / info.key
            path.unlink(missing_ok=True)
            for folder in path.parents:
                if folder == self.root or self.root not in folder.parents:
                    break
                try:
                    folder.rmdir()
                except OSError:
                    break
        return len(found)

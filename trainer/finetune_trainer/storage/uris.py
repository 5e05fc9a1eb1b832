"""Storage URIs: ``s3://bucket/prefix`` and ``file:///path`` parsed, and the store each one names opened."""

from __future__ import annotations

import re
from pathlib import Path

from finetune_trainer.config import StorageConfig
from finetune_trainer.storage.errors import RetryPolicy, StorageError
from finetune_trainer.storage.file_store import FileStore
from finetune_trainer.storage.object_store import ByteHook, ObjectStore, TransferSettings
from finetune_trainer.storage.s3_store import S3Store, make_s3_client


def split_uri(uri: str) -> tuple[str, str, str]:
    """``(scheme, bucket, path)``: ``s3://b/p/q`` -> ``("s3", "b", "p/q")``; ``file:///x`` -> ``("file", "", "/x")``."""
    match = re.fullmatch(r"s3://([^/]+)/?(.*)", uri)
    if match:
        return "s3", match.group(1), match.group(2).strip("/")
    if uri.startswith("file:///"):
        return "file", "", "/" + uri[len("file:///") :].strip("/")
    raise StorageError(f"{uri}: not an s3://bucket/key or file:///absolute/path URI", uri=uri, permanent=True)


def parent_uri(uri: str) -> tuple[str, str]:
    """``(folder URI, name)`` of an object URI."""
    head, _, name = uri.rstrip("/").rpartition("/")
    if not name or head in ("s3:/", "file:/", "file://"):
        raise StorageError(f"{uri}: does not name an object", uri=uri, permanent=True)
    return head, name


def open_store(
    uri: str,
    storage_config: StorageConfig | None = None,
    *,
    on_bytes: ByteHook | None = None,
    retry: RetryPolicy | None = None,
    transfer: TransferSettings | None = None,
) -> ObjectStore:
    """A store rooted at an ``s3://bucket[/prefix]`` or ``file:///path`` URI."""
    scheme, bucket, path = split_uri(uri)
    if scheme == "file":
        return FileStore(uri, Path(path), on_bytes=on_bytes, retry=retry, transfer=transfer)
    transfer = transfer or TransferSettings()
    client = make_s3_client(storage_config, max_connections=max(transfer.concurrency, transfer.upload_concurrency) + 2)
    return S3Store(uri, client, bucket, path, on_bytes=on_bytes, retry=retry, transfer=transfer)

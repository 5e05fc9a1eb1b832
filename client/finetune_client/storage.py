"""S3 for the client: boto3 with the standard credential chain, the job's endpoint and path style, one-line errors.

Credentials come from boto3's chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, SSO, instance
roles); the endpoint from the job's ``spec.storage.endpoint``, else boto3's own ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``. Path-style addressing follows ``spec.storage.forcePathStyle``; when nothing says, it is used
exactly when a custom endpoint is set (S3-compatible servers such as SeaweedFS and MinIO need it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from finetune_client.errors import StorageFailed

# Aliases: inside the class ``list`` names the method.
KeySizes = list[tuple[str, int]]
Paths = list[Path]
NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` as (bucket, key)."""
    if not uri.startswith("s3://") or len(uri) <= len("s3://"):
        raise StorageFailed(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def join_uri(prefix: str, *parts: str) -> str:
    return "/".join([prefix.rstrip("/"), *(p.strip("/") for p in parts)])


class ObjectStorage:
    """S3 objects by URI. ``endpoint`` None: boto3's environment; ``force_path_style`` None: path style when an
    endpoint is configured."""

    def __init__(self, endpoint: str | None = None, force_path_style: bool | None = None,
                 region: str | None = None) -> None:
        self.endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        path_style = bool(self.endpoint) if force_path_style is None else force_path_style
        config = Config(
            s3={"addressing_style": "path"} if path_style else {},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        )
        # A session of its own reads the credential chain now: boto3's module-level default session keeps the
        # credentials it resolved first, so a notebook that changes AWS_* (or its profile) would keep signing
        # with the old ones.
        session = boto3.session.Session()
        self._client: Any = session.client("s3", endpoint_url=self.endpoint, region_name=region, config=config)

    @classmethod
    def for_job(cls, spec: dict[str, Any]) -> ObjectStorage:
        storage = spec.get("storage") or {}
        return cls(storage.get("endpoint"), storage.get("forcePathStyle"), storage.get("region"))

    def _failed(self, uri: str, exc: Exception) -> StorageFailed:
        if isinstance(exc, NoCredentialsError):
            return StorageFailed("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
        if isinstance(exc, EndpointConnectionError):
            return StorageFailed(f"cannot reach S3 at {self.endpoint or 'the default AWS endpoint'}")
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            return StorageFailed(f"{uri}: {error.get('Code', 'error')}: {error.get('Message') or 'S3 refused'}")
        return StorageFailed(f"{uri}: {type(exc).__name__}: {exc}")

    def read(self, uri: str) -> bytes | None:
        """An object's bytes, or None when there is no such object."""
        bucket, key = split_s3_uri(uri)
        try:
            body: bytes = self._client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in NOT_FOUND:
                return None
            raise self._failed(uri, exc) from None
        except BotoCoreError as exc:
            raise self._failed(uri, exc) from None
        return body

    def write(self, uri: str, data: bytes) -> None:
        bucket, key = split_s3_uri(uri)
        try:
            self._client.put_object(Bucket=bucket, Key=key, Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise self._failed(uri, exc) from None

    def upload_file(self, path: Path, uri: str) -> None:
        bucket, key = split_s3_uri(uri)
        try:
            self._client.upload_file(str(path), bucket, key)
        except (ClientError, BotoCoreError) as exc:
            raise self._failed(uri, exc) from None
        except Exception as exc:  # s3transfer wraps the client's errors in its own
            raise self._failed(uri, exc.__cause__ if isinstance(exc.__cause__, Exception) else exc) from None

    def upload_folder(self, folder: Path, uri: str) -> int:
        """Every file under ``folder`` (hidden ones left out) below ``uri``; returns how many."""
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        for path in files:
            self.upload_file(path, join_uri(uri, path.relative_to(folder).as_posix()))
        return len(files)

    def list(self, uri: str) -> KeySizes:
        """(key, size) of every object below ``uri``."""
        bucket, prefix = split_s3_uri(uri)
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            return [(o["Key"], int(o["Size"])) for page in pages for o in page.get("Contents", [])]
        except (ClientError, BotoCoreError) as exc:
            raise self._failed(uri, exc) from None

    def download_prefix(self, uri: str, dest: Path) -> Paths:
        """Every object below ``uri`` (a folder) into ``dest``, keeping the relative paths."""
        bucket, prefix = split_s3_uri(uri.rstrip("/") + "/")
        written = []
        for key, _ in self.list(f"s3://{bucket}/{prefix}"):
            target = dest / key[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._client.download_file(bucket, key, str(target))
            except (ClientError, BotoCoreError) as exc:
                raise self._failed(f"s3://{bucket}/{key}", exc) from None
            written.append(target)
        return written

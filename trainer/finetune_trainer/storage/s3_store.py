"""S3 stores: parallel ranged, verified, resumable downloads and parallel multipart uploads over boto3.

S3 goes through boto3 with the endpoint and region of the ``StorageConfig``, else ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` and ``AWS_REGION`` / ``AWS_DEFAULT_REGION``; credentials come only from boto3's default chain.
Every request goes through ``errors.call_with_retries`` with the store's ``RetryPolicy``.

Downloads (``download_file``)
    An object is fetched as parallel ranged GETs (``TransferSettings.concurrency`` threads: 16, or 2 per CPU but at
    least 4; about two ranges per thread, 8-64 MiB each) written with ``pwrite`` into ``<dest>.partial``, sized to
    the object up front (free space is checked first). A journal ``<dest>.partial.json`` (``{"version", "uri",
    "size", "etag", "rangeSize", "done": [range indices]}``) is rewritten as each range completes, so a later call
    for the same object (same size and ETag) fetches only the ranges not listed there, with the journal's range
    size. A journaled range was written before it was journaled, so a crashed process loses nothing; after a
    kernel crash the verification below catches a range that never reached the disk. The finished file is renamed
    to ``dest`` only after it is verified:
    - its size always;
    - ``sha256`` when the caller gives one (otherwise:)
    - the object's CRC32 / SHA-256 / SHA-1 checksum when the server returns one (``HeadObject`` with
      ``ChecksumMode=ENABLED``; boto3 and this module upload with CRC32), whole-object or composite;
    - else the ETag when it is an MD5: a plain MD5 for single-part objects, ``md5(part md5s)-N`` for multipart ones
      (not for SSE-KMS / SSE-C objects, whose ETags are not MD5s).
    Composite values (``...-N``) are checked part by part: the part size is read with ``HeadObject(PartNumber=1)``
    and the parts are assumed equal but the last (what every SDK uploader does); when that does not add up, or the
    server has no checksum and no MD5 ETag, only the size is checked (logged). CRC32C and CRC64NVME checksums need
    a native library and are not used. How the value is computed while the ranges arrive is ``checksums``'s
    business; ranges already on disk when a download resumes are hashed from the file, never taken on trust from
    the journal. A mismatch discards the file: a checksum or ETag mismatch downloads it once more, then fails; a
    mismatch with a sha256 the caller gave fails at once with ``permanent=True``.

Uploads (``upload_file``)
    Files above ``multipart_threshold`` go up as a multipart upload of parallel parts (``upload_concurrency`` at
    a time; ``background_upload_concurrency`` for ``background=True``, the checkpoints uploaded while training
    goes on), each part retried on its own and carrying a CRC32 the server checks; a failed upload is aborted.
    ``delete_prefix("")`` is refused.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import shutil
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Literal, TypeVar

from finetune_trainer.config import StorageConfig
from finetune_trainer.storage.checksums import (
    Algorithm,
    Digester,
    Expectation,
    Ranges,
    RangeVerifier,
    ReadBackHasher,
    crc32_base64,
)
from finetune_trainer.storage.errors import RetryPolicy, StorageError, call_with_retries, client_error_code
from finetune_trainer.storage.file_store import write_json_atomically
from finetune_trainer.storage.object_store import (
    DOWNLOAD,
    UPLOAD,
    ByteHook,
    MiB,
    ObjectInfo,
    ObjectList,
    ObjectStore,
    TransferSettings,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
_Parts = list[dict[str, Any]]
JOURNAL_VERSION = 1
# Socket reads per pwrite: big enough to keep Python overhead low, small enough to stop quickly on abort.
READ_SIZE = MiB


class Aborted(Exception):
    """Another task of the same transfer failed; this one stops early."""


class _VerificationFailed(Exception):
    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


def fan_out(
    tasks: Sequence[Callable[[], T]],
    *,
    workers: int,
    abort: threading.Event,
    name: str,
    on_done: Callable[[int], None] | None = None,
) -> list[T]:
    """Run ``tasks`` on a pool of ``workers`` threads and return their results in order.

    On the first failure ``abort`` is set (a task that sees it raises ``Aborted`` to stop early), the tasks not
    started are cancelled, and once the pool is idle that failure is raised (an ``Aborted`` only when nothing else
    failed). ``on_done(index)`` runs in the calling thread as each task succeeds, after a failure too, so work that
    did finish can still be recorded.
    """
    results: dict[int, T] = {}
    first_error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
        futures = {pool.submit(task): index for index, task in enumerate(tasks)}
        for future in as_completed(futures):
            if future.cancelled():
                continue
            error = future.exception()
            if error is None:
                results[futures[future]] = future.result()
                if on_done is not None:
                    on_done(futures[future])
            elif first_error is None or isinstance(first_error, Aborted):
                first_error = error
                abort.set()
                for pending in futures:
                    pending.cancel()
    if first_error is not None:
        raise first_error
    return [results[index] for index in range(len(tasks))]


def make_s3_client(storage_config: StorageConfig | None = None, *, max_connections: int = 18) -> Any:
    """A boto3 S3 client with botocore's retries off (``call_with_retries`` decides) and a pool for the threads."""
    import boto3
    import botocore.session
    from botocore.config import Config

    config = storage_config or StorageConfig()
    endpoint = config.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = config.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None
    settings = Config(
        region_name=region,
        retries={"total_max_attempts": 1},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=max_connections,
        tcp_keepalive=True,
        s3={"addressing_style": "path"} if config.forcePathStyle else None,
    )
    with _CLIENT_LOCK:
        # A fresh botocore session resolves credentials anew (they may rotate), while the shared loader keeps
        # the parsed S3 service model: a client then takes ~15 ms instead of ~150 ms.
        global _LOADER
        session = botocore.session.get_session()
        if _LOADER is None:
            _LOADER = session.get_component("data_loader")
        session.register_component("data_loader", _LOADER)
        return boto3.session.Session(botocore_session=session).client(
            "s3", endpoint_url=endpoint, region_name=region, config=settings
        )


_CLIENT_LOCK = threading.Lock()
_LOADER: Any = None


def _unquote(etag: str | None) -> str | None:
    return etag.strip('"') if etag else None


class S3Store(ObjectStore):
    def __init__(
        self,
        uri: str,
        client: Any,
        bucket: str,
        prefix: str,
        *,
        on_bytes: ByteHook | None = None,
        retry: RetryPolicy | None = None,
        transfer: TransferSettings | None = None,
    ) -> None:
        super().__init__(uri, on_bytes=on_bytes, retry=retry, transfer=transfer)
        self.client = client
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _call(self, what: str, key: str, operation: Callable[[], T]) -> T:
        return call_with_retries(operation, uri=self.uri_for(key), what=what, policy=self.retry)

    def close(self) -> None:
        self.client.close()

    def list(self, prefix: str = "") -> ObjectList:
        found: ObjectList = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._key(prefix)}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("list", prefix, functools.partial(self.client.list_objects_v2, **kwargs))
            for item in page.get("Contents", []):
                key = item["Key"][len(self.prefix) :]
                if key and not key.endswith("/"):  # "folder" placeholder objects hold no data
                    found.append(ObjectInfo(key, int(item["Size"]), _unquote(item.get("ETag"))))
            if not page.get("IsTruncated"):
                return sorted(found)
            token = page["NextContinuationToken"]

    def _head(self, key: str, **extra: Any) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        def head() -> dict[str, Any] | None:
            try:
                return dict(self.client.head_object(Bucket=self.bucket, Key=self._key(key), **extra))
            except ClientError as exc:
                if (client_error_code(exc) or ("", 0))[0] in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

        return self._call("head", key, head)

    def head(self, key: str) -> ObjectInfo | None:
        found = self._head(key)
        if found is None:
            return None
        return ObjectInfo(key, int(found["ContentLength"]), _unquote(found.get("ETag")))

    def get_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            data: bytes = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            self._count(DOWNLOAD, len(data))
            return data

        return self._call("get", key, get)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._put_object(key, data)

    def _put_object(self, key: str, data: bytes) -> dict[str, Any]:
        put = functools.partial(
            self.client.put_object,
            Bucket=self.bucket,
            Key=self._key(key),
            Body=data,
            ChecksumAlgorithm="CRC32",
            ChecksumCRC32=crc32_base64(data),
        )
        answer: dict[str, Any] = self._call("upload", key, put)
        self._count(UPLOAD, len(data))
        return answer

    def delete_prefix(self, prefix: str) -> int:
        self._refuse_empty_prefix(prefix)
        keys = [info.key for info in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": self._key(k)} for k in keys[start : start + 1000]], "Quiet": True}
            answer = self._call(
                "delete", prefix, functools.partial(self.client.delete_objects, Bucket=self.bucket, Delete=batch)
            )
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise StorageError(
                    f"{self.uri_for(prefix)}: delete failed for {len(answer['Errors'])} objects, first "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message', '')}",
                    uri=self.uri_for(prefix),
                )
        return len(keys)

    # -- upload --------------------------------------------------------------------------------------------------

    def upload_file(self, src: str | Path, key: str, *, background: bool = False) -> ObjectInfo:
        src = Path(src)
        size = src.stat().st_size
        if size <= self.transfer.multipart_threshold:
            answer = self._put_object(key, src.read_bytes())
            return ObjectInfo(key, size, _unquote(answer.get("ETag")))
        # S3 allows at most 10000 parts.
        part_size = max(self.transfer.upload_part_size, math.ceil(size / 10000 / MiB) * MiB)
        start = functools.partial(
            self.client.create_multipart_upload, Bucket=self.bucket, Key=self._key(key), ChecksumAlgorithm="CRC32"
        )
        created = self._call("start upload", key, start)
        upload_id = created["UploadId"]
        try:
            workers = self.transfer.background_upload_concurrency if background else self.transfer.upload_concurrency
            parts = self._upload_parts(src, key, upload_id, size, part_size, workers)
            etag = self._complete_upload(key, upload_id, parts, size)
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(key), UploadId=upload_id)
            raise
        return ObjectInfo(key, size, etag)

    def _upload_parts(self, src: Path, key: str, upload_id: str, size: int, part_size: int, workers: int) -> _Parts:
        abort = threading.Event()
        fd = os.open(src, os.O_RDONLY)
        try:

            def send(number: int) -> dict[str, Any]:
                if abort.is_set():
                    raise Aborted()
                offset = (number - 1) * part_size
                data = os.pread(fd, min(part_size, size - offset), offset)
                put_part = functools.partial(
                    self.client.upload_part,
                    Bucket=self.bucket,
                    Key=self._key(key),
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=data,
                    ChecksumAlgorithm="CRC32",
                    ChecksumCRC32=crc32_base64(data),
                )
                answer = self._call(f"upload part {number}", key, put_part)
                self._count(UPLOAD, len(data))
                part = {"PartNumber": number, "ETag": answer["ETag"]}
                if answer.get("ChecksumCRC32"):
                    part["ChecksumCRC32"] = answer["ChecksumCRC32"]
                return part

            count = math.ceil(size / part_size)
            tasks = [functools.partial(send, number) for number in range(1, count + 1)]
            return fan_out(tasks, workers=workers, abort=abort, name="s3-put")
        finally:
            os.close(fd)

    def _complete_upload(self, key: str, upload_id: str, parts: _Parts, size: int) -> str | None:
        from botocore.exceptions import ClientError

        tries = 0

        def complete() -> dict[str, Any]:
            nonlocal tries
            tries += 1
            try:
                return dict(
                    self.client.complete_multipart_upload(
                        Bucket=self.bucket, Key=self._key(key), UploadId=upload_id, MultipartUpload={"Parts": parts}
                    )
                )
            except ClientError as exc:
                # A retry after a lost answer finds the upload already completed.
                if tries > 1 and (client_error_code(exc) or ("", 0))[0] == "NoSuchUpload":
                    found = self._head(key)
                    if found is not None and int(found["ContentLength"]) == size:
                        return found
                raise

        return _unquote(self._call("complete upload", key, complete).get("ETag"))

    # -- download ------------------------------------------------------------------------------------------------

    def download_file(
        self,
        key: str,
        dest: str | Path,
        *,
        expected_size: int | None = None,
        etag: str | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        dest = Path(dest)
        uri = self.uri_for(key)
        for attempt in (1, 2):
            found = self._head(key, ChecksumMode="ENABLED")
            if found is None:
                raise StorageError(f"{uri}: no such object", uri=uri, permanent=True)
            size, current_etag = int(found["ContentLength"]), _unquote(found.get("ETag"))
            if (expected_size is not None and size != expected_size) or (etag is not None and current_etag != etag):
                raise StorageError(
                    f"{uri}: changed since it was listed (size {expected_size} -> {size}, ETag {etag} -> "
                    f"{current_etag})",
                    uri=uri,
                )
            expectation = self._expectation(key, found, size, sha256)
            if expectation is not None:
                log.debug("%s: verifying %d bytes by its %s %s", uri, size, expectation.label, expectation.expected)
            try:
                self._download_ranges(key, dest, size, current_etag, expectation)
                return ObjectInfo(key, size, current_etag)
            except _VerificationFailed as failure:
                if attempt == 2 or failure.permanent:
                    raise StorageError(str(failure), uri=uri, permanent=failure.permanent) from None
                log.warning("%s; downloading it again", failure)
        raise AssertionError("unreachable")

    def _expectation(self, key: str, found: dict[str, Any], size: int, sha256: str | None) -> Expectation | None:
        if sha256:
            return Expectation("sha256", "sha256", sha256.lower(), "hex")
        candidates: list[tuple[str, Algorithm, str, Literal["hex", "base64"]]] = []
        checksums: tuple[tuple[str, Algorithm], ...] = (
            ("ChecksumCRC32", "crc32"),
            ("ChecksumSHA256", "sha256"),
            ("ChecksumSHA1", "sha1"),
        )
        for header, algorithm in checksums:
            if found.get(header):
                candidates.append((f"{header[8:]} checksum", algorithm, str(found[header]), "base64"))
        etag = _unquote(found.get("ETag")) or ""
        encrypted = found.get("ServerSideEncryption", "").startswith("aws:kms") or found.get("SSECustomerAlgorithm")
        if re.fullmatch(r"[0-9a-f]{32}(-\d+)?", etag) and not encrypted:
            candidates.append(("ETag (MD5)", "md5", etag, "hex"))
        for label, algorithm, value, encoding in candidates:
            digest, _, count = value.partition("-")
            if not count:
                return Expectation(label, algorithm, value, encoding)
            part_size = self._part_size(key, size, int(count))
            if part_size is not None:
                return Expectation(label, algorithm, value, encoding, part_size=part_size, parts=int(count))
        log.info("%s: no checksum or MD5 ETag that can be checked; verifying the size only", self.uri_for(key))
        return None

    def _part_size(self, key: str, size: int, parts: int) -> int | None:
        if parts == 1:
            return size
        try:
            first = self._head(key, PartNumber=1)
        except StorageError:
            return None
        part_size = int(first["ContentLength"]) if first else 0
        if part_size <= 0 or math.ceil(size / part_size) != parts:
            return None
        return part_size

    def _download_ranges(
        self, key: str, dest: Path, size: int, etag: str | None, expectation: Expectation | None
    ) -> None:
        uri = self.uri_for(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        journal = dest.with_name(dest.name + ".partial.json")
        identity = {"version": JOURNAL_VERSION, "uri": uri, "size": size, "etag": etag}
        # A journal's range size wins over this machine's choice, so a resume on another node keeps its ranges.
        done, range_size = _read_journal(journal, partial, identity)
        range_size = range_size or self.transfer.range_size(size, expectation.part_size if expectation else None)
        identity["rangeSize"] = range_size
        ranges = [(start, min(start + range_size, size)) for start in range(0, size, range_size)]
        inline = expectation is not None and RangeVerifier.possible(expectation, range_size)
        if not done:
            free = shutil.disk_usage(dest.parent).free
            if free < size:
                raise StorageError(f"{uri}: needs {size} bytes in {dest.parent}, {free} free", uri=uri)
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | (0 if done else os.O_TRUNC), 0o644)
        try:
            os.ftruncate(fd, size)
            verifier = RangeVerifier(expectation, ranges) if expectation is not None and inline else None
            hasher = ReadBackHasher(fd, size, expectation) if expectation is not None and not inline else None
            if hasher is not None:
                hasher.start()
            try:
                self._fetch_missing(key, fd, ranges, done, journal, identity, etag, hasher, verifier)
                actual = verifier.result() if verifier else hasher.result() if hasher else None
            except BaseException:
                if hasher is not None:
                    hasher.abort()
                    hasher.join()  # it may be reading the descriptor closed below
                raise
        finally:
            os.close(fd)
        if expectation is not None and actual != expectation.expected:
            partial.unlink(missing_ok=True)
            journal.unlink(missing_ok=True)
            raise _VerificationFailed(
                f"{uri}: downloaded data does not match its {expectation.label}: expected {expectation.expected}, "
                f"got {actual}",
                permanent=expectation.label == "sha256",
            )
        os.replace(partial, dest)
        journal.unlink(missing_ok=True)

    def _fetch_missing(
        self,
        key: str,
        fd: int,
        ranges: Ranges,
        done: set[int],
        journal: Path,
        identity: dict[str, Any],
        etag: str | None,
        hasher: ReadBackHasher | None,
        verifier: RangeVerifier | None,
    ) -> None:
        abort = threading.Event()
        contiguous = 0

        def record(index: int) -> None:
            nonlocal contiguous
            done.add(index)
            write_json_atomically(journal, {**identity, "done": sorted(done)})
            while contiguous < len(ranges) and contiguous in done:
                contiguous += 1
            if hasher is not None and contiguous:
                hasher.advance(ranges[contiguous - 1][1])

        if hasher is not None:
            while contiguous < len(ranges) and contiguous in done:
                contiguous += 1
            hasher.advance(ranges[contiguous - 1][1] if contiguous else 0)
        missing = [i for i in range(len(ranges)) if i not in done]
        rehash = sorted(done) if verifier is not None else []
        if not missing and not rehash:
            return
        tasks: list[Callable[[], None]] = [
            functools.partial(
                self._fetch_range, key, fd, *ranges[i], etag, abort, verifier.digesters[i] if verifier else None
            )
            for i in missing
        ]
        if verifier is not None:
            tasks += [functools.partial(verifier.hash_from_disk, fd, i) for i in rehash]

        def journal_range(task: int) -> None:
            # Ranges that finish after another failed are still journaled: a resume skips them. The tasks after
            # the fetches re-hash ranges the journal already lists.
            if task < len(missing):
                record(missing[task])

        workers = min(self.transfer.concurrency, len(tasks))
        fan_out(tasks, workers=workers, abort=abort, name="s3-get", on_done=journal_range)

    def _fetch_range(
        self,
        key: str,
        fd: int,
        start: int,
        end: int,
        etag: str | None,
        abort: threading.Event,
        digester: Digester | None = None,
    ) -> None:
        position = start
        uri = self.uri_for(key)

        def fetch() -> None:
            nonlocal position
            if abort.is_set():
                raise Aborted()
            answer = self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes={position}-{end - 1}")
            body = answer["Body"]
            try:
                if etag is not None and _unquote(answer.get("ETag")) != etag:
                    changed = f"ETag {etag} -> {_unquote(answer.get('ETag'))}"
                    raise StorageError(f"{uri}: changed while downloading ({changed})", uri=uri)
                while position < end:
                    if abort.is_set():
                        raise Aborted()
                    chunk = body.read(min(READ_SIZE, end - position))
                    if not chunk:
                        raise ConnectionError(f"connection closed at byte {position} of range {start}-{end - 1}")
                    view = memoryview(chunk)
                    while view:
                        written = os.pwrite(fd, view, position)
                        if digester is not None:  # exactly what was written: a retry goes on from `position`
                            digester.update(view[:written])
                        position += written
                        view = view[written:]
                    self._count(DOWNLOAD, len(chunk))
            finally:
                body.close()

        self._call(f"download bytes {start}-{end - 1}", key, fetch)


def _read_journal(journal: Path, partial: Path, identity: dict[str, Any]) -> tuple[set[int], int | None]:
    """Finished range indices and range size of an earlier attempt at the same object, or nothing."""
    try:
        recorded = json.loads(journal.read_text())
        if {k: recorded.get(k) for k in identity} != identity or partial.stat().st_size != identity["size"]:
            return set(), None
        range_size = int(recorded["rangeSize"])
        if range_size <= 0:
            return set(), None
        return {int(i) for i in recorded.get("done", [])}, range_size
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return set(), None

"""Object storage for the trainer: s3:// and file:// behind one interface, and the node-local pull cache.

Stores
    ``open_store(uri, storage_config)`` returns an ``ObjectStore`` rooted at ``uri``; keys are ``/``-separated and
    relative to that root (``open_store("s3://b/runs/x").put_bytes("result.json", ...)`` writes
    ``s3://b/runs/x/result.json``). S3 goes through boto3 with the endpoint and region of the ``StorageConfig``,
    else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and ``AWS_REGION`` / ``AWS_DEFAULT_REGION``; credentials come
    only from boto3's default chain. ``on_bytes(direction, n)`` (``"download"`` / ``"upload"``) is called from worker
    threads as bytes move, so metrics can count them; it must be thread-safe.

Errors and retries
    botocore's own retries are off; every request goes through ``call_with_retries``: throttling, 5xx, refused or
    reset connections and timeouts are retried with exponential backoff and jitter for up to ``RetryPolicy``'s
    deadline (90 s by default, so an S3 endpoint that restarts in ~10-60 s is survived). NoSuchBucket, NoSuchKey,
    AccessDenied, InvalidAccessKeyId, SignatureDoesNotMatch (and missing credentials) raise
    ``StorageError(permanent=True)`` at once; the message starts with the URI. Other client errors raise a
    non-permanent ``StorageError`` at once. Local errors (a full disk) are not wrapped.

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
    a native library and are not used. Where the value can be assembled from pieces, each range is hashed by the
    thread that downloads it, as its bytes arrive, and the pieces are combined at the end: a composite value when
    the ranges start on part boundaries (the range size is then a multiple of the part size), and a whole-object
    CRC32 (CRC32s combine, as zlib's ``crc32_combine``). A whole-object MD5 or SHA (and the caller's sha256) cannot
    be split: one thread reads the file back from the page cache in order, as soon as a contiguous prefix has
    arrived, so it overlaps the download. Ranges already on disk when a download resumes are hashed from the
    file, never taken on trust from the journal. A mismatch discards
    the file: a checksum or ETag mismatch downloads it once more, then fails; a mismatch with a sha256 the caller
    gave fails at once with ``permanent=True``. ``file://`` stores copy the file instead (size and sha256 checked).

Uploads (``upload_file``)
    Files above ``multipart_threshold`` go up as a multipart upload of parallel parts (``upload_concurrency`` at
    a time; ``background_upload_concurrency`` for ``background=True``, the checkpoints uploaded while training
    goes on), each part retried on its own and carrying a CRC32 the server checks; a failed upload is aborted.
    ``delete_prefix("")`` is refused.

Node cache (``pull_model``, ``pull_dataset``)
    ``<cache_dir>/models/<name>-<hash of uri>/`` mirrors the objects under the URI (``datasets/`` for data: one
    file, or every .jsonl/.json/.parquet under a prefix). ``<that>.complete`` (JSON: uri, each file's size and
    ETag, the sha256 checked) is written last; a pull whose listing matches it (and whose files are there with
    their sizes) downloads nothing. Local rank 0 takes ``<that>.lock`` (flock) and downloads what is missing or
    changed, small files concurrently, big ones one after another (each in parallel ranges); other local ranks
    list the same URI and wait until the ``.complete`` marker matches that listing, or fail after
    ``wait_timeout_s`` with a message naming rank 0. No torch.distributed is involved. ``model.sha256`` applies to
    the model's only weights file (``*.safetensors``, else ``*.bin``); a model with several is refused.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

from isal import isal_zlib

from finetune_trainer.config import StorageConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
ByteHook = Callable[[str, int], None]
DOWNLOAD = "download"
UPLOAD = "upload"
MiB = 1024 * 1024
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
JOURNAL_VERSION = 1
# Socket reads per pwrite: big enough to keep Python overhead low, small enough to stop quickly on abort.
READ_SIZE = MiB

# Error codes that no retry can fix: the job's spec or credentials are wrong.
PERMANENT_ERROR_CODES = frozenset(
    {
        "NoSuchBucket",
        "NoSuchKey",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidBucketName",
        "AllAccessDisabled",
        "AccountProblem",
        "NotFound",
        "404",
        "403",
    }
)
TRANSIENT_ERROR_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
    }
)


class StorageError(RuntimeError):
    """A storage operation failed; ``permanent`` means retrying the job cannot help. The message names the URI."""

    def __init__(self, message: str, *, uri: str, permanent: bool = False) -> None:
        super().__init__(message if message.startswith(uri) else f"{uri}: {message}")
        self.uri = uri
        self.permanent = permanent


class ObjectInfo(NamedTuple):
    key: str
    size: int
    etag: str | None


class PulledFile(NamedTuple):
    """A file in the node cache and the URI it came from (error messages about its rows name the URI)."""

    path: Path
    uri: str


# Aliases: inside the store classes ``list`` names the method.
ObjectList = list[ObjectInfo]
_Ranges = list[tuple[int, int]]
_Parts = list[dict[str, Any]]


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with equal jitter, bounded by attempts and by a deadline from the first try."""

    max_attempts: int = 30
    base_delay_s: float = 0.25
    max_delay_s: float = 8.0
    deadline_s: float = 90.0

    def delay(self, retry: int, rng: random.Random) -> float:
        ceiling = min(self.max_delay_s, self.base_delay_s * 2.0**retry)
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


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


# ---------------------------------------------------------------------------------------------------------------
# Error classification and retries


def _client_error_code(exc: BaseException) -> tuple[str, int] | None:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return None
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "")), int(status or 0)


def is_transient(exc: BaseException) -> bool:
    """Whether a retry may succeed: throttling, 5xx, connection and timeout errors."""
    import urllib3.exceptions
    from botocore import exceptions as bce

    coded = _client_error_code(exc)
    if coded is not None:
        code, status = coded
        return code in TRANSIENT_ERROR_CODES or status == 429 or status >= 500 or (code.isdigit() and int(code) >= 500)
    return isinstance(
        exc,
        bce.ConnectionError  # refused, connect timeout, endpoint unreachable
        | bce.HTTPClientError  # reset, closed, read timeout, broken stream
        | bce.IncompleteReadError
        | urllib3.exceptions.HTTPError
        | ConnectionError
        | TimeoutError,
    )


def is_permanent(exc: BaseException) -> bool:
    """Whether the request can never succeed as configured (missing bucket or key, refused credentials)."""
    from botocore import exceptions as bce

    coded = _client_error_code(exc)
    if coded is not None:
        return coded[0] in PERMANENT_ERROR_CODES
    return isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError)


def describe_error(exc: BaseException) -> str:
    coded = _client_error_code(exc)
    if coded is not None:
        code, status = coded
        message = getattr(exc, "response", {}).get("Error", {}).get("Message") or ""
        return f"{code} (HTTP {status}){': ' + message if message else ''}"
    return f"{type(exc).__name__}: {exc}"


def call_with_retries(
    operation: Callable[[], T],
    *,
    uri: str,
    what: str,
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> T:
    """Run ``operation``; retry transient errors per ``policy``; turn storage errors into ``StorageError``."""
    from botocore.exceptions import BotoCoreError, ClientError

    rng = rng or random.Random()
    started = clock()
    retry = 0
    while True:
        try:
            return operation()
        except StorageError:
            raise
        except Exception as exc:
            if is_permanent(exc):
                raise StorageError(f"{uri}: {what} failed: {describe_error(exc)}", uri=uri, permanent=True) from exc
            if not is_transient(exc):
                if isinstance(exc, BotoCoreError | ClientError):
                    raise StorageError(f"{uri}: {what} failed: {describe_error(exc)}", uri=uri) from exc
                raise
            delay = policy.delay(retry, rng)
            elapsed = clock() - started
            if retry + 1 >= policy.max_attempts or elapsed + delay > policy.deadline_s:
                raise StorageError(
                    f"{uri}: {what} still failing after {retry + 1} attempts over {elapsed:.0f} s: "
                    f"{describe_error(exc)}",
                    uri=uri,
                ) from exc
            retry += 1
            log.warning("%s: %s failed (%s); retry %d in %.1f s", uri, what, describe_error(exc), retry, delay)
            sleep(delay)


# ---------------------------------------------------------------------------------------------------------------
# URIs and stores


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

    def _count(self, direction: str, n: int) -> None:
        if self.on_bytes is not None and n:
            self.on_bytes(direction, n)

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


def _refuse_empty_prefix(prefix: str, uri: str) -> None:
    if not prefix:
        raise ValueError(f"{uri}: refusing to delete every object under the store's root (empty prefix)")


def _unquote(etag: str | None) -> str | None:
    return etag.strip('"') if etag else None


# ---------------------------------------------------------------------------------------------------------------
# Verification


class _Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def digest(self) -> bytes: ...


class _Crc32:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | memoryview) -> None:
        self.value = isal_zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


def _crc32_base64(data: bytes) -> str:
    """The ``x-amz-checksum-crc32`` value; given with the request, botocore does not compute it again (slower)."""
    return base64.b64encode(isal_zlib.crc32(data).to_bytes(4, "big")).decode()


def _new_hasher(algorithm: str) -> _Hasher:
    if algorithm == "crc32":
        return _Crc32()
    return hashlib.new(algorithm)


_Algorithm = Literal["md5", "sha1", "sha256", "crc32"]


@dataclass(frozen=True)
class Expectation:
    """What a downloaded file must hash to: whole-file, or ``combine(part digests)-N`` for composite values."""

    label: str
    algorithm: _Algorithm
    expected: str
    encoding: Literal["hex", "base64"]
    part_size: int | None = None
    parts: int = 1

    def render(self, digest: bytes) -> str:
        text = digest.hex() if self.encoding == "hex" else base64.b64encode(digest).decode()
        return f"{text}-{self.parts}" if self.part_size is not None else text


class _Digester:
    """Accumulates an Expectation's digest from the file's bytes fed in order."""

    def __init__(self, expectation: Expectation) -> None:
        self.expectation = expectation
        self.current = _new_hasher(expectation.algorithm)
        self.current_length = 0
        self.part_digests: list[bytes] = []

    def update(self, data: bytes | memoryview) -> None:
        part_size = self.expectation.part_size
        if part_size is None:
            self.current.update(data)
            return
        view = memoryview(data)
        while view:
            take = min(len(view), part_size - self.current_length)
            self.current.update(view[:take])
            self.current_length += take
            view = view[take:]
            if self.current_length == part_size:
                self.part_digests.append(self.current.digest())
                self.current = _new_hasher(self.expectation.algorithm)
                self.current_length = 0

    def parts(self) -> list[bytes]:
        """The digests of the parts fed so far, the last one possibly short."""
        return self.part_digests + [self.current.digest()] if self.current_length else list(self.part_digests)

    def result(self) -> str:
        if self.expectation.part_size is None:
            return self.expectation.render(self.current.digest())
        return self.expectation.render(_combine_parts(self.expectation.algorithm, self.parts()))


def _combine_parts(algorithm: str, digests: Iterable[bytes]) -> bytes:
    combined = _new_hasher(algorithm)
    combined.update(b"".join(digests))
    return combined.digest()


CRC32_POLY = 0xEDB88320  # reflected


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC-32 polynomial, in zlib's reflected bit order."""
    product = 0
    m = 1 << 31
    while m and a:
        if a & m:
            product ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ CRC32_POLY if b & 1 else b >> 1
    return product


def _x2n_table() -> list[int]:
    table = [1 << 30]  # x^1
    for _ in range(31):
        table.append(_multmodp(table[-1], table[-1]))
    return table  # table[k] = x^(2^k) mod p


_X2N = _x2n_table()


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """``crc32(a + b)`` from ``crc32(a)``, ``crc32(b)`` and ``len(b)`` (zlib's crc32_combine)."""
    shift = 1 << 31  # x^0: multiply crc1 by x^(8 * length2)
    n, k = length2, 3
    while n:
        if n & 1:
            shift = _multmodp(_X2N[k & 31], shift)
        n >>= 1
        k += 1
    return _multmodp(shift, crc1) ^ crc2


class _RangeVerifier:
    """Hashes every range in the thread that downloads it, then combines the pieces (see the module docstring)."""

    def __init__(self, expectation: Expectation, ranges: _Ranges) -> None:
        self.expectation = expectation
        self.ranges = ranges
        self.digesters = [_Digester(expectation) for _ in ranges]

    @staticmethod
    def possible(expectation: Expectation, range_size: int) -> bool:
        if expectation.part_size is not None:
            return range_size % expectation.part_size == 0
        return expectation.algorithm == "crc32"

    def hash_from_disk(self, fd: int, index: int) -> None:
        """A range written by an earlier attempt: hash what the file holds."""
        start, end = self.ranges[index]
        for position in range(start, end, _ReadBackHasher.CHUNK):
            data = os.pread(fd, min(_ReadBackHasher.CHUNK, end - position), position)
            if len(data) != min(_ReadBackHasher.CHUNK, end - position):
                raise OSError(f"unexpected end of file at byte {position + len(data)}")
            self.digesters[index].update(data)

    def result(self) -> str:
        if self.expectation.part_size is not None:
            digest = _combine_parts(self.expectation.algorithm, (d for g in self.digesters for d in g.parts()))
            return self.expectation.render(digest)
        crc = 0
        for (start, end), digester in zip(self.ranges, self.digesters, strict=True):
            crc = crc32_combine(crc, int.from_bytes(digester.current.digest(), "big"), end - start)
        return self.expectation.render(crc.to_bytes(4, "big"))


class _ReadBackHasher(threading.Thread):
    """Hashes a file front to back while its ranges arrive out of order, reading what is already written."""

    CHUNK = 4 * MiB

    def __init__(self, fd: int, size: int, expectation: Expectation) -> None:
        super().__init__(name="verify", daemon=True)
        self.fd = fd
        self.size = size
        self.digester = _Digester(expectation)
        self.position = 0
        self.ready = 0
        self.aborted = False
        self.error: BaseException | None = None
        self.condition = threading.Condition()

    def advance(self, ready: int) -> None:
        with self.condition:
            self.ready = max(self.ready, ready)
            self.condition.notify()

    def abort(self) -> None:
        with self.condition:
            self.aborted = True
            self.condition.notify()

    def run(self) -> None:
        try:
            while self.position < self.size:
                with self.condition:
                    while self.ready <= self.position and not self.aborted:
                        self.condition.wait()
                    if self.aborted:
                        return
                    end = self.ready
                while self.position < end:
                    data = os.pread(self.fd, min(self.CHUNK, end - self.position), self.position)
                    if not data:
                        raise OSError(f"unexpected end of file at byte {self.position}")
                    self.digester.update(data)
                    self.position += len(data)
        except BaseException as exc:  # re-raised by result() in the downloading thread
            self.error = exc

    def result(self) -> str:
        self.join()
        if self.error is not None:
            raise self.error
        return self.digester.result()


class _VerificationFailed(Exception):
    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class _Aborted(Exception):
    """Another range of the same download failed; this one stops early."""


# ---------------------------------------------------------------------------------------------------------------
# S3


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
                if (_client_error_code(exc) or ("", 0))[0] in ("404", "NoSuchKey", "NotFound"):
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
            ChecksumCRC32=_crc32_base64(data),
        )
        answer: dict[str, Any] = self._call("upload", key, put)
        self._count(UPLOAD, len(data))
        return answer

    def delete_prefix(self, prefix: str) -> int:
        _refuse_empty_prefix(prefix, self.uri)
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
                    raise _Aborted()
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
                    ChecksumCRC32=_crc32_base64(data),
                )
                answer = self._call(f"upload part {number}", key, put_part)
                self._count(UPLOAD, len(data))
                part = {"PartNumber": number, "ETag": answer["ETag"]}
                if answer.get("ChecksumCRC32"):
                    part["ChecksumCRC32"] = answer["ChecksumCRC32"]
                return part

            count = math.ceil(size / part_size)
            return _run_on_pool(send, range(1, count + 1), workers, abort, "s3-put")
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
                if tries > 1 and (_client_error_code(exc) or ("", 0))[0] == "NoSuchUpload":
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
        candidates: list[tuple[str, _Algorithm, str, Literal["hex", "base64"]]] = []
        checksums: tuple[tuple[str, _Algorithm], ...] = (
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
        inline = expectation is not None and _RangeVerifier.possible(expectation, range_size)
        if not done:
            free = shutil.disk_usage(dest.parent).free
            if free < size:
                raise StorageError(f"{uri}: needs {size} bytes in {dest.parent}, {free} free", uri=uri)
        fd = os.open(partial, os.O_RDWR | os.O_CREAT | (0 if done else os.O_TRUNC), 0o644)
        try:
            os.ftruncate(fd, size)
            verifier = _RangeVerifier(expectation, ranges) if expectation is not None and inline else None
            hasher = _ReadBackHasher(fd, size, expectation) if expectation is not None and not inline else None
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
        ranges: _Ranges,
        done: set[int],
        journal: Path,
        identity: dict[str, Any],
        etag: str | None,
        hasher: _ReadBackHasher | None,
        verifier: _RangeVerifier | None,
    ) -> None:
        abort = threading.Event()
        contiguous = 0

        def record(index: int) -> None:
            nonlocal contiguous
            done.add(index)
            _write_json(journal, {**identity, "done": sorted(done)})
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
        first_error: BaseException | None = None
        workers = min(self.transfer.concurrency, len(missing) + len(rehash))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="s3-get") as pool:
            futures: dict[Future[None], int] = {
                pool.submit(
                    self._fetch_range, key, fd, *ranges[i], etag, abort, verifier.digesters[i] if verifier else None
                ): i
                for i in missing
            }
            if verifier is not None:
                futures.update({pool.submit(verifier.hash_from_disk, fd, i): -1 for i in rehash})
            for future in as_completed(futures):
                if future.cancelled():
                    continue
                error = future.exception()
                if error is None:
                    # Ranges that finish after another failed are still journaled: a resume skips them.
                    if futures[future] >= 0:
                        record(futures[future])
                elif first_error is None or isinstance(first_error, _Aborted):
                    first_error = error
                    abort.set()
                    for pending in futures:
                        pending.cancel()
        if first_error is not None:
            raise first_error

    def _fetch_range(
        self,
        key: str,
        fd: int,
        start: int,
        end: int,
        etag: str | None,
        abort: threading.Event,
        digester: _Digester | None = None,
    ) -> None:
        position = start
        uri = self.uri_for(key)

        def fetch() -> None:
            nonlocal position
            if abort.is_set():
                raise _Aborted()
            answer = self.client.get_object(Bucket=self.bucket, Key=self._key(key), Range=f"bytes={position}-{end - 1}")
            body = answer["Body"]
            try:
                if etag is not None and _unquote(answer.get("ETag")) != etag:
                    changed = f"ETag {etag} -> {_unquote(answer.get('ETag'))}"
                    raise StorageError(f"{uri}: changed while downloading ({changed})", uri=uri)
                while position < end:
                    if abort.is_set():
                        raise _Aborted()
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


def _run_on_pool(
    work: Callable[[int], T], items: Iterable[int], workers: int, abort: threading.Event, name: str
) -> list[T]:
    """Run ``work`` over items on a pool; on the first failure stop the rest and raise it."""
    results: dict[int, T] = {}
    first_error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
        futures = {pool.submit(work, item): item for item in items}
        for future in as_completed(futures):
            if future.cancelled():
                continue
            error = future.exception()
            if error is None:
                results[futures[future]] = future.result()
            elif first_error is None or isinstance(first_error, _Aborted):
                first_error = error
                abort.set()
                for pending in futures:
                    pending.cancel()
    if first_error is not None:
        raise first_error
    return [results[item] for item in sorted(results)]


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


def _write_json(path: Path, data: Any) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    temporary.write_text(json.dumps(data, sort_keys=True))
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------------------------
# Local files


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

    def _atomic_write(self, path: Path, fill: Callable[[Path], object]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            fill(temporary)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(self._path(key), lambda tmp: tmp.write_bytes(data))
        self._count(UPLOAD, len(data))

    def upload_file(self, src: str | Path, key: str, *, background: bool = False) -> ObjectInfo:
        size = Path(src).stat().st_size
        self._atomic_write(self._path(key), lambda tmp: shutil.copyfile(src, tmp))
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
                actual = _file_sha256(tmp)
                if actual != sha256.lower():
                    raise StorageError(
                        f"{uri}: does not match its sha256: expected {sha256}, got {actual}", uri=uri, permanent=True
                    )

        self._atomic_write(dest, copy)
        size = dest.stat().st_size
        self._count(DOWNLOAD, size)
        return ObjectInfo(key, size, None)

    def delete_prefix(self, prefix: str) -> int:
        _refuse_empty_prefix(prefix, self.uri)
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


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Node-local cache


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
        return [PulledFile(folder / o.key, store.uri_for(o.key)) for o in objects]
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
        _write_json(marker, manifest)
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

"""Checksums of downloaded and uploaded files: S3's ETags and CRC32/SHA checksums, whole or composite, and sha256.

An ``Expectation`` is what a file must hash to: a whole-object digest, or a composite value ``combine(part
digests)-N`` of an object uploaded in N parts of ``part_size`` bytes (S3's multipart ETags and checksums). A
``Digester`` computes one from the file's bytes fed in order. A download fetches its ranges out of order, so where
the value can be assembled from pieces (``RangeVerifier.possible``) each range is hashed by the thread that
downloads it, as its bytes arrive, and the pieces are combined at the end: a composite value when the ranges start
on part boundaries (the range size is then a multiple of the part size), and a whole-object CRC32 (CRC32s combine,
as zlib's ``crc32_combine``). A whole-object MD5 or SHA (and a caller's sha256) cannot be split: a
``ReadBackHasher`` thread reads the file back from the page cache in order, as soon as a contiguous prefix has
arrived, so it overlaps the download. CRC32 goes through ISA-L (about 5x zlib's).
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from isal import isal_zlib

Algorithm = Literal["md5", "sha1", "sha256", "crc32"]
Ranges = list[tuple[int, int]]
# Bytes per read when a file is hashed from disk: few system calls, little memory.
READ_CHUNK = 4 * 1024 * 1024
CRC32_POLY = 0xEDB88320  # reflected


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


def _new_hasher(algorithm: str) -> _Hasher:
    if algorithm == "crc32":
        return _Crc32()
    return hashlib.new(algorithm)


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def crc32_base64(data: bytes) -> str:
    """The ``x-amz-checksum-crc32`` value; given with the request, botocore does not compute it again (slower)."""
    return base64.b64encode(isal_zlib.crc32(data).to_bytes(4, "big")).decode()


@dataclass(frozen=True)
class Expectation:
    """What a downloaded file must hash to: whole-file, or ``combine(part digests)-N`` for composite values."""

    label: str
    algorithm: Algorithm
    expected: str
    encoding: Literal["hex", "base64"]
    part_size: int | None = None
    parts: int = 1

    def render(self, digest: bytes) -> str:
        text = digest.hex() if self.encoding == "hex" else base64.b64encode(digest).decode()
        return f"{text}-{self.parts}" if self.part_size is not None else text


class Digester:
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


class RangeVerifier:
    """Hashes every range in the thread that downloads it, then combines the pieces (see the module docstring)."""

    def __init__(self, expectation: Expectation, ranges: Ranges) -> None:
        self.expectation = expectation
        self.ranges = ranges
        self.digesters = [Digester(expectation) for _ in ranges]

    @staticmethod
    def possible(expectation: Expectation, range_size: int) -> bool:
        if expectation.part_size is not None:
            return range_size % expectation.part_size == 0
        return expectation.algorithm == "crc32"

    def hash_from_disk(self, fd: int, index: int) -> None:
        """A range written by an earlier attempt: hash what the file holds."""
        start, end = self.ranges[index]
        for position in range(start, end, READ_CHUNK):
            data = os.pread(fd, min(READ_CHUNK, end - position), position)
            if len(data) != min(READ_CHUNK, end - position):
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


class ReadBackHasher(threading.Thread):
    """Hashes a file front to back while its ranges arrive out of order, reading what is already written."""

    def __init__(self, fd: int, size: int, expectation: Expectation) -> None:
        super().__init__(name="verify", daemon=True)
        self.fd = fd
        self.size = size
        self.digester = Digester(expectation)
        self.position = 0
        self.ready = 0
        self.aborted = False
        self.error: BaseException | None = None
        self.condition = threading.Condition()

    def advance(self, ready: int) -> None:
        """The first ``ready`` bytes of the file are written."""
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
                    data = os.pread(self.fd, min(READ_CHUNK, end - self.position), self.position)
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

"""Checksums without a server: S3's ETags and checksums, whole and composite, assembled from ranges in any order."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import zlib
from pathlib import Path

import pytest

from finetune_trainer.storage.checksums import (
    READ_CHUNK,
    Digester,
    Expectation,
    RangeVerifier,
    ReadBackHasher,
    crc32_base64,
    crc32_combine,
    sha256_file,
)


def s3_multipart_etag(data: bytes, part_size: int) -> str:
    parts = [data[i : i + part_size] for i in range(0, len(data), part_size)]
    return hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + f"-{len(parts)}"


@pytest.mark.parametrize("feed", [1, 1000, 4096, 10_000_000], ids=lambda n: f"fed-{n}")
def test_digests_match_s3_etags_and_checksums(feed: int) -> None:
    data = random.Random(0).randbytes(10_000)
    crc_parts = b"".join(zlib.crc32(data[i : i + 4096]).to_bytes(4, "big") for i in range(0, len(data), 4096))
    cases = [
        Expectation("ETag (MD5)", "md5", hashlib.md5(data).hexdigest(), "hex"),
        Expectation("ETag (MD5)", "md5", s3_multipart_etag(data, 4096), "hex", part_size=4096, parts=3),
        Expectation(
            "CRC32 checksum", "crc32", base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode(), "base64"
        ),
        Expectation(
            "CRC32 checksum",
            "crc32",
            base64.b64encode(zlib.crc32(crc_parts).to_bytes(4, "big")).decode() + "-3",
            "base64",
            part_size=4096,
            parts=3,
        ),
        Expectation("sha256", "sha256", hashlib.sha256(data).hexdigest(), "hex"),
    ]
    for expectation in cases:
        digester = Digester(expectation)
        for start in range(0, len(data), feed):
            digester.update(data[start : start + feed])
        assert digester.result() == expectation.expected, expectation


@pytest.mark.parametrize(
    ("length_a", "length_b"),
    [(0, 0), (0, 7), (7, 0), (1, 1), (3, 4096), (4096, 3), (10_000, 65_537), (1 << 20, 5)],
)
def test_crc32_combine_equals_the_crc32_of_the_concatenation(length_a: int, length_b: int) -> None:
    generator = random.Random(length_a * 31 + length_b)
    a, b = generator.randbytes(length_a), generator.randbytes(length_b)

    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def _expectations(data: bytes, part_size: int) -> dict[str, Expectation]:
    parts = [data[i : i + part_size] for i in range(0, len(data), part_size)]
    crc_parts = b"".join(zlib.crc32(p).to_bytes(4, "big") for p in parts)
    b64 = lambda digest: base64.b64encode(digest).decode()  # noqa: E731
    return {
        "whole-crc32": Expectation("CRC32 checksum", "crc32", b64(zlib.crc32(data).to_bytes(4, "big")), "base64"),
        "composite-crc32": Expectation(
            "CRC32 checksum",
            "crc32",
            b64(zlib.crc32(crc_parts).to_bytes(4, "big")) + f"-{len(parts)}",
            "base64",
            part_size=part_size,
            parts=len(parts),
        ),
        "composite-md5": Expectation(
            "ETag (MD5)", "md5", s3_multipart_etag(data, part_size), "hex", part_size=part_size, parts=len(parts)
        ),
        "composite-sha256": Expectation(
            "SHA256 checksum",
            "sha256",
            b64(hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in parts)).digest()) + f"-{len(parts)}",
            "base64",
            part_size=part_size,
            parts=len(parts),
        ),
        "whole-md5": Expectation("ETag (MD5)", "md5", hashlib.md5(data).hexdigest(), "hex"),
        "whole-sha256": Expectation("sha256", "sha256", hashlib.sha256(data).hexdigest(), "hex"),
    }


@pytest.mark.parametrize(
    ("name", "range_size", "possible"),
    [
        ("whole-crc32", 3000, True),  # CRC32s combine at any boundary
        ("composite-crc32", 8192, True),
        ("composite-crc32", 4096, True),
        ("composite-md5", 12288, True),
        ("composite-md5", 6000, False),  # a range would start inside a part
        ("composite-sha256", 2048, False),
        ("whole-md5", 4096, False),  # MD5 and SHA of the whole object cannot be split
        ("whole-sha256", 4096, False),
    ],
)
def test_ranges_are_hashed_where_they_arrive_when_the_pieces_combine(
    name: str, range_size: int, possible: bool
) -> None:
    data = random.Random(1).randbytes(10_000)  # parts of 4096: 4096, 4096, 1808
    expectation = _expectations(data, 4096)[name]
    assert RangeVerifier.possible(expectation, range_size) is possible
    if not possible:
        return
    ranges = [(start, min(start + range_size, len(data))) for start in range(0, len(data), range_size)]
    verifier = RangeVerifier(expectation, ranges)
    order = list(range(len(ranges)))
    random.Random(2).shuffle(order)  # ranges finish in any order; each is fed in order, in uneven pieces
    for index in order:
        start, end = ranges[index]
        position = start
        while position < end:
            step = min(end - position, random.Random(position).randint(1, 1500))
            verifier.digesters[index].update(memoryview(data)[position : position + step])
            position += step

    assert verifier.result() == expectation.expected
    verifier.digesters[-1].update(b"x")  # one byte more anywhere and the result no longer matches
    assert verifier.result() != expectation.expected


def test_ranges_resumed_from_disk_are_hashed_from_the_file(tmp_path: Path) -> None:
    data = random.Random(3).randbytes(10_000)
    expectation = _expectations(data, 4096)["composite-md5"]
    ranges = [(0, 8192), (8192, 10_000)]
    path = tmp_path / "partial"
    path.write_bytes(data[:8192] + b"\0" * 1808)
    fd = os.open(path, os.O_RDONLY)
    try:
        verifier = RangeVerifier(expectation, ranges)
        verifier.hash_from_disk(fd, 0)
        verifier.digesters[1].update(data[8192:])
        assert verifier.result() == expectation.expected

        corrupted = RangeVerifier(expectation, ranges)
        os.pwrite(os.open(path, os.O_WRONLY), b"!", 100)
        corrupted.hash_from_disk(fd, 0)
        corrupted.digesters[1].update(data[8192:])
        assert corrupted.result() != expectation.expected
    finally:
        os.close(fd)


def test_sha256_file_reads_a_file_larger_than_one_chunk(tmp_path: Path) -> None:
    data = random.Random(4).randbytes(READ_CHUNK + 12_345)
    path = tmp_path / "weights.bin"
    path.write_bytes(data)

    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_crc32_base64_is_the_header_s3_checks() -> None:
    data = b"checkpoint shard"

    assert crc32_base64(data) == base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


@pytest.mark.parametrize("name", ["whole-md5", "whole-sha256", "composite-md5"])
def test_read_back_hasher_follows_the_contiguous_prefix_as_ranges_arrive(tmp_path: Path, name: str) -> None:
    data = random.Random(5).randbytes(10_000)
    expectation = _expectations(data, 4096)[name]
    path = tmp_path / "partial"
    path.write_bytes(b"\0" * len(data))
    ranges = [(0, 3000), (3000, 6000), (6000, 10_000)]
    fd = os.open(path, os.O_RDWR)
    try:
        hasher = ReadBackHasher(fd, len(data), expectation)
        hasher.start()
        for index in (2, 0, 1):  # out of order: the hasher may read only up to the end of the contiguous prefix
            start, end = ranges[index]
            os.pwrite(fd, data[start:end], start)
            hasher.advance({2: 0, 0: 3000, 1: 10_000}[index])

        assert hasher.result() == expectation.expected
    finally:
        os.close(fd)


def test_read_back_hasher_stops_when_aborted(tmp_path: Path) -> None:
    data = random.Random(6).randbytes(5000)
    path = tmp_path / "partial"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        hasher = ReadBackHasher(fd, len(data), _expectations(data, 4096)["whole-sha256"])
        hasher.start()
        hasher.advance(1000)
        hasher.abort()
        hasher.join(timeout=30)

        assert not hasher.is_alive() and hasher.position <= 1000
    finally:
        os.close(fd)

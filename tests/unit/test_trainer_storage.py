"""Storage without a server: file:// stores and the node cache, error classification, retries, digests."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from finetune_trainer.storage import (
    Expectation,
    FileStore,
    MiB,
    RetryPolicy,
    S3Store,
    StorageError,
    TransferSettings,
    _Digester,
    _RangeVerifier,
    background_upload_streams,
    cache_folder_name,
    call_with_retries,
    crc32_combine,
    is_permanent,
    is_transient,
    open_store,
    pull_dataset,
    pull_model,
    split_uri,
)


def client_error(code: str, status: int, operation: str = "GetObject") -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": f"{code} happened"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, operation)


@pytest.mark.parametrize(
    ("error", "transient", "permanent"),
    [
        pytest.param(client_error("SlowDown", 503), True, False, id="slow-down"),
        pytest.param(client_error("ThrottlingException", 400), True, False, id="throttling"),
        pytest.param(client_error("InternalError", 500), True, False, id="internal-error"),
        pytest.param(client_error("502", 502, "HeadObject"), True, False, id="bad-gateway-head"),
        pytest.param(client_error("RequestTimeout", 400), True, False, id="request-timeout"),
        pytest.param(client_error("TooManyRequests", 429), True, False, id="429"),
        pytest.param(client_error("NoSuchBucket", 404), False, True, id="no-such-bucket"),
        pytest.param(client_error("NoSuchKey", 404), False, True, id="no-such-key"),
        pytest.param(client_error("404", 404, "HeadObject"), False, True, id="head-404"),
        pytest.param(client_error("AccessDenied", 403), False, True, id="access-denied"),
        pytest.param(client_error("InvalidAccessKeyId", 403), False, True, id="bad-key-id"),
        pytest.param(client_error("SignatureDoesNotMatch", 403), False, True, id="bad-secret"),
        pytest.param(client_error("InvalidRange", 416), False, False, id="other-client-error"),
        pytest.param(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True, False, id="refused"),
        pytest.param(ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), True, False, id="connect-timeout"),
        pytest.param(ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), True, False, id="read-timeout"),
        pytest.param(ResponseStreamingError(error="reset"), True, False, id="stream-broken"),
        pytest.param(ConnectionResetError(104, "reset by peer"), True, False, id="reset"),
        pytest.param(NoCredentialsError(), False, True, id="no-credentials"),
        pytest.param(ParamValidationError(report="bad"), False, False, id="param-validation"),
        pytest.param(ValueError("not storage"), False, False, id="unrelated"),
    ],
)
def test_errors_are_classified(error: Exception, transient: bool, permanent: bool) -> None:
    assert (is_transient(error), is_permanent(error)) == (transient, permanent)


class Flaky:
    """Fails with the given errors in turn, then returns "ok"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def fast_policy(max_attempts: int = 30) -> RetryPolicy:
    return RetryPolicy(max_attempts=max_attempts, base_delay_s=0.001, max_delay_s=0.002, deadline_s=5.0)


def test_transient_errors_are_retried_until_success() -> None:
    flaky = Flaky(EndpointConnectionError(endpoint_url="http://x"), client_error("SlowDown", 503))

    result = call_with_retries(flaky, uri="s3://b/k", what="get", policy=fast_policy())

    assert (result, flaky.calls) == ("ok", 3)


def test_a_permanent_error_raises_at_once_naming_the_uri() -> None:
    flaky = Flaky(client_error("NoSuchBucket", 404))

    with pytest.raises(StorageError) as error:
        call_with_retries(flaky, uri="s3://missing/model", what="list", policy=fast_policy())

    assert error.value.permanent
    assert str(error.value).startswith("s3://missing/model: list failed: NoSuchBucket (HTTP 404)")
    assert flaky.calls == 1


def test_other_client_errors_fail_at_once_but_not_permanently() -> None:
    flaky = Flaky(client_error("InvalidRange", 416))

    with pytest.raises(StorageError) as error:
        call_with_retries(flaky, uri="s3://b/k", what="get", policy=fast_policy())

    assert not error.value.permanent and flaky.calls == 1


def test_unrelated_errors_pass_through_unwrapped() -> None:
    with pytest.raises(ValueError):
        call_with_retries(Flaky(ValueError("disk")), uri="s3://b/k", what="get", policy=fast_policy())


def test_retries_stop_at_the_attempt_limit() -> None:
    flaky = Flaky(*[client_error("SlowDown", 503)] * 10)

    with pytest.raises(StorageError, match=r"^s3://b/k: get still failing after 4 attempts") as error:
        call_with_retries(flaky, uri="s3://b/k", what="get", policy=fast_policy(max_attempts=4))

    assert not error.value.permanent and flaky.calls == 4


def test_the_default_policy_keeps_retrying_for_at_least_a_minute() -> None:
    slept: list[float] = []
    clock = [0.0]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    flaky = Flaky(*[EndpointConnectionError(endpoint_url="http://x")] * 1000)

    with pytest.raises(StorageError, match="still failing"):
        call_with_retries(
            flaky,
            uri="s3://b/k",
            what="get",
            policy=RetryPolicy(),
            sleep=sleep,
            clock=lambda: clock[0],
            rng=random.Random(1),
        )

    assert 60 <= sum(slept) <= RetryPolicy().deadline_s
    assert max(slept) <= RetryPolicy().max_delay_s
    assert slept[:3] == sorted(slept[:3])


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket", ("s3", "bucket", "")),
        ("s3://bucket/models/tiny/", ("s3", "bucket", "models/tiny")),
        ("file:///tmp/x/y", ("file", "", "/tmp/x/y")),
    ],
)
def test_uris_split_into_scheme_bucket_and_path(uri: str, expected: tuple[str, str, str]) -> None:
    assert split_uri(uri) == expected


def test_a_bad_uri_is_a_permanent_error() -> None:
    with pytest.raises(StorageError, match=r"^http://x/y: not an s3://") as error:
        split_uri("http://x/y")
    assert error.value.permanent


def test_cache_folder_names_are_readable_and_distinct() -> None:
    assert cache_folder_name("s3://b/models/tiny").startswith("tiny-")
    assert cache_folder_name("s3://b/models/tiny") != cache_folder_name("s3://c/models/tiny")


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
        digester = _Digester(expectation)
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
    assert _RangeVerifier.possible(expectation, range_size) is possible
    if not possible:
        return
    ranges = [(start, min(start + range_size, len(data))) for start in range(0, len(data), range_size)]
    verifier = _RangeVerifier(expectation, ranges)
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
        verifier = _RangeVerifier(expectation, ranges)
        verifier.hash_from_disk(fd, 0)
        verifier.digesters[1].update(data[8192:])
        assert verifier.result() == expectation.expected

        corrupted = _RangeVerifier(expectation, ranges)
        os.pwrite(os.open(path, os.O_WRONLY), b"!", 100)
        corrupted.hash_from_disk(fd, 0)
        corrupted.digesters[1].update(data[8192:])
        assert corrupted.result() != expectation.expected
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("size", "part_size", "expected"),
    [
        (256 * MiB, None, 32 * MiB),  # about two ranges per thread (4 threads here)
        (256 * MiB, 8 * MiB, 32 * MiB),
        (256 * MiB, 5 * MiB, 30 * MiB),  # whole parts per range
        (256 * MiB, 100 * MiB, 100 * MiB),  # at least one part
        (10 * MiB, None, 8 * MiB),  # the minimum
        (4 * 1024 * MiB, None, 64 * MiB),  # the maximum
    ],
)
def test_range_sizes_hold_whole_parts(size: int, part_size: int | None, expected: int) -> None:
    assert TransferSettings(concurrency=4).range_size(size, part_size) == expected


class PartCountingClient:
    """Just enough of an S3 client for a multipart upload; records how many parts were in flight at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0
        self.parts = 0

    def create_multipart_upload(self, **_: Any) -> dict[str, Any]:
        return {"UploadId": "upload-1"}

    def upload_part(self, **request: Any) -> dict[str, Any]:
        with self.lock:
            self.in_flight += 1
            self.parts += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        time.sleep(0.05)  # long enough for every worker to pick a part
        with self.lock:
            self.in_flight -= 1
        return {"ETag": f'"{request["PartNumber"]}"'}

    def complete_multipart_upload(self, **_: Any) -> dict[str, Any]:
        return {"ETag": '"done-8"'}


@pytest.mark.parametrize(("background", "expected"), [(False, 6), (True, 2)], ids=["foreground", "background"])
def test_background_uploads_keep_fewer_parts_in_flight(tmp_path: Path, background: bool, expected: int) -> None:
    source = tmp_path / "shard.bin"
    source.write_bytes(b"s" * (8 * MiB))
    client = PartCountingClient()
    transfer = TransferSettings(
        multipart_threshold=MiB, upload_part_size=MiB, upload_concurrency=6, background_upload_concurrency=2
    )
    store = S3Store("s3://bucket/run", client, "bucket", "run", transfer=transfer)

    info = store.upload_file(source, "checkpoints/step-00000010/shard.bin", background=background)

    assert (client.parts, client.most_in_flight) == (8, expected)
    assert info.etag == "done-8"


@pytest.mark.parametrize(("cpus", "streams"), [(2, 2), (16, 2), (96, 4), (192, 4)])
def test_background_upload_streams_grow_with_the_node_but_stay_below_a_foreground_upload(cpus: int,
                                                                                        streams: int) -> None:
    assert background_upload_streams(cpus, upload_concurrency=8) == streams
    assert streams < 8


def test_background_upload_streams_follow_this_node_and_the_foreground_setting() -> None:
    assert TransferSettings().background_upload_concurrency == background_upload_streams(
        len(os.sched_getaffinity(0)), 8)
    assert TransferSettings(upload_concurrency=2).background_upload_concurrency == 1
    assert TransferSettings(background_upload_concurrency=3).background_upload_concurrency == 3


# --- file:// stores --------------------------------------------------------------------------------------------


def test_file_store_round_trips_lists_by_prefix_and_deletes(tmp_path: Path) -> None:
    moved: dict[str, int] = {}
    store = open_store(f"file://{tmp_path}/out", on_bytes=lambda d, n: moved.__setitem__(d, moved.get(d, 0) + n))
    source = tmp_path / "weights.bin"
    source.write_bytes(b"w" * 1000)

    store.put_bytes("checkpoints/step-1/manifest.json", b"{}")
    store.upload_file(source, "checkpoints/step-1/weights.bin")
    store.put_bytes("checkpoints/step-10/manifest.json", b"{}")
    store.download_file("checkpoints/step-1/weights.bin", tmp_path / "back.bin", expected_size=1000)

    assert isinstance(store, FileStore)
    assert [i.key for i in store.list("checkpoints/step-1/")] == [
        "checkpoints/step-1/manifest.json",
        "checkpoints/step-1/weights.bin",
    ]
    assert store.get_bytes("checkpoints/step-10/manifest.json") == b"{}"
    assert (tmp_path / "back.bin").read_bytes() == b"w" * 1000
    assert moved == {"upload": 1004, "download": 1002}
    assert store.delete_prefix("checkpoints/step-1/") == 2
    assert [i.key for i in store.list()] == ["checkpoints/step-10/manifest.json"]
    assert not (tmp_path / "out" / "checkpoints" / "step-1").exists()
    assert store.exists("checkpoints/step-10/manifest.json") and not store.exists("nothing")


def test_file_store_missing_object_is_permanent_and_named(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")

    with pytest.raises(StorageError) as error:
        store.get_bytes("absent.json")

    assert error.value.permanent and str(error.value).startswith(f"file://{tmp_path}/absent.json: ")


def make_model(folder: Path) -> bytes:
    folder.mkdir(parents=True)
    weights = random.Random(1).randbytes(300_000)
    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text("{}")
    (folder / "tokenizer.json").write_text("{}")
    return weights


def counting() -> tuple[dict[str, int], Callable[[str, int], None]]:
    moved: dict[str, int] = {}

    def hook(direction: str, n: int) -> None:
        moved[direction] = moved.get(direction, 0) + n

    return moved, hook


def test_pull_model_caches_and_a_second_pull_reads_nothing(tmp_path: Path) -> None:
    weights = make_model(tmp_path / "src" / "tiny")
    moved, hook = counting()
    uri = f"file://{tmp_path}/src/tiny"

    first = pull_model(uri, tmp_path / "cache", local_rank=0, on_bytes=hook)
    after_first = dict(moved)
    second = pull_model(uri, tmp_path / "cache", local_rank=0, on_bytes=hook)

    assert first == second
    assert sorted(p.name for p in first.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert (first / "model.safetensors").read_bytes() == weights
    assert after_first["download"] == len(weights) + 4
    assert moved == after_first
    marker = json.loads(first.with_name(first.name + ".complete").read_text())
    assert marker["files"]["model.safetensors"]["size"] == len(weights)


def test_pull_model_downloads_only_a_changed_file(tmp_path: Path) -> None:
    make_model(tmp_path / "src" / "tiny")
    uri = f"file://{tmp_path}/src/tiny"
    pull_model(uri, tmp_path / "cache", local_rank=0)
    (tmp_path / "src" / "tiny" / "config.json").write_text('{"changed": true}')
    moved, hook = counting()

    folder = pull_model(uri, tmp_path / "cache", local_rank=0, on_bytes=hook)

    assert moved == {"download": len('{"changed": true}')}
    assert (folder / "config.json").read_text() == '{"changed": true}'


def test_pull_model_checks_the_weights_sha256(tmp_path: Path) -> None:
    weights = make_model(tmp_path / "src" / "tiny")
    uri = f"file://{tmp_path}/src/tiny"

    folder = pull_model(uri, tmp_path / "cache", local_rank=0, sha256=hashlib.sha256(weights).hexdigest())
    with pytest.raises(StorageError, match=r"model\.safetensors: does not match its sha256") as error:
        pull_model(uri, tmp_path / "other-cache", local_rank=0, sha256="0" * 64)

    assert (folder / "model.safetensors").is_file()
    assert error.value.permanent
    assert not (tmp_path / "other-cache" / "models" / folder.name / "model.safetensors").exists()


def test_pull_model_of_an_empty_prefix_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no objects under this prefix") as error:
        pull_model(f"file://{tmp_path}/nothing", tmp_path / "cache", local_rank=0)
    assert error.value.permanent


def test_other_local_ranks_wait_for_rank_zero(tmp_path: Path) -> None:
    make_model(tmp_path / "src" / "tiny")
    uri = f"file://{tmp_path}/src/tiny"
    moved, hook = counting()
    results: dict[str, Path] = {}
    waiter = threading.Thread(
        target=lambda: results.setdefault(
            "rank1", pull_model(uri, tmp_path / "cache", local_rank=1, on_bytes=hook, wait_timeout_s=30)
        )
    )
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()

    results["rank0"] = pull_model(uri, tmp_path / "cache", local_rank=0)
    waiter.join(10)

    assert results["rank1"] == results["rank0"]
    assert moved == {}


def test_a_waiting_rank_times_out_with_a_clear_error(tmp_path: Path) -> None:
    make_model(tmp_path / "src" / "tiny")

    with pytest.raises(StorageError, match=r"local rank 2 waited 0 s for local rank 0 to pull it into"):
        pull_model(f"file://{tmp_path}/src/tiny", tmp_path / "cache", local_rank=2, wait_timeout_s=0.2)


def test_pull_dataset_of_a_file_and_of_a_prefix(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "part").mkdir(parents=True)
    (data / "part" / "b.jsonl").write_text('{"text": "b"}\n')
    (data / "part" / "a.parquet").write_bytes(b"PAR1")
    (data / "part" / "README.md").write_text("not data")
    (data / "eval.json").write_text('{"text": "e"}\n')

    files = pull_dataset(f"file://{data}/part", tmp_path / "cache", local_rank=0)
    (single,) = pull_dataset(f"file://{data}/eval.json", tmp_path / "cache", local_rank=0)

    assert [f.uri for f in files] == [f"file://{data}/part/a.parquet", f"file://{data}/part/b.jsonl"]
    assert [f.path.read_bytes() for f in files] == [b"PAR1", b'{"text": "b"}\n']
    assert single.uri == f"file://{data}/eval.json" and single.path.read_text() == '{"text": "e"}\n'
    with pytest.raises(StorageError, match="no .jsonl, .json or .parquet files"):
        pull_dataset(f"file://{data}/nothing", tmp_path / "cache", local_rank=0)
    assert os.path.commonpath([files[0].path, tmp_path / "cache" / "datasets"]) == str(tmp_path / "cache" / "datasets")

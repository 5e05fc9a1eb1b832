"""Storage without a server: file:// stores and the node cache, error classification, retries, S3 uploads."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
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
    FileStore,
    MiB,
    RetryPolicy,
    S3Store,
    StorageError,
    TransferSettings,
    background_upload_streams,
    cache_folder_name,
    call_with_retries,
    is_permanent,
    is_transient,
    node_cache,
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


def retry_an_outage(policy: RetryPolicy, start: float = 0.0) -> tuple[Flaky, list[float]]:
    """``call_with_retries`` against an endpoint that never answers, on a fake clock: the calls and the pauses."""
    slept: list[float] = []
    clock = [start]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    flaky = Flaky(*[EndpointConnectionError(endpoint_url="http://x")] * 1000)

    with pytest.raises(StorageError, match="still failing"):
        call_with_retries(
            flaky,
            uri="s3://b/k",
            what="get",
            policy=policy,
            sleep=sleep,
            clock=lambda: clock[0],
            rng=random.Random(1),
        )
    return flaky, slept


def test_the_default_policy_keeps_retrying_for_at_least_a_minute() -> None:
    _, slept = retry_an_outage(RetryPolicy())

    assert 60 <= sum(slept) <= RetryPolicy().deadline_s
    assert max(slept) <= RetryPolicy().max_delay_s
    assert slept[:3] == sorted(slept[:3])


def test_a_policy_until_a_deadline_retries_past_the_attempt_limit_and_stops_at_the_deadline() -> None:
    flaky, slept = retry_an_outage(RetryPolicy().until(1000.0 + 300.0), start=1000.0)

    assert flaky.calls > RetryPolicy().max_attempts
    assert 300 - RetryPolicy().max_delay_s <= sum(slept) <= 300


def test_a_store_retrying_until_a_deadline_keeps_the_original_policy(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")

    bounded = store.retrying_until(123.0)

    assert (bounded.retry.give_up_at, store.retry) == (123.0, RetryPolicy())
    assert bounded.root == store.root


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


def test_other_local_ranks_wait_for_rank_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_model(tmp_path / "src" / "tiny")
    uri = f"file://{tmp_path}/src/tiny"
    moved, hook = counting()
    results: dict[str, Path] = {}
    waiting = threading.Event()
    wait_for_marker = node_cache._wait_for_marker

    def signalled_wait(*args: Any, **kwargs: Any) -> None:
        waiting.set()
        wait_for_marker(*args, **kwargs)

    monkeypatch.setattr(node_cache, "_wait_for_marker", signalled_wait)
    waiter = threading.Thread(
        target=lambda: results.setdefault(
            "rank1", pull_model(uri, tmp_path / "cache", local_rank=1, on_bytes=hook, wait_timeout_s=30)
        )
    )
    waiter.start()
    assert waiting.wait(10), "local rank 1 never started waiting"
    # Rank 1 waits for rank 0's marker and has fetched nothing itself.
    assert waiter.is_alive()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and not p.name.endswith(".lock")]

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

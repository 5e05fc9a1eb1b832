"""Storage against a real SeaweedFS: ranged, verified, cached and resumable pulls; one download per node; outages."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from boto3.s3.transfer import TransferConfig

from finetune_trainer.config import StorageConfig
from finetune_trainer.storage import StorageError, TransferSettings, open_store, pull_model, uris
from localcluster.seaweedfs import SeaweedFS

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture
def s3_env(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> StorageConfig:
    """Credentials (and endpoint) in the environment, as a pod gets them; path-style for SeaweedFS."""
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    return StorageConfig(forcePathStyle=True)


@pytest.fixture
def get_requests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The Range of every GetObject the trainer's stores send (observed through botocore's event hooks)."""
    seen: list[str] = []
    original = uris.make_s3_client

    def observed(*args: Any, **kwargs: Any) -> Any:
        client = original(*args, **kwargs)

        def record(params: dict[str, Any], **_: Any) -> None:
            seen.append(str(params.get("Range", "")))

        client.meta.events.register("provide-client-params.s3.GetObject", record)
        return client

    monkeypatch.setattr(uris, "make_s3_client", observed)
    return seen


def counter() -> tuple[dict[str, int], Callable[[str, int], None]]:
    moved: dict[str, int] = {}
    lock = threading.Lock()

    def hook(direction: str, n: int) -> None:
        with lock:
            moved[direction] = moved.get(direction, 0) + n

    return moved, hook


def crash_after(limit: int) -> Callable[[str, int], None]:
    """A byte hook that fails the transfer once more than ``limit`` bytes have moved, as a crashed process would."""
    received = [0]

    def hook(direction: str, n: int) -> None:
        received[0] += n
        if received[0] > limit:
            raise RuntimeError("simulated crash")

    return hook


def random_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plain_client(seaweedfs: SeaweedFS) -> Any:
    """An SDK client that adds no checksums, so objects keep only their MD5 ETags."""
    return seaweedfs.client(request_checksum_calculation="when_required")


def test_a_50_mb_model_is_pulled_in_ranges_verified_and_then_served_from_the_cache(
    seaweedfs: SeaweedFS,
    s3_bucket: str,
    s3_env: StorageConfig,
    get_requests: list[str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    uri = f"s3://{s3_bucket}/models/tiny"
    weights = tmp_path / "model.safetensors"
    digest = random_file(weights, 50 * MiB)
    open_store(uri, s3_env).upload_file(weights, "model.safetensors")  # multipart, CRC32 per part
    # Objects without checksums exercise the MD5 ETag checks: one single-part, one multipart.
    extra = tmp_path / "extra.bin"
    extra_digest = random_file(extra, 20 * MiB)
    plain = plain_client(seaweedfs)
    plain.upload_file(
        str(extra), s3_bucket, "models/tiny/extra.bin", Config=TransferConfig(multipart_chunksize=8 * MiB)
    )
    plain.put_object(Bucket=s3_bucket, Key="models/tiny/config.json", Body=b'{"model_type": "gpt2"}')
    moved, hook = counter()

    with caplog.at_level(logging.DEBUG, logger="finetune_trainer.storage"):
        folder = pull_model(uri, tmp_path / "cache", s3_env, local_rank=0, on_bytes=hook)
    first_gets = list(get_requests)
    first_bytes = dict(moved)
    again = pull_model(uri, tmp_path / "cache", s3_env, local_rank=0, on_bytes=hook)

    assert sha256_of(folder / "model.safetensors") == digest
    assert sha256_of(folder / "extra.bin") == extra_digest
    assert (folder / "config.json").read_bytes() == b'{"model_type": "gpt2"}'
    weight_ranges = [r for r in first_gets if r.startswith("bytes=")]
    assert len(weight_ranges) >= 2 + 6  # the 50 MB file alone takes several 8 MiB+ ranges
    assert first_bytes == {"download": 50 * MiB + 20 * MiB + len(b'{"model_type": "gpt2"}')}
    checks = {
        m.split(": verifying")[0].rsplit("/", 1)[1]: m
        for m in (r.getMessage() for r in caplog.records)
        if ": verifying" in m
    }
    assert "by its CRC32 checksum" in checks["model.safetensors"] and checks["model.safetensors"].endswith("-4")
    assert "by its ETag (MD5)" in checks["extra.bin"] and checks["extra.bin"].endswith("-3")
    assert "by its ETag (MD5)" in checks["config.json"] and "-" not in checks["config.json"].rsplit(" ", 1)[1]
    assert again == folder
    assert get_requests == first_gets, "the second pull sent GETs"
    assert moved == first_bytes


def test_a_wrong_sha256_fails_permanently_and_leaves_no_file(
    seaweedfs: SeaweedFS, s3_bucket: str, s3_env: StorageConfig, tmp_path: Path
) -> None:
    uri = f"s3://{s3_bucket}/models/tiny"
    seaweedfs.client().put_object(Bucket=s3_bucket, Key="models/tiny/model.safetensors", Body=b"x" * 1000)

    with pytest.raises(StorageError) as error:
        pull_model(uri, tmp_path / "cache", s3_env, local_rank=0, sha256="0" * 64)

    assert error.value.permanent
    assert str(error.value).startswith(f"{uri}/model.safetensors: downloaded data does not match its sha256")
    assert not list((tmp_path / "cache" / "models").glob("*/model.safetensors*"))


def test_an_interrupted_pull_resumes_with_only_the_missing_ranges(
    seaweedfs: SeaweedFS, s3_bucket: str, s3_env: StorageConfig, tmp_path: Path
) -> None:
    uri = f"s3://{s3_bucket}/models/tiny"
    weights = tmp_path / "model.safetensors"
    digest = random_file(weights, 50 * MiB)
    seaweedfs.client().upload_file(str(weights), s3_bucket, "models/tiny/model.safetensors")
    transfer = TransferSettings(concurrency=2, min_range_size=8 * MiB, max_range_size=8 * MiB)

    with pytest.raises(RuntimeError, match="simulated crash"):
        pull_model(uri, tmp_path / "cache", s3_env, local_rank=0, on_bytes=crash_after(20 * MiB), transfer=transfer)
    (journal_path,) = (tmp_path / "cache" / "models").glob("*/model.safetensors.partial.json")
    journal = json.loads(journal_path.read_text())
    done_bytes = sum(min(journal["rangeSize"], 50 * MiB - i * journal["rangeSize"]) for i in journal["done"])
    moved, hook = counter()

    # Default settings this time (as on another node): the journal's range size is kept.
    folder = pull_model(uri, tmp_path / "cache", s3_env, local_rank=0, on_bytes=hook)

    assert journal["rangeSize"] == 8 * MiB and 2 <= len(journal["done"]) < 7
    assert moved == {"download": 50 * MiB - done_bytes}
    assert sha256_of(folder / "model.safetensors") == digest
    assert not journal_path.exists()


def test_a_resumed_range_corrupted_on_disk_is_caught_and_the_object_downloaded_again(
    seaweedfs: SeaweedFS, s3_bucket: str, s3_env: StorageConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uri = f"s3://{s3_bucket}/models/tiny"
    weights = tmp_path / "model.safetensors"
    digest = random_file(weights, 24 * MiB)
    seaweedfs.client().upload_file(str(weights), s3_bucket, "models/tiny/model.safetensors")  # CRC32, 8 MiB parts
    transfer = TransferSettings(concurrency=1, min_range_size=8 * MiB, max_range_size=8 * MiB)

    with pytest.raises(RuntimeError, match="simulated crash"):
        pull_model(uri, tmp_path / "cache", s3_env, local_rank=0, on_bytes=crash_after(10 * MiB), transfer=transfer)
    (partial,) = (tmp_path / "cache" / "models").glob("*/model.safetensors.partial")
    assert json.loads(partial.with_name(partial.name + ".json").read_text())["done"] == [0]
    with partial.open("r+b") as handle:  # the journaled first range rots on disk
        handle.seek(12345)
        handle.write(b"\xff" if handle.read(1) != b"\xff" else b"\x00")
    moved, hook = counter()

    with caplog.at_level(logging.WARNING, logger="finetune_trainer.storage"):
        folder = pull_model(uri, tmp_path / "cache", s3_env, local_rank=0, on_bytes=hook, transfer=transfer)

    assert "does not match its CRC32 checksum" in caplog.text and "downloading it again" in caplog.text
    assert moved == {"download": 16 * MiB + 24 * MiB}  # the two missing ranges, then the whole object again
    assert sha256_of(folder / "model.safetensors") == digest


RANK_SCRIPT = """
import json, sys
from finetune_trainer.config import StorageConfig
from finetune_trainer.storage import pull_model
moved = {}
def hook(direction, n):
    moved[direction] = moved.get(direction, 0) + n
path = pull_model(sys.argv[1], sys.argv[2], StorageConfig(forcePathStyle=True), local_rank=int(sys.argv[3]),
                  on_bytes=hook, wait_timeout_s=120)
print(json.dumps({"path": str(path), "moved": moved}))
"""


def test_two_local_ranks_pulling_at_once_download_once(seaweedfs: SeaweedFS, s3_bucket: str, tmp_path: Path) -> None:
    uri = f"s3://{s3_bucket}/models/tiny"
    weights = tmp_path / "model.safetensors"
    digest = random_file(weights, 30 * MiB)
    seaweedfs.client().upload_file(str(weights), s3_bucket, "models/tiny/model.safetensors")
    env = {**os.environ, **seaweedfs.env()}
    cache = tmp_path / "cache"

    def start(rank: int) -> subprocess.Popen[str]:
        command = [sys.executable, "-c", RANK_SCRIPT, uri, str(cache), str(rank)]
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # Rank 1 starts first: it must wait for rank 0 rather than download.
    ranks = [start(1), start(0)]
    outputs = [rank.communicate(timeout=180) for rank in ranks]

    assert [rank.returncode for rank in ranks] == [0, 0], [err[-2000:] for _, err in outputs]
    rank1, rank0 = (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs)
    assert rank0["path"] == rank1["path"]
    assert rank0["moved"] == {"download": 30 * MiB}
    assert rank1["moved"] == {}
    assert sha256_of(Path(rank0["path"]) / "model.safetensors") == digest


def test_a_missing_bucket_is_a_permanent_error_naming_the_uri(s3_env: StorageConfig, tmp_path: Path) -> None:
    uri = "s3://no-such-bucket-for-finetune/models/tiny"
    started = time.monotonic()

    with pytest.raises(StorageError) as error:
        pull_model(uri, tmp_path / "cache", s3_env, local_rank=0)

    assert error.value.permanent
    assert str(error.value).startswith(f"{uri}: list failed: NoSuchBucket")
    assert time.monotonic() - started < 10


def test_refused_credentials_are_a_permanent_error_naming_the_uri(
    seaweedfs: SeaweedFS, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    config = StorageConfig(endpoint=seaweedfs.endpoint_url, region="us-east-1", forcePathStyle=True)
    uri = f"s3://{s3_bucket}/models/tiny"

    with pytest.raises(StorageError) as error:
        pull_model(uri, tmp_path / "cache", config, local_rank=0)

    assert error.value.permanent
    assert str(error.value).startswith(f"{uri}: list failed: ")
    assert any(code in str(error.value) for code in ("SignatureDoesNotMatch", "AccessDenied", "InvalidAccessKeyId"))


def test_an_upload_survives_seaweedfs_stopping_for_ten_seconds(
    seaweedfs: SeaweedFS, s3_bucket: str, s3_env: StorageConfig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "checkpoint.bin"
    digest = random_file(source, 40 * MiB)
    outage: list[threading.Thread] = []
    stopped_at: list[float] = []

    def restart_in_ten_seconds() -> None:
        time.sleep(10)
        seaweedfs.start()

    def stop_once(direction: str, n: int) -> None:
        # The first finished part stops the server; the other parts and the completion meet the outage.
        if not outage:
            thread = threading.Thread(target=restart_in_ten_seconds)
            outage.append(thread)
            seaweedfs.stop()
            stopped_at.append(time.monotonic())
            thread.start()

    transfer = TransferSettings(multipart_threshold=8 * MiB, upload_part_size=8 * MiB, upload_concurrency=2)
    store = open_store(f"s3://{s3_bucket}/run", s3_env, on_bytes=stop_once, transfer=transfer)
    try:
        with caplog.at_level(logging.WARNING, logger="finetune_trainer.storage"):
            info = store.upload_file(source, "checkpoints/step-00000001/weights.bin")
        finished_at = time.monotonic()
    finally:
        for thread in outage:
            thread.join()
        if not seaweedfs.running:
            seaweedfs.start()

    assert outage and finished_at - stopped_at[0] >= 10
    assert any("retry" in r.getMessage() for r in caplog.records)
    head = seaweedfs.client().head_object(Bucket=s3_bucket, Key="run/checkpoints/step-00000001/weights.bin")
    assert head["ContentLength"] == info.size == 40 * MiB
    body = seaweedfs.client().get_object(Bucket=s3_bucket, Key="run/checkpoints/step-00000001/weights.bin")["Body"]
    assert hashlib.sha256(body.read()).hexdigest() == digest

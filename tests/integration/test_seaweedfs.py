"""SeaweedFS as the local S3: objects round-trip, large uploads, ranged reads, signed access, restarts."""

from __future__ import annotations

import hashlib
import os
from io import BytesIO

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError, EndpointConnectionError

from localcluster.seaweedfs import SeaweedFS

pytestmark = pytest.mark.integration


def test_put_then_get_returns_the_same_bytes(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    s3 = seaweedfs.client()
    s3.put_object(Bucket=s3_bucket, Key="data/hello.txt", Body=b"hello, fine-tuning\n")

    body = s3.get_object(Bucket=s3_bucket, Key="data/hello.txt")["Body"].read()
    listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix="data/")

    assert body == b"hello, fine-tuning\n"
    assert [item["Key"] for item in listed["Contents"]] == ["data/hello.txt"]


def test_multipart_upload_of_20_mb_reads_back_intact(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    payload = os.urandom(20 * 1024 * 1024)
    s3 = seaweedfs.client()
    parts = TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024)

    s3.upload_fileobj(BytesIO(payload), s3_bucket, "model/weights.bin", Config=parts)
    head = s3.head_object(Bucket=s3_bucket, Key="model/weights.bin")
    downloaded = s3.get_object(Bucket=s3_bucket, Key="model/weights.bin")["Body"].read()

    assert head["ContentLength"] == len(payload)
    # A multipart ETag is "<md5 of part md5s>-<part count>": four 5 MiB parts.
    assert head["ETag"].strip('"').endswith("-4")
    assert hashlib.sha256(downloaded).digest() == hashlib.sha256(payload).digest()


def test_ranged_get_returns_only_the_range(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    payload = bytes(range(256)) * 4096
    s3 = seaweedfs.client()
    s3.put_object(Bucket=s3_bucket, Key="blob", Body=payload)

    ranged = s3.get_object(Bucket=s3_bucket, Key="blob", Range="bytes=1000-1999")

    assert ranged["ContentRange"] == f"bytes 1000-1999/{len(payload)}"
    assert ranged["Body"].read() == payload[1000:2000]


def test_a_wrong_secret_is_refused(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    intruder = boto3.client(
        "s3",
        endpoint_url=seaweedfs.endpoint_url,
        aws_access_key_id=seaweedfs.access_key,
        aws_secret_access_key="not-the-secret",
        region_name="us-east-1",
    )

    with pytest.raises(ClientError) as refused:
        intruder.list_objects_v2(Bucket=s3_bucket)

    assert refused.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "AccessDenied"}


def test_env_lets_a_default_client_reach_the_server(
    seaweedfs: SeaweedFS, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    plain = boto3.session.Session().client("s3")

    plain.put_object(Bucket=s3_bucket, Key="from-env", Body=b"x")

    assert seaweedfs.client().get_object(Bucket=s3_bucket, Key="from-env")["Body"].read() == b"x"


def test_restart_keeps_endpoint_and_data(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    endpoint = seaweedfs.endpoint_url
    seaweedfs.client().put_object(Bucket=s3_bucket, Key="survives", Body=b"still here")

    seaweedfs.restart()

    assert seaweedfs.endpoint_url == endpoint
    assert seaweedfs.client().get_object(Bucket=s3_bucket, Key="survives")["Body"].read() == b"still here"


def test_a_stopped_server_refuses_connections_until_started(seaweedfs: SeaweedFS, s3_bucket: str) -> None:
    quick = seaweedfs.client(connect_timeout=1, retries={"max_attempts": 1})
    seaweedfs.stop()
    try:
        with pytest.raises(EndpointConnectionError):
            quick.list_objects_v2(Bucket=s3_bucket)
    finally:
        seaweedfs.start()

    assert quick.list_objects_v2(Bucket=s3_bucket)["KeyCount"] == 0

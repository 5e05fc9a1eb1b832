"""Pytest fixtures for the local servers (SeaweedFS S3, ...); registered by tests/conftest.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from localcluster.seaweedfs import SeaweedFS


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS S3 server for the whole session; tests that stop it must start it again."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    with server:
        yield server


@pytest.fixture
def s3_bucket(seaweedfs: SeaweedFS) -> str:
    """A fresh, uniquely named, empty bucket on the session's SeaweedFS."""
    if not seaweedfs.running:
        seaweedfs.start()
    return seaweedfs.create_bucket(f"test-{uuid.uuid4().hex[:16]}")

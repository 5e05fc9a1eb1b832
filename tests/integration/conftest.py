"""Shared fixtures of the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from trainer_helpers import TrainerSetup, make_setup

from localcluster.seaweedfs import SeaweedFS


@pytest.fixture
def setup(
    seaweedfs: SeaweedFS, s3_bucket: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TrainerSetup]:
    """A fresh bucket holding the tiny model under model/ and the chat data under data/, for trainer runs."""
    prepared = make_setup(seaweedfs, s3_bucket, tmp_path, tmp_path_factory)
    yield prepared
    prepared.close()

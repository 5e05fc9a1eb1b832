"""Pytest fixtures for the local servers (SeaweedFS S3, MLflow, the operator, the whole local cluster) and the one
way tests wait for something to happen; registered by tests/conftest.py."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from localcluster.cluster import LocalCluster
from localcluster.mlflow import MlflowServer
from localcluster.operator_process import OperatorProcess
from localcluster.seaweedfs import SeaweedFS

T = TypeVar("T")

# The image the ``operator`` fixture's pods name; nothing pulls it (there is no kubelet behind that fixture).
TEST_TRAINER_IMAGE = "trainer:it"


def wait_until(probe: Callable[[], T], timeout: float = 30.0, what: str = "condition", interval: float = 0.1) -> T:
    """Poll ``probe`` until it returns something truthy and return that; fail naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last value: {value!r}")
        time.sleep(interval)


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


@pytest.fixture(scope="session")
def mlflow_server(seaweedfs: SeaweedFS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real MLflow tracking server for the session (SQLite, artifacts in the session's SeaweedFS); tests use
    experiments of their own, and tests that stop it start it again (it keeps its port)."""
    if not seaweedfs.running:
        seaweedfs.start()
    with MlflowServer(tmp_path_factory.mktemp("mlflow"), seaweedfs) as server:
        yield server


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """The whole local cluster (API server, kubelet, SeaweedFS, Prometheus when installed, the real operator),
    one per test module; the operator resyncs every second so tests see transitions quickly."""
    with LocalCluster(tmp_path_factory.mktemp("cluster"), operator_args=["--resync-seconds", "1"]) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def operator(operator_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """The real operator for one test module, cluster-wide with the kubeconfig of the module's own
    ``operator_kubeconfig`` fixture; it resyncs and reads progress every second so tests see transitions quickly,
    and logs at DEBUG so ``OperatorProcess.reconciles`` can count each job's reconciles. Tests may stop and start
    it; it is always stopped at the end."""
    process = OperatorProcess(
        operator_kubeconfig,
        tmp_path_factory.mktemp("operator") / "operator.log",
        args=["--resync-seconds", "1", "--progress-seconds", "1", "--log-level", "DEBUG"],
        env={"FINETUNE_TRAINER_IMAGE": TEST_TRAINER_IMAGE},
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()

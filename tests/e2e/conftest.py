"""End-to-end set-up: one local cluster per module with a tiny pre-trained base model and chat data in S3, and a
user's shell (ftj on PATH, kubeconfig, S3 credentials) and Python client on it."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import pytest

from finetune_client import Client
from localcluster.cluster import REPO, LocalCluster

DATASET = REPO / "examples" / "data" / "customer-support.jsonl"


@pytest.fixture(scope="session")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 (2 layers, 64 dims) with a locally trained tokenizer, briefly pre-trained on generic text."""
    from finetune_trainer.testing import build_tiny_model, generic_corpus, pretrain_briefly

    out = tmp_path_factory.mktemp("base-model")
    corpus = generic_corpus(1500, seed=0)
    chat_text = [m["content"] for line in DATASET.read_text().splitlines() for m in json.loads(line)["messages"]]
    build_tiny_model(out, texts=corpus + chat_text, vocab_size=768, n_positions=256)
    pretrain_briefly(out, corpus, steps=30, seq_length=64, batch_size=8)
    return out


@pytest.fixture(scope="module")
def cluster(local_cluster: LocalCluster, base_model: Path) -> LocalCluster:
    """The local cluster with the base model in s3://models/tiny-gpt2/ and the chat data in s3://datasets/."""
    client = local_cluster.s3.client()
    for bucket in ("models", "datasets", "finetune-output"):
        local_cluster.s3.create_bucket(bucket)
    for path in base_model.iterdir():
        if path.is_file():
            client.upload_file(str(path), "models", f"tiny-gpt2/{path.name}")
    client.upload_file(str(DATASET), "datasets", "customer-support/customer-support.jsonl")
    return local_cluster


@pytest.fixture(scope="module")
def ftj_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder holding ``ftj`` and ``kubectl-ftj``: the installed console scripts beside this Python when they
    exist, else shims running ``python -m finetune_client`` (a checkout whose virtualenv predates the scripts)."""
    installed = Path(sys.executable).parent
    if (installed / "ftj").exists() and (installed / "kubectl-ftj").exists():
        return installed
    folder = tmp_path_factory.mktemp("ftj-bin")
    for name in ("ftj", "kubectl-ftj"):
        shim = folder / name
        shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m finetune_client "$@"\n')
        shim.chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def user_env(cluster: LocalCluster, ftj_bin: Path) -> dict[str, str]:
    """A user's shell on the local cluster: the admin kubeconfig, S3 credentials and endpoint, ftj and kubectl."""
    assert cluster.control_plane is not None
    path = os.pathsep.join([str(ftj_bin), str(cluster.control_plane.kubectl_path.parent), os.environ["PATH"]])
    return {**os.environ, **cluster.s3.env(), "KUBECONFIG": str(cluster.kubeconfig), "PATH": path}


@pytest.fixture
def client(cluster: LocalCluster, user_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Client:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.setenv(key, user_env[key])
    return Client(kubeconfig=cluster.kubeconfig)

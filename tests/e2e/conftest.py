"""End-to-end set-up: one local cluster per module with a tiny pre-trained base model and chat data in S3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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

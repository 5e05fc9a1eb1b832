"""Data preparation against real storage and real processes: the dataset.cache copy in SeaweedFS serves another
node, and a preparation killed with SIGKILL (workers and all) leaves nothing that loads."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import tiny_assets

from finetune_trainer.config import TrainerConfig, config_from_dict
from finetune_trainer.data_store import build_datasets, preparation_key
from finetune_trainer.testing import toy_chat_rows
from localcluster.pytest_plugin import wait_until
from localcluster.seaweedfs import SeaweedFS

pytestmark = pytest.mark.integration


def node_config(node: Path, cache: str | None = None) -> dict[str, Any]:
    return {
        "model": {"uri": "file:///unused"},
        "dataset": {"uri": "file:///unused/train.jsonl", "format": "chat", **({"cache": cache} if cache else {})},
        "output": {"uri": "file:///unused-out"},
        "training": {"maxSteps": 1, "maxSeqLength": 128, "packing": True},
        "storage": {"forcePathStyle": True},
        "local": {"cacheDir": str(node / "cache"), "workDir": str(node / "work")},
    }


def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_assets(tmp_path_factory) / "model")


def write_chats(path: Path, count: int) -> Path:
    with path.open("w") as handle:
        for start in range(0, count, 10_000):
            handle.write("".join(json.dumps(r) + "\n" for r in toy_chat_rows(min(10_000, count - start), seed=start)))
    return path


def test_a_second_node_fetches_the_prepared_data_from_dataset_cache(
    seaweedfs: SeaweedFS, s3_bucket: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    files = [write_chats(tmp_path / "train.jsonl", 300)]
    cache = f"s3://{s3_bucket}/prepared-cache"
    tok = tokenizer(tmp_path_factory)
    first_config: TrainerConfig = config_from_dict(node_config(tmp_path / "node0", cache))

    with caplog.at_level(logging.INFO, logger="finetune_trainer"):
        first = build_datasets(first_config, tok, train_files=files)
    key, _ = preparation_key(first_config, tok, files, None)
    stored = {o["Key"] for o in seaweedfs.client().list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert f"prepared-cache/{key}/meta.json" in stored and f"prepared-cache/{key}/tokens.i32" in stored
    assert any(r.name.endswith("data_prepare") and r.getMessage().startswith("prepared ") for r in caplog.records)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="finetune_trainer"):
        second = build_datasets(config_from_dict(node_config(tmp_path / "node1", cache)), tok, train_files=files)

    assert f"prepared data {key}: fetched from" in caplog.text
    assert not [r for r in caplog.records if r.name.endswith("data_prepare")]
    assert second.stats == first.stats
    assert [second.train[i]["input_ids"].tolist() for i in range(len(second.train))] == [
        first.train[i]["input_ids"].tolist() for i in range(len(first.train))
    ]


PREPARE = """
import json, sys
from transformers import AutoTokenizer
from finetune_trainer.config import config_from_dict
from finetune_trainer.data_store import build_datasets
config, model, data = sys.argv[1:]
build_datasets(config_from_dict(json.loads(config)), AutoTokenizer.from_pretrained(model), train_files=[data])
"""


def test_a_preparation_killed_with_sigkill_leaves_nothing_that_loads(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Big enough for a pool of worker processes and a few seconds of work on two cores.
    files = [write_chats(tmp_path / "train.jsonl", 40_000)]
    config = node_config(tmp_path / "node")
    tok = tokenizer(tmp_path_factory)
    key, _ = preparation_key(config_from_dict(config), tok, files, None)
    prepared = tmp_path / "node" / "cache" / "prepared"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with (tmp_path / "prepare.log").open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", PREPARE, json.dumps(config), str(tiny_assets(tmp_path_factory) / "model"),
             str(files[0])], env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        def tokens_written() -> bool:
            return any(p.stat().st_size > 0 for p in prepared.glob(f".{key}.*/tokens.i32"))

        wait_until(lambda: tokens_written() or process.poll() is not None, timeout=120, what="tokens being written")
        assert process.poll() is None, (tmp_path / "prepare.log").read_text()[-3000:]
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    assert not (prepared / key).exists()
    assert list(prepared.glob(f".{key}.*")), "the killed preparation's temporary folder is what it left"
    again = build_datasets(config_from_dict(config), tok, train_files=files)
    assert again.stats.rows == 40_000
    assert (prepared / key / "meta.json").is_file() and not list(prepared.glob(f".{key}.*"))

"""Prepared data equals what the in-memory pipeline produced, item for item, on fixtures of every format.

``fixtures/data_golden.json`` holds the train and eval items (input ids, labels, position ids) and the statistics
that the in-memory pipeline (read every row into lists on each rank, split, pack) gave for each case below, with
the tokenizer the ``tokenizer`` fixture trains (tokenizer training is deterministic). The prepared, memory-mapped
form must give exactly the same items in the same order: same masks, packing boundaries, eval split and skips.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import trainer_factories

from finetune_trainer import data_prepare
from finetune_trainer.config import TrainerConfig
from finetune_trainer.data import DEFAULT_CHAT_TEMPLATE
from finetune_trainer.data_store import build_datasets
from finetune_trainer.testing import build_tiny_model, generic_corpus, toy_chat_rows

GOLDEN = Path(__file__).parent / "fixtures" / "data_golden.json"


def text_rows(n: int, seed: int) -> list[Any]:
    return [{"text": line} for line in generic_corpus(n, seed=seed)]


def prompt_rows(n: int, seed: int) -> list[Any]:
    rng = random.Random(seed)
    lines = generic_corpus(2 * n, seed=seed)
    return [{"prompt": lines[2 * i] if rng.random() > 0.1 else "", "completion": lines[2 * i + 1]} for i in range(n)]


def with_malformed(rows: list[Any]) -> list[Any]:
    """Rows with three malformed ones among them: bad JSON, a row that is not an object, no assistant turn."""
    rows = list(rows)
    rows.insert(3, "{not json")
    rows.insert(7, [1, 2])
    rows.insert(11, {"messages": [{"role": "user", "content": "hello"}]})
    return rows


# Each case: the rows of the training file (and of an eval file), how they are stored, and the settings.
CASES: dict[str, dict[str, Any]] = {
    "text": {"rows": text_rows(40, 1), "dataset": {"format": "text", "evalSplit": 0.2}},
    "text-packed": {"rows": text_rows(40, 2), "dataset": {"format": "text"},
                    "training": {"packing": True, "maxSeqLength": 64}},
    "prompt-completion-truncated": {"rows": prompt_rows(30, 3), "dataset": {"format": "promptCompletion"},
                                    "training": {"maxSeqLength": 16}},
    "chat-default-template-packed": {"rows": toy_chat_rows(40, seed=4), "dataset": {"format": "chat"},
                                     "training": {"packing": True, "maxSeqLength": 96}},
    "chat-tokenizer-template": {"rows": toy_chat_rows(30, seed=5), "dataset": {"format": "chat"},
                                "template": DEFAULT_CHAT_TEMPLATE.replace("<|", "[").replace("|>", "]")},
    "chat-eval-file-packed": {"rows": toy_chat_rows(30, seed=6), "eval_rows": toy_chat_rows(8, seed=7),
                              "dataset": {"format": "chat"}, "training": {"packing": True, "maxSeqLength": 128}},
    "chat-malformed-skipped": {"rows": with_malformed(toy_chat_rows(30, seed=8)),
                               "dataset": {"format": "chat", "maxMalformedRows": 3}},
    "text-parquet": {"rows": text_rows(30, 9), "store": "parquet", "dataset": {"format": "text", "evalSplit": 0.1}},
    "text-json-array": {"rows": text_rows(20, 10), "store": "array", "dataset": {"format": "text"},
                        "training": {"packing": True, "maxSeqLength": 48}},
}


def write_rows(path: Path, rows: list[Any], store: str) -> Path:
    if store == "parquet":
        path = path.with_suffix(".parquet")
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
    elif store == "array":
        path = path.with_suffix(".json")
        path.write_text("[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n")
    else:
        path = path.with_suffix(".jsonl")
        path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def case_config(case: dict[str, Any], cache_dir: Path) -> TrainerConfig:
    training = {"maxSteps": 1, "maxSeqLength": 64, "seed": 11, **case.get("training", {})}
    return trainer_factories.make_config(
        dataset=case["dataset"], training=training, local={"cacheDir": str(cache_dir), "workDir": str(cache_dir)}
    )


def items(dataset: Any) -> list[dict[str, list[int]]]:
    if dataset is None:
        return []
    return [{key: [int(v) for v in value] for key, value in dataset[i].items()} for i in range(len(dataset))]


def prepare(case_name: str, tokenizer: Any, work: Path) -> dict[str, Any]:
    case = CASES[case_name]
    if "template" in case:
        tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
        tokenizer.chat_template = case["template"]
    store = case.get("store", "jsonl")
    train_files = [write_rows(work / "train", case["rows"], store)]
    eval_files = [write_rows(work / "eval", case["eval_rows"], store)] if "eval_rows" in case else None
    prepared = build_datasets(
        case_config(case, work / "cache"), tokenizer, train_files=train_files, eval_files=eval_files
    )
    return {"train": items(prepared.train), "eval": items(prepared.eval), "stats": prepared.stats.to_dict()}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts = generic_corpus(300) + [m["content"] for row in toy_chat_rows(200) for m in row["messages"]]
    yield AutoTokenizer.from_pretrained(
        build_tiny_model(tmp_path_factory.mktemp("tiny"), texts=texts, n_positions=128)
    )


def test_the_golden_file_covers_every_case() -> None:
    golden = json.loads(GOLDEN.read_text())
    assert sorted(golden) == sorted(CASES)
    assert all(golden[name]["train"] for name in CASES)


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_prepared_items_equal_the_in_memory_pipeline(case_name: str, tokenizer: Any, tmp_path: Path) -> None:
    expected = json.loads(GOLDEN.read_text())[case_name]
    assert prepare(case_name, tokenizer, tmp_path) == expected


@pytest.mark.parametrize("case_name", ["chat-malformed-skipped", "text-parquet"])
def test_many_chunks_on_a_pool_of_processes_give_the_same_items(
    case_name: str, tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Chunks of a few rows (JSON lines by bytes, Parquet by row groups of 7) on two processes: rows keep their
    order and malformed rows spend the budget in row order."""
    monkeypatch.setattr(data_prepare, "CHUNK_BYTES", 700)
    monkeypatch.setattr(data_prepare, "POOL_MIN_BYTES", 0)
    monkeypatch.setattr(data_prepare, "available_cpus", lambda: 2)
    case = CASES[case_name]
    probe = write_rows(tmp_path / "probe", case["rows"], case.get("store", "jsonl"))
    assert len(data_prepare.plan_chunks([probe], ["text"])) >= 3
    expected = json.loads(GOLDEN.read_text())[case_name]
    with caplog.at_level(logging.INFO, logger="finetune_trainer.data_prepare"):
        assert prepare(case_name, tokenizer, tmp_path) == expected
    assert "with 2 processes" in caplog.text

"""Prepared data on the node: reused when the key matches, prepared again when anything in the key changes, never
loaded half-written, evicted by size, and its progress reported."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trainer_factories

from finetune_trainer import data_prepare, data_store
from finetune_trainer.config import TrainerConfig
from finetune_trainer.data_store import build_datasets, preparation_key
from finetune_trainer.testing import build_tiny_model, generic_corpus, toy_chat_rows


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts = generic_corpus(300) + [m["content"] for row in toy_chat_rows(200) for m in row["messages"]]
    yield AutoTokenizer.from_pretrained(build_tiny_model(tmp_path_factory.mktemp("tiny"), texts=texts))


def make_config(tmp_path: Path, **training: Any) -> TrainerConfig:
    return trainer_factories.make_config(
        dataset={"format": "chat"},
        training={"maxSteps": 1, "maxSeqLength": 96, **training},
        local={"cacheDir": str(tmp_path / "cache"), "workDir": str(tmp_path / "work")},
    )


def write_chats(path: Path, count: int = 40, seed: int = 3) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in toy_chat_rows(count, seed=seed)))
    return path


def prepared_folders(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "cache" / "prepared").iterdir() if p.is_dir())


def test_a_second_start_reuses_the_prepared_data(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    files = [write_chats(tmp_path / "train.jsonl")]
    first = build_datasets(make_config(tmp_path), tokenizer, train_files=files)

    def no_second_preparation(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("prepared again")

    monkeypatch.setattr(data_store, "prepare", no_second_preparation)
    with caplog.at_level(logging.INFO, logger="finetune_trainer.data_store"):
        again = build_datasets(make_config(tmp_path), tokenizer, train_files=files)

    assert "reused from" in caplog.text
    assert len(prepared_folders(tmp_path)) == 1
    assert again.stats == first.stats
    assert [again.train[i]["input_ids"].tolist() for i in range(len(again.train))] == [
        first.train[i]["input_ids"].tolist() for i in range(len(first.train))
    ]


@pytest.mark.parametrize(
    "change",
    ["a data file", "the tokenizer's chat template", "maxSeqLength", "packing", "the seed of the eval split"],
)
def test_the_key_changes_with_the_data_the_tokenizer_and_the_settings(
    tokenizer: Any, tmp_path: Path, change: str
) -> None:
    files = [write_chats(tmp_path / "a.jsonl"), write_chats(tmp_path / "b.jsonl", seed=4)]
    config = make_config(tmp_path)
    key, _ = preparation_key(config, tokenizer, files, None)
    other_tokenizer, other_config = tokenizer, config
    if change == "a data file":
        write_chats(files[1], seed=5)
    elif change == "the tokenizer's chat template":
        other_tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
        other_tokenizer.chat_template = "{{ messages[0]['content'] }}"
    elif change == "maxSeqLength":
        other_config = make_config(tmp_path, maxSeqLength=128)
    elif change == "packing":
        other_config = make_config(tmp_path, packing=True)
    else:
        other_config = make_config(tmp_path, seed=7)
    assert preparation_key(other_config, other_tokenizer, files, None)[0] != key


def test_the_key_is_stable_for_the_same_inputs(tokenizer: Any, tmp_path: Path) -> None:
    files = [write_chats(tmp_path / "a.jsonl")]
    copy = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    assert preparation_key(make_config(tmp_path), tokenizer, files, None)[0] == preparation_key(
        make_config(tmp_path / "elsewhere"), copy, files, None
    )[0]


def test_a_failed_preparation_leaves_nothing_that_loads_and_the_next_start_prepares(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [write_chats(tmp_path / "train.jsonl")]
    real = data_prepare.tokenize_chunks

    def dies_after_one_chunk(*args: Any, **kwargs: Any) -> Iterator[Any]:
        yield next(iter(real(*args, **kwargs)))
        raise KeyboardInterrupt("killed mid-preparation")

    monkeypatch.setattr(data_prepare, "tokenize_chunks", dies_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        build_datasets(make_config(tmp_path), tokenizer, train_files=files)
    assert prepared_folders(tmp_path) == []

    monkeypatch.setattr(data_prepare, "tokenize_chunks", real)
    prepared = build_datasets(make_config(tmp_path), tokenizer, train_files=files)
    assert len(prepared.train) + len(prepared.eval or []) == 40
    assert len(prepared_folders(tmp_path)) == 1


def test_a_half_written_folder_from_a_killed_process_is_cleared_not_loaded(tokenizer: Any, tmp_path: Path) -> None:
    files = [write_chats(tmp_path / "train.jsonl")]
    config = make_config(tmp_path)
    key, _ = preparation_key(config, tokenizer, files, None)
    leftover = tmp_path / "cache" / "prepared" / f".{key}.12345"
    leftover.mkdir(parents=True)
    (leftover / "tokens.i32").write_bytes(b"\0" * 64)

    prepared = build_datasets(config, tokenizer, train_files=files)

    assert not leftover.exists()
    assert prepared.stats.rows == 40


def test_old_prepared_data_is_evicted_beyond_the_limit(tokenizer: Any, tmp_path: Path) -> None:
    files = [write_chats(tmp_path / "train.jsonl")]
    for seq in (64, 80):
        build_datasets(make_config(tmp_path, maxSeqLength=seq), tokenizer, train_files=files)
    assert len(prepared_folders(tmp_path)) == 2
    config = trainer_factories.make_config(
        dataset={"format": "chat"},
        training={"maxSteps": 1, "maxSeqLength": 96},
        local={"cacheDir": str(tmp_path / "cache"), "workDir": str(tmp_path / "work"), "preparedDataLimitGB": 1e-9},
    )
    newest, _ = preparation_key(config, tokenizer, files, None)

    build_datasets(config, tokenizer, train_files=files)

    assert prepared_folders(tmp_path) == [newest]


def test_preparation_reports_rows_per_second_and_eta(
    tokenizer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(data_prepare, "PROGRESS_EVERY_S", 0.0)
    monkeypatch.setattr(data_prepare, "CHUNK_BYTES", 2000)
    reports: list[tuple[int, float, float]] = []
    files = [write_chats(tmp_path / "train.jsonl", count=60)]

    with caplog.at_level(logging.INFO, logger="finetune_trainer.data_prepare"):
        build_datasets(make_config(tmp_path), tokenizer, train_files=files,
                       on_progress=lambda rows, done, left: reports.append((rows, done, left)))

    assert len(reports) >= 3
    assert [rows for rows, _, _ in reports] == sorted(rows for rows, _, _ in reports)
    assert reports[-1][:2] == (60, 1.0)
    assert "rows/s" in caplog.text and "ETA" in caplog.text


def test_a_mapped_dataset_pickles_without_its_maps(tokenizer: Any, tmp_path: Path) -> None:
    import pickle

    prepared = build_datasets(make_config(tmp_path), tokenizer, train_files=[write_chats(tmp_path / "t.jsonl")])
    first = prepared.train[0]
    copy = pickle.loads(pickle.dumps(prepared.train))
    assert copy._maps is None
    assert copy[0]["input_ids"].tolist() == first["input_ids"].tolist()

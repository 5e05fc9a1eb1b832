"""Training data: each format's rendering and loss mask, truncation, packing boundaries, malformed rows, eval split."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import trainer_factories

from finetune_trainer.config import TrainerConfig
from finetune_trainer.data import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    ExampleBuilder,
    MalformedBudget,
    PaddingCollator,
    count_real_tokens,
)
from finetune_trainer.data_prepare import ChunkResult, pack_bounds, plan_chunks, tokenize_chunks
from finetune_trainer.data_rows import DataError
from finetune_trainer.data_store import build_datasets, packed_item
from finetune_trainer.testing import build_tiny_model, generic_corpus, pretrain_briefly, toy_chat_rows

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts = generic_corpus(300) + [m["content"] for row in toy_chat_rows(200) for m in row["messages"]]
    yield build_tiny_model(tmp_path_factory.mktemp("tiny"), texts=texts, n_positions=128)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def make_config(**sections: dict[str, Any]) -> TrainerConfig:
    dataset = {"format": "text", **sections.pop("dataset", {})}
    training = {"maxSteps": 1, "maxSeqLength": 64, **sections.pop("training", {})}
    return trainer_factories.make_config(dataset=dataset, training=training, **sections)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@dataclass
class Example:
    input_ids: npt.NDArray[np.int32]
    labels: npt.NDArray[np.int32]
    position_ids: npt.NDArray[np.int32] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def encode_file(tokenizer: Any, config: TrainerConfig, path: Path) -> tuple[list[Example], list[ChunkResult]]:
    """The examples of one file in row order (tokenized in this process), and its chunks' counts."""
    builder = ExampleBuilder(tokenizer, config.dataset, config.training.maxSeqLength)
    budget = MalformedBudget(config.dataset.maxMalformedRows)
    examples, results = [], []
    for result in tokenize_chunks(plan_chunks([path], builder.columns), builder, workers=1):
        for location, problem in result.malformed:
            budget.reject(location, problem)
        ends = np.cumsum(result.lengths)
        for ids, trained in zip(np.split(result.ids, ends[:-1]), np.split(result.trained, ends[:-1]), strict=True):
            examples.append(Example(ids, np.where(trained != 0, ids, IGNORE_INDEX).astype(np.int32)))
        results.append(result)
    return examples, results


def encode_rows(tokenizer: Any, tmp_path: Path, fmt: str, rows: list[Any], max_len: int = 64) -> list[Example]:
    config = make_config(dataset={"format": fmt}, training={"maxSeqLength": max_len})
    return encode_file(tokenizer, config, write_jsonl(tmp_path / "rows.jsonl", rows))[0]


def pack_examples(examples: list[Example], max_len: int) -> list[Example]:
    bounds = pack_bounds(np.asarray([len(e) for e in examples]), max_len).tolist()
    return [
        Example(**packed_item([(e.input_ids, e.labels) for e in examples[start:end]]))
        for start, end in zip(bounds, bounds[1:], strict=False)
    ]


def trained_text(tokenizer: Any, example: Example) -> str:
    ids = [int(t) for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    return str(tokenizer.decode(ids))


def untrained_text(tokenizer: Any, example: Example) -> str:
    ids = [int(t) for t, label in zip(example.input_ids, example.labels, strict=True) if label == IGNORE_INDEX]
    return str(tokenizer.decode(ids))


CHAT = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "2 plus 3 is 5."},
    ]
}
CHAT_RENDERED = (
    "<|system|>\nYou are a helpful assistant.\n<|user|>\nWhat is the capital of France?\n"
    f"<|assistant|>\nThe capital of France is Paris.{EOS}"
    f"<|user|>\nWhat is 2 plus 3?\n<|assistant|>\n2 plus 3 is 5.{EOS}"
)


@pytest.mark.parametrize(
    ("fmt", "row", "rendered", "trained", "untrained"),
    [
        pytest.param(
            "text",
            {"text": "The farmer carried a heavy box."},
            f"The farmer carried a heavy box.{EOS}",
            f"The farmer carried a heavy box.{EOS}",
            "",
            id="text-trains-everything",
        ),
        pytest.param(
            "promptCompletion",
            {"prompt": "Question: what did the farmer carry?\nAnswer:", "completion": " a heavy box"},
            f"Question: what did the farmer carry?\nAnswer: a heavy box{EOS}",
            f" a heavy box{EOS}",
            "Question: what did the farmer carry?\nAnswer:",
            id="prompt-completion-trains-the-completion",
        ),
        pytest.param(
            "chat",
            CHAT,
            CHAT_RENDERED,
            f"The capital of France is Paris.{EOS}2 plus 3 is 5.{EOS}",
            "<|system|>\nYou are a helpful assistant.\n<|user|>\nWhat is the capital of France?\n<|assistant|>\n"
            "<|user|>\nWhat is 2 plus 3?\n<|assistant|>\n",
            id="chat-trains-assistant-turns",
        ),
    ],
)
def test_each_format_renders_and_trains_only_its_answer(
    tokenizer: Any, tmp_path: Path, fmt: str, row: dict[str, Any], rendered: str, trained: str, untrained: str
) -> None:
    (example,) = encode_rows(tokenizer, tmp_path, fmt, [row], max_len=128)

    assert tokenizer.decode(example.input_ids.tolist()) == rendered
    assert trained_text(tokenizer, example) == trained
    assert untrained_text(tokenizer, example) == untrained


def test_prompt_completion_label_mask_is_exact(tokenizer: Any, tmp_path: Path) -> None:
    prompt, completion = "Tell me a short story.", " The baker found a silver key."
    (example,) = encode_rows(tokenizer, tmp_path, "promptCompletion", [{"prompt": prompt, "completion": completion}])
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]

    assert example.input_ids.tolist() == prompt_ids + completion_ids + [tokenizer.eos_token_id]
    assert example.labels.tolist() == [IGNORE_INDEX] * len(prompt_ids) + completion_ids + [tokenizer.eos_token_id]


def test_chat_label_mask_is_exact(tokenizer: Any, tmp_path: Path) -> None:
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    (example,) = encode_rows(tokenizer, tmp_path, "chat", [row])
    enc = tokenizer.convert_tokens_to_ids
    user_part = tokenizer("<|user|>\nHi\n", add_special_tokens=False)["input_ids"]
    header = tokenizer("<|assistant|>\n", add_special_tokens=False)["input_ids"]
    answer = tokenizer("Hello", add_special_tokens=False)["input_ids"]

    assert user_part[0] == enc("<|user|>") and header[0] == enc("<|assistant|>")
    assert example.input_ids.tolist() == user_part + header + answer + [tokenizer.eos_token_id]
    assert example.labels.tolist() == [IGNORE_INDEX] * (len(user_part) + len(header)) + answer + [
        tokenizer.eos_token_id
    ]


def test_a_tokenizer_chat_template_gives_the_same_tokens_as_the_default(
    model_dir: Path, tokenizer: Any, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    templated = AutoTokenizer.from_pretrained(model_dir)
    templated.chat_template = DEFAULT_CHAT_TEMPLATE
    rows = [CHAT, *toy_chat_rows(20, seed=3)]

    by_default = encode_rows(tokenizer, tmp_path, "chat", rows, max_len=128)
    by_template = encode_rows(templated, tmp_path, "chat", rows, max_len=128)

    assert templated.apply_chat_template(CHAT["messages"], tokenize=False) == CHAT_RENDERED
    assert [e.input_ids.tolist() for e in by_template] == [e.input_ids.tolist() for e in by_default]
    assert [e.labels.tolist() for e in by_template] == [e.labels.tolist() for e in by_default]


def test_a_chat_template_that_rewrites_earlier_turns_makes_the_row_malformed(model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    odd = AutoTokenizer.from_pretrained(model_dir)
    # Shows only the last message's content in full: a longer conversation is no extension of a shorter one.
    odd.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {% if loop.last %}{{ m['content'] }}{% else %}...{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    rows = [{"messages": [*CHAT["messages"][:3], {"role": "user", "content": "more"}, CHAT["messages"][4]]}]

    with pytest.raises(DataError, match=r"rows\.jsonl:1: cannot locate assistant turn messages\[2\]"):
        encode_rows(odd, tmp_path, "chat", rows)


def test_long_examples_are_truncated_and_untrainable_ones_dropped(tokenizer: Any, tmp_path: Path) -> None:
    config = make_config(dataset={"format": "promptCompletion"}, training={"maxSeqLength": 16})
    long_prompt = " ".join(generic_corpus(5))
    rows = [
        {"prompt": "Q:", "completion": " " + long_prompt},
        {"prompt": long_prompt, "completion": " yes"},
        {"prompt": "Q:", "completion": " yes"},
    ]
    examples, (result,) = encode_file(tokenizer, config, write_jsonl(tmp_path / "d.jsonl", rows))

    assert [len(e) for e in examples[:1]] == [16]
    assert len(examples) == 2
    assert (result.rows, result.truncated, result.dropped_untrained, len(result.lengths)) == (3, 2, 1, 2)


def example_of(n: int, start: int = 10) -> Example:
    ids = np.arange(start, start + n, dtype=np.int32)
    return Example(ids, ids.copy())


def test_packing_restarts_positions_and_masks_each_boundary() -> None:
    examples = [example_of(5, 10), example_of(7, 20), example_of(4, 30), example_of(12, 40)]

    packed = pack_examples(examples, 12)

    assert [len(p) for p in packed] == [12, 4, 12]
    first = packed[0]
    assert first.position_ids is not None
    assert first.position_ids.tolist() == [*range(5), *range(7)]
    assert first.input_ids.tolist() == [*range(10, 15), *range(20, 27)]
    assert first.labels.tolist() == [IGNORE_INDEX, *range(11, 15), IGNORE_INDEX, *range(21, 27)]
    for sequence in packed:
        assert sequence.position_ids is not None
        starts = sequence.position_ids == 0
        assert (sequence.labels[starts] == IGNORE_INDEX).all()


def test_packing_never_splits_an_example() -> None:
    examples = [example_of(n, 100 * i) for i, n in enumerate([3, 9, 9, 2, 8, 1 + 5, 10])]

    packed = pack_examples(examples, 10)

    starts = [
        int(p.input_ids[j])
        for p in packed
        for j in range(len(p))
        if p.position_ids is not None and not p.position_ids[j]
    ]
    assert starts == [int(e.input_ids[0]) for e in examples]
    assert all(len(p) <= 10 for p in packed)


def test_packed_attention_does_not_cross_examples(model_dir: Path, tokenizer: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    rows = toy_chat_rows(6, seed=5)
    examples = encode_rows(tokenizer, tmp_path, "chat", rows, max_len=128)
    packed = pack_examples(examples, 128)
    batch = PaddingCollator(tokenizer.pad_token_id)(
        [{"input_ids": p.input_ids, "labels": p.labels, "position_ids": p.position_ids} for p in packed]
    )
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    model.config.use_cache = False

    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            alone = [model(input_ids=torch.tensor([e.input_ids.tolist()])).logits[0] for e in examples]
        index = 0
        for row, sequence in enumerate(packed):
            assert sequence.position_ids is not None
            starts = [*(sequence.position_ids == 0).nonzero()[0].tolist(), len(sequence)]
            for start, end in zip(starts, starts[1:], strict=False):
                assert torch.allclose(logits[row, start:end], alone[index], atol=1e-4), implementation
                index += 1
        assert index == len(examples)
    assert len(packed) < len(examples)


def test_collator_pads_right_and_masks_pads() -> None:
    batch = PaddingCollator(0)(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
            {"input_ids": [8, 9], "labels": [8, 9]},
        ]
    )

    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, 9, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert count_real_tokens(batch) == 5


def test_packed_batches_carry_positions_not_a_mask_and_count_real_tokens() -> None:
    packed = pack_examples([example_of(3), example_of(2), example_of(4)], 5)
    batch = PaddingCollator(0)(
        [{"input_ids": p.input_ids, "labels": p.labels, "position_ids": p.position_ids} for p in packed]
    )

    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["labels"][1].tolist()[-1] == IGNORE_INDEX
    assert count_real_tokens(batch) == 9


MALFORMED = [
    pytest.param("text", '{"text": ', "not valid JSON: Expecting value (column 10)", id="bad-json"),
    pytest.param("text", "[1, 2]", "expected a JSON object, got a list", id="not-an-object"),
    pytest.param("text", {"body": "x"}, "missing field 'text'", id="missing-field"),
    pytest.param("text", {"text": 3}, "field 'text' must be a string, got a number", id="wrong-type"),
    pytest.param("text", {"text": "  "}, "field 'text' is empty", id="empty-text"),
    pytest.param("promptCompletion", {"prompt": "q"}, "missing field 'completion'", id="missing-completion"),
    pytest.param("chat", {"messages": []}, "field 'messages' is empty", id="empty-messages"),
    pytest.param(
        "chat", {"messages": "hi"}, "field 'messages' must be a list of messages, got a string", id="messages-string"
    ),
    pytest.param(
        "chat",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]},
        "messages[1]: unknown role 'robot' (expected system, user or assistant)",
        id="unknown-role",
    ),
    pytest.param(
        "chat",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
        "messages[1]: field 'content' must be a string, got null",
        id="null-content",
    ),
    pytest.param(
        "chat",
        {"messages": [{"role": "user", "content": "hi"}]},
        "no assistant turn in 'messages' (nothing to train on)",
        id="no-assistant",
    ),
]
GOOD = {
    "text": {"text": "The farmer carried a box."},
    "promptCompletion": {"prompt": "Q:", "completion": " A."},
    "chat": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
}


@pytest.mark.parametrize(("fmt", "bad", "problem"), MALFORMED)
def test_a_malformed_row_names_its_file_and_line(
    tokenizer: Any, tmp_path: Path, fmt: str, bad: Any, problem: str
) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD[fmt], GOOD[fmt], "", bad, GOOD[fmt]])
    config = make_config(dataset={"format": fmt})

    with pytest.raises(DataError) as error:
        build_datasets(config, tokenizer, train_files=[(path, "s3://data/train.jsonl")])

    assert str(error.value) == f"s3://data/train.jsonl:4: {problem}"


def test_malformed_rows_within_the_limit_are_skipped_counted_and_logged(
    tokenizer: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [GOOD["text"], "not json", GOOD["text"], {"text": 1}, GOOD["text"]]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    config = make_config(dataset={"maxMalformedRows": 2, "evalSplit": 0.2})

    with caplog.at_level(logging.WARNING, logger="finetune_trainer.data"):
        prepared = build_datasets(config, tokenizer, train_files=[path])

    assert (prepared.stats.rows, prepared.stats.skipped, prepared.stats.examples) == (5, 2, 3)
    warned = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"{path}:2: not valid JSON") for m in warned)
    assert any(m.startswith(f"{path}:4: field 'text' must be a string") for m in warned)


def test_one_malformed_row_more_than_the_limit_fails(tokenizer: Any, tmp_path: Path) -> None:
    rows = [GOOD["text"], "x", "y", GOOD["text"], "z"]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    config = make_config(dataset={"maxMalformedRows": 2})

    with pytest.raises(
        DataError, match=r"train\.jsonl:5: not valid JSON.*3 malformed rows, more than dataset\.maxMalformedRows = 2"
    ):
        build_datasets(config, tokenizer, train_files=[path])


def test_json_arrays_and_parquet_are_read_with_row_locations(tokenizer: Any, tmp_path: Path) -> None:
    array = tmp_path / "rows.json"
    array.write_text('[\n  {"text": "The farmer carried a box."},\n  {"text": 5}\n]\n')
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["The baker found a key.", None]}), parquet)
    config = make_config(dataset={"maxMalformedRows": 5, "evalSplit": 0.2})

    prepared = build_datasets(config, tokenizer, train_files=[array, parquet])

    assert (prepared.stats.rows, prepared.stats.skipped, prepared.stats.examples) == (4, 2, 2)
    with pytest.raises(DataError, match=rf"^{parquet}:row 2: field 'text' must be a string, got null$"):
        build_datasets(make_config(), tokenizer, train_files=[parquet])
    with pytest.raises(DataError, match=rf"^{array}:3: field 'text' must be a string, got a number$"):
        build_datasets(make_config(), tokenizer, train_files=[array])


def test_parquet_chat_rows_and_a_missing_column(tokenizer: Any, tmp_path: Path) -> None:
    parquet = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(toy_chat_rows(10)), parquet)

    prepared = build_datasets(make_config(dataset={"format": "chat"}), tokenizer, train_files=[parquet])

    assert prepared.stats.examples == 10
    with pytest.raises(DataError, match=r"chat\.parquet: no column 'text' \(columns: messages\)"):
        build_datasets(make_config(), tokenizer, train_files=[parquet])


def test_eval_split_is_deterministic_for_a_seed(tokenizer: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": line} for line in generic_corpus(50)])

    def eval_ids(seed: int) -> list[list[int]]:
        config = make_config(dataset={"evalSplit": 0.2}, training={"seed": seed})
        prepared = build_datasets(config, tokenizer, train_files=[path])
        assert prepared.eval is not None
        assert len(prepared.train) == 40
        return [prepared.eval[i]["input_ids"].tolist() for i in range(len(prepared.eval))]

    assert len(eval_ids(1)) == 10
    assert eval_ids(1) == eval_ids(1)
    assert eval_ids(1) != eval_ids(2)


def test_a_separate_eval_file_is_used_whole_and_nothing_is_split(tokenizer: Any, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": line} for line in generic_corpus(20)])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"text": line} for line in generic_corpus(3, seed=9)])
    config = make_config(dataset={"evalUri": "s3://data/eval.jsonl"})

    prepared = build_datasets(config, tokenizer, train_files=[train], eval_files=[evaluation])

    assert prepared.eval is not None
    assert (len(prepared.train), len(prepared.eval)) == (20, 3)


def test_packing_fills_sequences_and_keeps_every_token(tokenizer: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", toy_chat_rows(60))
    plain = build_datasets(
        make_config(dataset={"format": "chat"}, training={"maxSeqLength": 128}), tokenizer, train_files=[path]
    )
    packed = build_datasets(
        make_config(dataset={"format": "chat"}, training={"maxSeqLength": 128, "packing": True}),
        tokenizer,
        train_files=[path],
    )

    assert packed.stats.train_sequences < plain.stats.train_sequences / 2
    assert sum(len(packed.train[i]["input_ids"]) for i in range(len(packed.train))) == plain.stats.train_tokens
    assert packed.stats.to_dict()["trainTokens"] == plain.stats.train_tokens


def test_the_tiny_model_loads_offline_and_brief_pretraining_lowers_its_loss(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = generic_corpus(200, seed=4)
    folder = build_tiny_model(tmp_path / "tiny", texts=texts, n_positions=64)

    losses = pretrain_briefly(folder, texts, steps=25, seq_length=32, batch_size=8)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model: Any = AutoModelForCausalLM.from_pretrained(folder)

    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == EOS
    assert tokenizer.convert_ids_to_tokens(tokenizer("<|user|>", add_special_tokens=False)["input_ids"]) == ["<|user|>"]
    assert model.config.vocab_size == len(tokenizer) and model.config.n_layer == 2

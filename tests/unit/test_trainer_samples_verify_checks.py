"""Evaluation prompts (files, chat template, generate's settings) and the export check on a real tiny model folder."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from trainer_factories import make_config

from finetune_trainer.config import ConfigError
from finetune_trainer.export import summarize
from finetune_trainer.samples import generation_kwargs, parse_prompts, prompt_ids
from finetune_trainer.testing import build_tiny_model, corrupt_bytes, generic_corpus
from finetune_trainer.verify import run_verification

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}" \
           "{% if add_generation_prompt %}<|assistant|>{% endif %}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param('"What is 2 plus 2?"\n{"prompt": "Hello"}\n', ["What is 2 plus 2?", "Hello"], id="jsonl"),
        pytest.param("First question\n\n  Second question  \n", ["First question", "Second question"], id="text"),
    ],
)
def test_prompt_files(text: str, expected: list[str]) -> None:
    assert parse_prompts(text, "s3://b/p.jsonl") == expected


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        pytest.param('"ok"\n{"prompt": 3}\n', "s3://b/p.jsonl:2", "must be a string", id="not-a-string"),
        pytest.param('"ok"\n{"prompt": \n', "s3://b/p.jsonl:2", "not valid JSON", id="broken-json"),
        pytest.param("\n \n", "s3://b/p.jsonl", "holds no prompt", id="empty"),
        pytest.param("q\n" * 65, "s3://b/p.jsonl", "65 prompts, more than 64", id="too-many"),
        pytest.param("x" * 4097, "s3://b/p.jsonl[0]", "longer than 4096", id="too-long"),
    ],
)
def test_bad_prompt_files_name_the_line(text: str, field: str, problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_prompts(text, "s3://b/p.jsonl")
    assert raised.value.field_path == field and problem in raised.value.problem


@pytest.mark.parametrize(
    ("evaluation", "field"),
    [
        pytest.param({"prompts": ["a", " "]}, "evaluation.prompts[1]", id="blank-prompt"),
        pytest.param({"prompts": ["a"], "promptsUri": "s3://bucket/p.jsonl"}, "evaluation.promptsUri", id="both"),
        pytest.param({"promptsUri": "http://x/p"}, "evaluation.promptsUri", id="not-a-storage-uri"),
        pytest.param({"maxNewTokens": 0}, "evaluation.maxNewTokens", id="max-new-tokens"),
    ],
)
def test_evaluation_config_errors_name_the_field(evaluation: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as raised:
        make_config(evaluation=evaluation)
    assert raised.value.field_path == field


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", texts=generic_corpus(200))


def test_the_chat_template_frames_the_prompt_and_none_means_the_plain_text(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    plain = prompt_ids(tokenizer, "the river")
    tokenizer.chat_template = TEMPLATE
    framed = prompt_ids(tokenizer, "the river")
    assert plain == tokenizer("the river")["input_ids"]
    assert framed[0] == tokenizer.convert_tokens_to_ids("<|user|>")
    assert framed[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert framed[1:-1] == plain


def test_greedy_unless_sampling(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    greedy = generation_kwargs(make_config(evaluation={"maxNewTokens": 9}).evaluation, tokenizer)
    sampled = generation_kwargs(make_config(evaluation={"sampling": True, "topP": 0.9}).evaluation, tokenizer)
    assert (greedy["do_sample"], greedy["max_new_tokens"], greedy["temperature"]) == (False, 9, None)
    assert (sampled["do_sample"], sampled["temperature"], sampled["top_p"]) == (True, 0.7, 0.9)
    assert greedy["pad_token_id"] == tokenizer.pad_token_id


def verify_copy(source: Path, tmp_path: Path, damaged: str | None = None) -> dict[str, Any]:
    folder = tmp_path / "stored"
    folder.mkdir()
    for path in source.iterdir():
        data = path.read_bytes()
        (folder / path.name).write_bytes(corrupt_bytes(path.name, data) if path.name == damaged else data)
    request = {"modelUri": f"file://{folder}", "export": "full", "baseModelDir": "", "prompts": ["Hello", "Why?"],
               "evaluation": {"maxNewTokens": 6, "generationTimeoutSeconds": 60}}
    return run_verification(request, tmp_path / "downloaded")


def test_a_sound_export_verifies_with_answers(tiny_model: Path, tmp_path: Path) -> None:
    verdict = verify_copy(tiny_model, tmp_path)
    assert verdict["ok"] is True, verdict
    assert [a["prompt"] for a in verdict["answers"]] == ["Hello", "Why?"]
    assert any(a["answer"] for a in verdict["answers"])
    assert verdict["tensorsChecked"] > 0
    assert "model/model.safetensors" in {f["name"] for f in verdict["files"]}


@pytest.mark.parametrize(
    ("damaged", "problem"),
    [
        pytest.param("model.safetensors", "model/model.safetensors: tensor", id="nan-in-the-weights"),
        pytest.param("tokenizer.json", "model/tokenizer.json: the tokenizer does not load", id="broken-tokenizer"),
        pytest.param("config.json", "model/config.json: does not load", id="broken-config"),
    ],
)
def test_a_damaged_export_fails_naming_the_file(tiny_model: Path, tmp_path: Path, damaged: str, problem: str) -> None:
    verdict = verify_copy(tiny_model, tmp_path, damaged)
    assert verdict["ok"] is False
    assert verdict["problem"].startswith(problem), verdict["problem"]


def test_the_nan_lands_in_a_float_tensor(tiny_model: Path) -> None:
    import torch
    from safetensors.torch import load

    damaged = load(corrupt_bytes("model.safetensors", (tiny_model / "model.safetensors").read_bytes()))
    assert sum(int(torch.isnan(t).sum()) for t in damaged.values() if t.is_floating_point()) == 1


def test_a_failed_verification_makes_the_result_failed() -> None:
    from transformers import TrainerState

    state = TrainerState()
    state.global_step, state.max_steps = 4, 4
    verdict = {"ok": False, "problem": "model/model.safetensors: tensor x has 1 non-finite values", "seconds": 1.0}
    result = summarize(make_config(), state, final_eval=None, train_loss=1.0, tokens_seen=10, wall_seconds=1.0,
                       train_seconds=1.0, resumed_from=None, early_stopped_at=None, world_size=1, precision="fp32",
                       extra={"verification": verdict, "samples": [{"prompt": "p", "answer": "a"}]})
    assert (result["status"], result["exitCode"]) == ("failed", 64)
    assert json.loads(json.dumps(result))["verification"] == verdict
    assert result["samples"] == [{"prompt": "p", "answer": "a"}]


def test_one_block_per_evaluation_uploaded_at_a_save_and_cut_after_a_resume(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerControl, TrainerState, TrainingArguments

    from finetune_trainer.distributed import DistContext
    from finetune_trainer.samples import SAMPLES_NAME, SamplesCallback
    from finetune_trainer.storage import open_store

    store = open_store(f"file://{tmp_path / 'out'}")
    config = make_config(evaluation={"prompts": ["Hello", "Why?"], "maxNewTokens": 4})
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    args = TrainingArguments(output_dir=str(tmp_path / "local"), use_cpu=True, report_to=[])
    samples = SamplesCallback(config, ["Hello", "Why?"], tokenizer, store, DistContext())
    state, control = TrainerState(), TrainerControl()
    for step in (0, 2, 4):
        state.global_step = step
        samples.on_evaluate(args, state, control, model=model)
        if step == 2:
            samples.on_save(args, state, control)
    stored = [json.loads(line) for line in (tmp_path / "out" / SAMPLES_NAME).read_text().splitlines()]
    assert [(line["step"], line["prompt"]) for line in stored] == [(0, "Hello"), (0, "Why?"), (2, "Hello"),
                                                                   (2, "Why?")]
    local = [json.loads(line)["step"] for line in (tmp_path / "local" / SAMPLES_NAME).read_text().splitlines()]
    assert local == [0, 0, 2, 2, 4, 4]
    # The end reuses the evaluation at the last step instead of generating again.
    part = samples.finish(model, 4, deadline=time.monotonic() + 60)
    assert [s["prompt"] for s in part["samples"]] == ["Hello", "Why?"] and part["samplesStep"] == 4
    assert len((tmp_path / "out" / SAMPLES_NAME).read_text().splitlines()) == 6

    # A new attempt resumed from step 2 redoes step 4's block instead of repeating it.
    resumed = SamplesCallback(config, ["Hello", "Why?"], tokenizer, store, DistContext())
    state.global_step = 2
    resumed.on_train_begin(args, state, control)
    state.global_step = 4
    resumed.on_evaluate(args, state, control, model=model)
    resumed.finish(model, 4, deadline=time.monotonic() + 60)
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / SAMPLES_NAME).read_text().splitlines()]
    assert steps == [0, 0, 2, 2, 4, 4]

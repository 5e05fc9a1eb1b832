"""Sample answers at every evaluation (ZeRO-3 the same as ZeRO-0) and the exported model verified by loading it back."""

from __future__ import annotations

import json
from typing import Any

import pytest
from trainer_helpers import TrainerSetup

from finetune_trainer import exit_codes

pytestmark = pytest.mark.integration

PROMPTS = ["What is the capital of France?", "What is 12 plus 30?"]
# Four steps with an evaluation every two: blocks at steps 0, 2 and 4.
SHORT = {"maxSteps": 4, "evalEvery": 2, "logEvery": 1}


def samples_lines(setup: TrainerSetup, prefix: str) -> list[dict[str, Any]]:
    body = setup.s3.get_object(Bucket=setup.bucket, Key=f"{prefix}/samples.jsonl")["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines()]


def blocks(lines: list[dict[str, Any]]) -> dict[int, list[str]]:
    """{step: [answer, ...]} in prompt order."""
    found: dict[int, list[str]] = {}
    for line in lines:
        found.setdefault(line["step"], []).append(line["answer"])
    return found


def test_zero3_answers_as_zero0_one_block_per_evaluation_and_the_export_verifies(setup: TrainerSetup) -> None:
    runs: dict[int, dict[str, Any]] = {}
    for stage in (0, 3):
        config = setup.write_config(
            name=f"zero{stage}.json", training=SHORT, deepspeed={"zeroStage": stage},
            output={"uri": setup.uri(f"zero{stage}")}, checkpoint={"everySteps": 2},
            evaluation={"prompts": PROMPTS, "maxNewTokens": 12},
        )
        launched = setup.run_launcher(config, nproc=2)
        assert launched.returncode == exit_codes.SUCCESS, launched.log()[-4000:]
        runs[stage] = {"lines": samples_lines(setup, f"zero{stage}"),
                       "result": setup.read_json(f"zero{stage}/result.json"), "message": setup.termination_message}

    for stage, run in runs.items():
        lines, result = run["lines"], run["result"]
        assert [line["step"] for line in lines] == [0, 0, 2, 2, 4, 4], f"zero{stage}: one block per evaluation"
        assert [line["prompt"] for line in lines] == PROMPTS * 3
        assert all(line["seconds"] >= 0 and "truncated" not in line for line in lines)
        assert result["samples"] == [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, blocks(lines)[4], strict=True)]
        assert result["samplesStep"] == 4
        verification = result["verification"]
        assert verification["ok"] is True, verification
        assert [a["prompt"] for a in verification["answers"]] == PROMPTS
        assert {"model/model.safetensors", "model/config.json", "model/tokenizer.json"} <= {
            f["name"] for f in verification["files"]}
        assert verification["tensorsChecked"] > 0 and verification["seconds"] > 0
        assert json.loads(run["message"])["verification"]["ok"] is True
    # Step 0: the same weights in both runs, so greedy answers must agree token for token; under ZeRO-3 each rank
    # holds a shard, and an answer from unsharded garbage (or a rank left out) would differ or hang.
    assert blocks(runs[3]["lines"])[0] == blocks(runs[0]["lines"])[0]
    assert any(answer for answer in blocks(runs[0]["lines"])[0])


def test_a_corrupted_export_fails_permanently_naming_the_file(setup: TrainerSetup) -> None:
    config = setup.write_config(training=SHORT, checkpoint={"everySteps": 4})

    launched = setup.run_launcher(config, FINETUNE_TEST_CORRUPT_EXPORT="model.safetensors")

    assert launched.returncode == exit_codes.INVALID, launched.log()[-4000:]
    message = setup.termination_message
    assert "model verification failed: model/model.safetensors: tensor" in message, message
    assert "non-finite" in message
    result = setup.result()
    assert (result["status"], result["exitCode"]) == ("failed", exit_codes.INVALID)
    assert result["verification"]["ok"] is False
    assert result["verification"]["problem"].startswith("model/model.safetensors:")


# peft 0.21 still calls transformers' deprecated is_gradient_checkpointing when loading an adapter.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_a_lora_adapter_verifies_through_peft_with_prompts_from_a_file(setup: TrainerSetup) -> None:
    lines = [json.dumps(PROMPTS[0]), json.dumps({"prompt": PROMPTS[1]})]
    setup.s3.put_object(Bucket=setup.bucket, Key="eval/prompts.jsonl", Body="\n".join(lines).encode())
    config = setup.write_config(
        training={**SHORT, "method": "lora", "lora": {"r": 8, "alpha": 16}, "learningRate": 0.01},
        output={"export": "adapter"}, checkpoint={"everySteps": 4},
        evaluation={"promptsUri": setup.uri("eval/prompts.jsonl"), "maxNewTokens": 8},
    )

    launched = setup.run_launcher(config)

    assert launched.returncode == exit_codes.SUCCESS, launched.log()[-4000:]
    result = setup.result()
    verification = result["verification"]
    assert verification["ok"] is True, verification
    names = {f["name"] for f in verification["files"]}
    assert {"model/adapter_model.safetensors", "model/adapter_config.json"} <= names
    assert "model/model.safetensors" not in names
    assert [a["prompt"] for a in verification["answers"]] == PROMPTS
    assert [s["prompt"] for s in result["samples"]] == PROMPTS
    assert [line["step"] for line in samples_lines(setup, "run")] == [0, 0, 2, 2, 4, 4]

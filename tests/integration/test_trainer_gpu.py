"""The GPU path (bf16, nccl, ZeRO-2 and ZeRO-3, full and LoRA) of the trainer; skipped where no CUDA device is present.

The model, data and output go through ``file://`` URIs: what differs on a GPU is precision, the collective backend and
DeepSpeed's partitioning, not storage, whose S3 path the CPU tests cover against a real server. So these tests need
no SeaweedFS binary on the GPU machine, only the Python packages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import RUN_TIMEOUT_S, free_metrics_port, free_port, tiny_assets

from finetune_trainer import exit_codes

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def run_on_gpus(root: Path, assets: Path, ranks: int, **sections: dict[str, Any]) -> tuple[int, str, dict[str, Any]]:
    """Run the launcher on ``ranks`` GPUs: (exit code, log, result.json or {})."""
    root.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "model": {"uri": f"file://{assets / 'model'}"},
        "dataset": {"uri": f"file://{assets / 'data' / 'train.jsonl'}", "format": "chat", "evalSplit": 0.1},
        "output": {"uri": f"file://{root / 'out'}"},
        "training": {"maxSteps": 40, "batchSize": 8, "maxSeqLength": 64, "learningRate": 0.003, "logEvery": 5,
                     "evalEvery": 20, "precision": "bf16"},
        "checkpoint": {"everySteps": 20, "keep": 1, "gracePeriodSeconds": 60},
        "metrics": {"port": free_metrics_port(ranks)},
        "local": {"cacheDir": str(root / "cache"), "workDir": str(root / "work")},
        "job": {"name": "gpu", "namespace": "tests"},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    (root / "config.json").write_text(json.dumps(config))
    termination = root / "termination-log"
    termination.touch()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "FINETUNE_TERMINATION_LOG": str(termination),
        "PET_NPROC_PER_NODE": str(ranks),
        "PET_MASTER_ADDR": "127.0.0.1",
        "PET_MASTER_PORT": str(free_port()),
    }
    done = subprocess.run(
        [sys.executable, "-m", "finetune_trainer.launch", "--config", str(root / "config.json")],
        env=env,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    result_path = root / "out" / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    return done.returncode, done.stdout.decode(errors="replace"), result


@pytest.fixture
def ranks() -> int:
    return int(min(2, torch.cuda.device_count()))


def test_bf16_nccl_zero2_full_fine_tune_trains_and_improves(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, ranks: int
) -> None:
    code, log, result = run_on_gpus(tmp_path, tiny_assets(tmp_path_factory), ranks, deepspeed={"zeroStage": 2})
    assert code == exit_codes.SUCCESS, log[-4000:]
    assert result["precision"] == "bf16"
    assert result["worldSize"] == ranks
    assert result["steps"] == 40
    assert result["evalLossAfter"] < result["evalLossBefore"]
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()


def test_bf16_zero3_lora_exports_an_adapter(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, ranks: int
) -> None:
    code, log, result = run_on_gpus(
        tmp_path,
        tiny_assets(tmp_path_factory),
        ranks,
        deepspeed={"zeroStage": 3},
        training={"method": "lora", "learningRate": 0.01},
        output={"export": "adapter"},
    )
    assert code == exit_codes.SUCCESS, log[-4000:]
    assert result["steps"] == 40
    assert result["evalLossAfter"] < result["evalLossBefore"]
    assert (tmp_path / "out" / "model" / "adapter_model.safetensors").exists()


def test_bf16_zero3_answers_as_zero0_and_the_export_verifies(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, ranks: int
) -> None:
    prompts = ["What is the capital of France?", "What is 12 plus 30?"]
    answers: dict[int, list[str]] = {}
    for stage in (0, 3):
        code, log, result = run_on_gpus(
            tmp_path / f"zero{stage}",
            tiny_assets(tmp_path_factory),
            ranks,
            deepspeed={"zeroStage": stage},
            training={"maxSteps": 4, "evalEvery": 2, "logEvery": 1},
            evaluation={"prompts": prompts, "maxNewTokens": 12},
        )
        assert code == exit_codes.SUCCESS, log[-4000:]
        samples = tmp_path / f"zero{stage}" / "out" / "samples.jsonl"
        lines = [json.loads(line) for line in samples.read_text().splitlines()]
        assert [line["step"] for line in lines] == [0, 0, 2, 2, 4, 4]
        answers[stage] = [line["answer"] for line in lines if line["step"] == 0]
        assert result["verification"]["ok"] is True, result["verification"]
    # The same weights at step 0: greedy answers agree token for token whether the parameters are sharded or not.
    assert answers[3] == answers[0]
    assert any(answers[0])

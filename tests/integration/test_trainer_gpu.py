"""The GPU path (bf16, nccl, ZeRO-2) of the trainer; skipped where no CUDA device is present."""

from __future__ import annotations

import pytest
from trainer_helpers import TrainerSetup

from finetune_trainer import exit_codes

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_bf16_nccl_zero2_trains_and_improves(setup: TrainerSetup) -> None:
    ranks = min(2, torch.cuda.device_count())
    config = setup.write_config(
        training={"maxSteps": 40, "precision": "bf16", "batchSize": 8},
        deepspeed={"zeroStage": 2},
    )
    launched = setup.run_launcher(config, nproc=ranks)
    assert launched.process.returncode == exit_codes.SUCCESS, launched.log()[-4000:]
    result = setup.result()
    assert result["precision"] == "bf16"
    assert result["worldSize"] == ranks
    assert result["steps"] == 40
    assert result["evalLossAfter"] < result["evalLossBefore"]

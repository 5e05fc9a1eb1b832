"""Permanent errors end the pod at once with INVALID and a message naming what is wrong."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from trainer_helpers import TrainerSetup

from finetune_trainer import exit_codes

pytestmark = pytest.mark.integration


def test_bad_config_exits_invalid_naming_the_field(setup: TrainerSetup) -> None:
    config = setup.write_config(training={"learningRate": -1})

    launched = setup.run_launcher(config)

    assert launched.returncode == exit_codes.INVALID
    assert "training.learningRate" in launched.log()
    assert "training.learningRate: must be > 0" in setup.termination_message


def test_config_from_the_environment_and_help_config(setup: TrainerSetup) -> None:
    missing = subprocess.run(
        [sys.executable, "-m", "finetune_trainer.launch"],
        env={**setup.env(), "FINETUNE_CONFIG": str(setup.root / "absent.json")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    described = subprocess.run(
        [sys.executable, "-m", "finetune_trainer.launch", "--help-config"], capture_output=True, text=True, timeout=60
    )

    assert missing.returncode == exit_codes.INVALID
    assert "absent.json" in missing.stderr
    assert described.returncode == 0
    assert "checkpoint.gracePeriodSeconds" in described.stdout and "[default: 120]" in described.stdout


def test_malformed_dataset_line_exits_invalid_naming_the_line(setup: TrainerSetup) -> None:
    row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    lines = ["{not json" if number == 7 else json.dumps(row) for number in range(1, 41)]
    setup.s3.put_object(Bucket=setup.bucket, Key="data/broken.jsonl", Body="\n".join(lines).encode() + b"\n")
    config = setup.write_config(dataset={"uri": setup.uri("data/broken.jsonl")})

    launched = setup.run_launcher(config)

    assert launched.returncode == exit_codes.INVALID, launched.log()[-4000:]
    assert "broken.jsonl:7" in setup.termination_message

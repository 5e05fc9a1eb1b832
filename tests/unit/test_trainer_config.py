"""The trainer's config contract: files load with defaults, bad values fail naming the field, no torch needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from trainer_factories import config_dict

from finetune_trainer.config import ConfigError, TrainerConfig, config_from_dict, describe_fields, load_config

minimal = config_dict


def test_minimal_config_gets_defaults() -> None:
    config = config_from_dict(minimal())
    assert config.training.method == "full"
    assert config.training.learningRate == pytest.approx(2e-4)
    assert config.dataset.format == "chat"
    assert config.dataset.effective_eval_split == pytest.approx(0.1)
    assert config.deepspeed.zeroStage == 2
    assert config.checkpoint.effective_every_minutes == 30.0
    assert config.metrics.port == 9400
    assert config.export == "full"
    assert config.local.cacheDir == "/scratch/cache"


def test_lora_exports_an_adapter_by_default() -> None:
    config = config_from_dict(minimal(training={"method": "lora", "lora": {"r": 4}}))
    assert config.export == "adapter"
    assert config.training.effective_lora.r == 4
    assert config.training.effective_lora.alpha == 32


def test_json_and_yaml_files_load_the_same(tmp_path: Path) -> None:
    data = minimal(training={"learningRate": 0.001, "packing": True})
    (tmp_path / "c.json").write_text(json.dumps(data))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    assert load_config(tmp_path / "c.json") == load_config(tmp_path / "c.yaml")


def test_round_trip_through_to_dict() -> None:
    config = config_from_dict(minimal(training={"method": "lora", "lora": {"targetModules": ["c_attn"]}}))
    assert config_from_dict(config.to_dict()) == config


def test_config_hash_ignores_cadence_but_not_the_recipe() -> None:
    base = config_from_dict(minimal())
    assert base.config_hash() == config_from_dict(minimal(checkpoint={"everySteps": 5})).config_hash()
    assert base.config_hash() != config_from_dict(minimal(training={"learningRate": 0.1})).config_hash()


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"dataset": {"uri": "x"}, "output": {"uri": "s3://o/p"}, "training": {"maxSteps": 1}}, "model", "required"),
        (minimal(model={"uri": "https://hub/model"}), "model.uri", "s3://bucket/key"),
        (minimal(training={"learningRate": -1}), "training.learningRate", "must be > 0"),
        (minimal(training={"learningRate": "fast"}), "training.learningRate", "must be a number"),
        (minimal(training={"epochs": 1}), "training.epochs", "exactly one"),
        (minimal(training={"method": "qlora"}), "training.method", "must be one of"),
        (minimal(training={"lora": {"r": 8}}), "training.lora", "method 'lora'"),
        (minimal(training={"packing": "yes"}), "training.packing", "boolean"),
        (minimal(training={"batchSize": 2.5}), "training.batchSize", "integer"),
        (minimal(training={"earlyStopping": {"patience": 2}}), "training.earlyStopping", "evalEvery"),
        (minimal(deepspeed={"zeroStage": 1, "offloadOptimizer": True}), "deepspeed.offloadOptimizer", "zeroStage 2"),
        (minimal(deepspeed={"zeroStage": 2, "offloadParams": True}), "deepspeed.offloadParams", "zeroStage 3"),
        (minimal(deepspeed={"zeroStage": 4}), "deepspeed.zeroStage", "<= 3"),
        (minimal(dataset={"evalSplit": 0.2, "evalUri": "s3://data/e.jsonl"}), "dataset.evalSplit", "not both"),
        (minimal(output={"export": "merged"}), "output.export", "method 'lora'"),
        (minimal(training={"lr": 1}), "training.lr", "unknown field"),
        (minimal(checkpoint={"keep": 0}), "checkpoint.keep", ">= 1"),
        (minimal(metrics={"pushgateway": "gateway"}), "metrics.pushgateway", "URL"),
        (
            minimal(training={"lora": {"targetModules": "c_attn"}, "method": "lora"}),
            "training.lora.targetModules",
            "list",
        ),
    ],
)
def test_bad_config_names_the_field(data: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    assert caught.value.field_path == field
    assert str(caught.value).startswith(f"{field}: ")
    assert words in str(caught.value)


def test_unreadable_and_malformed_files_name_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{\n  "model": {\n    "uri": \n}')
    with pytest.raises(ConfigError, match=r"bad\.json:4: not valid JSON"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "bad.yaml").write_text("model:\n  uri: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:3: not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_every_setting_is_documented() -> None:
    rows = describe_fields(TrainerConfig)
    paths = {path for path, _, _ in rows}
    assert {"training.learningRate", "checkpoint.gracePeriodSeconds", "training.lora.r"} <= paths
    assert [path for path, _, text in rows if not text] == []


def test_config_module_imports_without_torch() -> None:
    code = "import sys, finetune_trainer.config, finetune_trainer.exit_codes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "False"

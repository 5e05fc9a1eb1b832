"""Factories for the trainer's unit tests: the smallest valid trainer config, with sections merged in."""

from __future__ import annotations

from typing import Any

from finetune_trainer.config import TrainerConfig, config_from_dict

MINIMAL: dict[str, dict[str, Any]] = {
    "model": {"uri": "s3://models/tiny"},
    "dataset": {"uri": "s3://data/train.jsonl"},
    "output": {"uri": "s3://out/run"},
    "training": {"maxSteps": 10},
}


def config_dict(**sections: Any) -> dict[str, Any]:
    """MINIMAL with each given section's keys merged over the section's own (a new section is added)."""
    data: dict[str, Any] = {key: dict(value) for key, value in MINIMAL.items()}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return data


def make_config(**sections: Any) -> TrainerConfig:
    return config_from_dict(config_dict(**sections))

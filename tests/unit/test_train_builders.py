"""The trainer's pure builders: DeepSpeed config, precision, LoRA targets, early stopping, as tables."""

from __future__ import annotations

from typing import Any

import pytest
import trainer_factories

from finetune_trainer.config import ConfigError, TrainerConfig
from finetune_trainer.train import (
    EarlyStoppingCallback,
    build_deepspeed_config,
    default_lora_targets,
    resolve_precision,
    uses_conv1d,
)


def make_config(**sections: Any) -> TrainerConfig:
    training = {"batchSize": 4, "gradientAccumulationSteps": 2, **sections.pop("training", {})}
    return trainer_factories.make_config(training=training, **sections)


@pytest.mark.parametrize(
    ("deepspeed", "precision", "cuda", "expected_zero", "absent"),
    [
        ({"zeroStage": 0}, "fp32", False, {"stage": 0}, ["contiguous_gradients", "offload_optimizer"]),
        (
            {"zeroStage": 1},
            "fp32",
            False,
            {"stage": 1, "contiguous_gradients": True, "reduce_bucket_size": "auto"},
            ["overlap_comm"],
        ),
        ({"zeroStage": 2}, "bf16", True, {"stage": 2, "overlap_comm": True}, ["offload_optimizer"]),
        (
            {"zeroStage": 2, "offloadOptimizer": True},
            "fp32",
            False,
            {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}},
            ["offload_param"],
        ),
        (
            {"zeroStage": 3, "offloadOptimizer": True, "offloadParams": True},
            "bf16",
            True,
            {
                "stage": 3,
                "stage3_gather_16bit_weights_on_model_save": True,
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                "offload_optimizer": {"device": "cpu", "pin_memory": True},
                "offload_param": {"device": "cpu", "pin_memory": True},
            },
            [],
        ),
    ],
)
def test_zero_section_follows_the_config(
    deepspeed: dict[str, Any], precision: str, cuda: bool, expected_zero: dict[str, Any], absent: list[str]
) -> None:
    ds = build_deepspeed_config(make_config(deepspeed=deepspeed), 4, precision=precision, cuda=cuda)

    zero = ds["zero_optimization"]
    assert {key: zero[key] for key in expected_zero} == expected_zero
    assert not set(absent) & set(zero)


def test_batch_sizes_are_explicit_and_optimizer_values_left_to_hf() -> None:
    ds = build_deepspeed_config(make_config(), 3, precision="fp32", cuda=False)

    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 4 * 2 * 3
    assert ds["gradient_clipping"] == "auto"
    # HF's AdamW and scheduler unless the optimizer is offloaded (no DeepSpeed compile on the common path).
    assert "optimizer" not in ds and "scheduler" not in ds


def test_offloaded_optimizer_uses_deepspeeds_adam_with_auto_values() -> None:
    ds = build_deepspeed_config(
        make_config(deepspeed={"zeroStage": 2, "offloadOptimizer": True}), 1, precision="fp32", cuda=False
    )

    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
    }


@pytest.mark.parametrize("load_universal", [False, True])
def test_checkpoints_are_node_local_and_universal_only_when_resuming_from_a_converted_one(load_universal: bool) -> None:
    ds = build_deepspeed_config(make_config(), 2, precision="fp32", cuda=False, load_universal=load_universal)

    expected = {"use_node_local_storage": True, **({"load_universal": True} if load_universal else {})}
    assert ds["checkpoint"] == expected


@pytest.mark.parametrize(
    ("precision", "bf16", "fp16"),
    [("fp32", None, None), ("bf16", {"enabled": True}, None), ("fp16", None, True)],
)
def test_precision_sections(precision: str, bf16: dict[str, bool] | None, fp16: bool | None) -> None:
    ds = build_deepspeed_config(make_config(), 1, precision=precision, cuda=True)

    assert ds.get("bf16") == bf16
    assert (ds.get("fp16") or {}).get("enabled") == fp16


@pytest.mark.parametrize(
    ("requested", "cuda", "bf16_supported", "expected"),
    [
        ("auto", False, False, "fp32"),
        ("auto", True, True, "bf16"),
        ("auto", True, False, "fp16"),
        ("bf16", False, False, "bf16"),
        ("fp32", True, True, "fp32"),
        ("fp16", True, False, "fp16"),
    ],
)
def test_resolve_precision(requested: str, cuda: bool, bf16_supported: bool, expected: str) -> None:
    assert resolve_precision(requested, cuda=cuda, bf16_supported=bf16_supported) == expected


@pytest.mark.parametrize(("requested", "cuda", "bf16_supported"), [("fp16", False, False), ("bf16", True, False)])
def test_precision_the_hardware_cannot_do_is_a_config_error(requested: str, cuda: bool, bf16_supported: bool) -> None:
    with pytest.raises(ConfigError) as error:
        resolve_precision(requested, cuda=cuda, bf16_supported=bf16_supported)

    assert error.value.field_path == "training.precision"


@pytest.mark.parametrize(
    ("model_type", "targets"),
    [("gpt2", ["c_attn"]), ("llama", ["q_proj", "v_proj"]), ("some-new-model", ["q_proj", "v_proj"])],
)
def test_default_lora_targets(model_type: str, targets: list[str]) -> None:
    assert default_lora_targets(model_type) == targets


def test_gpt2_attention_is_conv1d_and_needs_fan_in_fan_out() -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
    linear = torch.nn.Sequential()
    linear.add_module("q_proj", torch.nn.Linear(4, 4))

    assert uses_conv1d(gpt2, ["c_attn"])
    assert not uses_conv1d(linear, ["q_proj"])


@pytest.mark.parametrize(
    ("losses", "patience", "min_delta", "stops_after"),
    [
        ([3.0, 2.5, 2.0, 1.5], 1, 0.0, None),
        ([3.0, 2.5, 2.6, 2.7], 2, 0.0, 4),
        ([3.0, 2.95, 2.9, 2.85], 2, 0.1, 3),
        ([3.0, 3.0], 1, 0.0, 2),
    ],
)
def test_early_stopping(losses: list[float], patience: int, min_delta: float, stops_after: int | None) -> None:
    early = EarlyStoppingCallback(patience, min_delta)

    stopped = [i + 1 for i, loss in enumerate(losses) if early.observe(loss)]

    assert (stopped[0] if stopped else None) == stops_after

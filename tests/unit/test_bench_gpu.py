"""The GPU benchmark's arithmetic: peak FLOP/s by device name, model FLOPs per token, MFU."""

from __future__ import annotations

import pytest

from bench.bench_gpu import mfu, model_flops_per_token, peak_bf16_flops


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),  # the more specific name wins over "H100"
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("Tesla T4", None),  # not in the table: MFU is not guessed
    ],
)
def test_peak_flops_by_device_name(device: str, expected: float | None) -> None:
    assert peak_bf16_flops(device) == expected


def test_model_flops_per_token_follow_6n_plus_attention() -> None:
    # GPT-2 124M less its position table (124,439,808 - 786,432 in matmuls), 12 layers, 768 wide, 1024 tokens.
    flops = model_flops_per_token(123_653_376, 12, 768, 1024)

    assert flops == 6 * 123_653_376 + 12 * 12 * 768 * 1024
    assert flops / 1e9 == pytest.approx(0.855, abs=0.001)


@pytest.mark.parametrize(
    ("tokens_per_second", "peak", "devices", "expected"),
    [
        (400_000, 989e12, 1, 400_000 * 0.855e9 / 989e12),
        (800_000, 989e12, 2, 400_000 * 0.855e9 / 989e12),  # two GPUs at the same rate each: the same MFU
        (400_000, None, 1, None),
    ],
)
def test_mfu_divides_achieved_by_peak_flops_of_all_devices(
    tokens_per_second: float, peak: float | None, devices: int, expected: float | None
) -> None:
    result = mfu(tokens_per_second, 0.855e9, peak, devices)

    assert result == (pytest.approx(expected) if expected is not None else None)

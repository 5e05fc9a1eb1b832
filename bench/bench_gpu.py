"""GPU throughput and MFU of the trainer: bf16 + nccl + ZeRO-2 on a GPT-2 built from a config, one rank per GPU.

    python -m bench.bench_gpu [--layers 12] [--dim 768] [--seq 1024] [--batch 8] [--steps 60]

The model (GPT-2 124M's shape by default; the vocabulary is the locally trained tokenizer's) and packed chat data
are built locally and read through file:// URIs, so no S3 server shares the machine. ``finetune_trainer`` runs under
torchrun with one process per visible GPU; ``StepProbe`` times rank 0's steps after ``WARMUP_STEPS``, and rank 0's
``finetune_tokens_total`` gives the non-padding tokens. Printed: steps/s, tokens/s per GPU and in all, and MFU =
achieved model FLOP/s / the GPU's peak dense bf16 FLOP/s, with the model FLOPs per token of PaLM's appendix B:
6 N + 12 L d S (N: parameters that take part in matmuls, the tied embedding included and the position table not;
L layers, d width, S sequence length). Without CUDA the same path runs in fp32 on the CPUs with a small model
(``--layers 2 --dim 64 --seq 128`` unless given) and MFU is n/a: a smoke run of the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from bench.bench_trainer import WARMUP_STEPS, launch, print_table, window_rate

# Peak dense bf16 tensor-core FLOP/s by device-name fragment, from the vendors' data sheets (no sparsity).
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The data-sheet peak for a ``torch.cuda.get_device_name()``; None when the device is not in the table."""
    for fragment, flops in PEAK_BF16_FLOPS:
        if fragment in device_name:
            return flops
    return None


def model_flops_per_token(matmul_params: int, layers: int, width: int, seq_len: int) -> float:
    """Training FLOPs per token (forward and backward): 6 N + 12 L d S."""
    return 6.0 * matmul_params + 12.0 * layers * width * seq_len


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float | None, devices: int) -> float | None:
    """Model FLOPs utilisation of ``devices`` GPUs together; None without a known peak."""
    if peak_flops is None or devices <= 0:
        return None
    return tokens_per_second * flops_per_token / (peak_flops * devices)


def parse_args(argv: list[str] | None, cuda: bool) -> argparse.Namespace:
    """The benchmark's shape: GPT-2 124M's on CUDA, a small smoke model on the CPUs."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12 if cuda else 2)
    parser.add_argument("--dim", type=int, default=768 if cuda else 64)
    parser.add_argument("--heads", type=int, default=12 if cuda else 2)
    parser.add_argument("--seq", type=int, default=1024 if cuda else 128)
    parser.add_argument("--batch", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--steps", type=int, default=60 if cuda else 30)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument(
        "--compare", default="plain,0,3",
        help="beside ours at --zero-stage: 'plain' (a plain HF Trainer script) and/or other ZeRO stages; '' for none",
    )
    return parser.parse_args(argv)


def build_model(root: Path, args: argparse.Namespace, rows: list[dict[str, Any]]) -> tuple[Path, int, float]:
    """The GPT-2 from its config with a locally trained tokenizer: its folder, parameter count and FLOPs/token."""
    from transformers import AutoModelForCausalLM

    from finetune_trainer.testing import build_tiny_model, generic_corpus

    texts = generic_corpus(2000) + [m["content"] for r in rows[:2000] for m in r["messages"]]
    model_dir = build_tiny_model(
        root / "model",
        texts=texts,
        vocab_size=8192,
        n_layer=args.layers,
        n_embd=args.dim,
        n_head=args.heads,
        n_positions=args.seq,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    total = sum(p.numel() for p in model.parameters())
    positions = model.transformer.wpe.weight.numel()  # a lookup, not a matmul
    del model
    return model_dir, total, model_flops_per_token(total - positions, args.layers, args.dim, args.seq)


def trainer_config(root: Path, model_dir: Path, args: argparse.Namespace, cuda: bool) -> dict[str, Any]:
    """Packed chat through file:// URIs, checkpoints never (they are not what is measured)."""
    from localcluster.seaweedfs import free_ports

    return {
        "model": {"uri": f"file://{model_dir}"},
        "dataset": {"uri": f"file://{root}/data/chat.jsonl", "format": "chat", "evalSplit": 0.01},
        "output": {"uri": f"file://{root}/out"},
        "training": {
            "maxSteps": args.steps,
            "batchSize": args.batch,
            "maxSeqLength": args.seq,
            "packing": True,
            "learningRate": 3e-4,
            "logEvery": 10,
            "scheduler": "constant",
            "precision": "bf16" if cuda else "fp32",
        },
        "deepspeed": {"zeroStage": args.zero_stage},
        "checkpoint": {"everyMinutes": 10080},
        "metrics": {"port": free_ports(1)[0]},
        "local": {"cacheDir": str(root / "cache"), "workDir": str(root / "work")},
    }


def run_case(root: Path, model_dir: Path, args: argparse.Namespace, case: tuple[str, int], env: dict[str, str],
             devices: int, cuda: bool) -> tuple[float, float]:
    """(steps/s, rank-0 tokens/s) of one worker ("ours" or "plain") at one ZeRO stage."""
    mode, stage = case
    config = trainer_config(root, model_dir, argparse.Namespace(**{**vars(args), "zero_stage": stage}), cuda)
    config_path = root / f"config-{mode}-z{stage}.json"
    config_path.write_text(json.dumps(config))
    probe = launch(mode, config_path, root / f"gpu-{mode}-z{stage}.probe", env, nproc=devices)
    return window_rate(probe)


def main(argv: list[str] | None = None) -> int:
    import torch

    from finetune_trainer.testing import toy_chat_rows

    cuda = torch.cuda.is_available()
    args = parse_args(argv, cuda)
    devices = torch.cuda.device_count() if cuda else 1
    name = torch.cuda.get_device_name(0) if cuda else "CPU"
    # Enough packed rows for every step on every rank, with some to spare.
    rows = toy_chat_rows(max(2000, args.steps * args.batch * devices * args.seq // 40), seed=5)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # The repo first, then whatever the caller set (a venv-less machine finds the packages that way).
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")])
        ),
    }
    # Ours at the asked stage, a plain HF Trainer script on the same batches (the overhead), then the other stages.
    cases = [("ours", args.zero_stage)]
    for item in filter(None, args.compare.split(",")):
        case = ("plain", args.zero_stage) if item == "plain" else ("ours", int(item))
        if case not in cases:
            cases.append(case)
    rates: dict[tuple[str, int], tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        root = Path(tmp)
        (root / "data").mkdir()
        (root / "data" / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        model_dir, total, flops_per_token = build_model(root, args, rows)
        for case in cases:
            rates[case] = run_case(root, model_dir, args, case, env, devices, cuda)

    peak = peak_bf16_flops(name) if cuda else None
    baseline = rates[cases[0]][0]
    table = []
    for (mode, stage), (steps_per_second, rank0_tokens_per_second) in rates.items():
        # The plain script has no token counter; it sees the same packed batches as ours, so the same tokens per step.
        per_rank = rank0_tokens_per_second if mode == "ours" else rates[cases[0]][1] * steps_per_second / baseline
        utilisation = mfu(per_rank * devices, flops_per_token, peak, devices)
        table.append(
            (
                f"{'ours' if mode == 'ours' else 'plain HF Trainer'}, ZeRO-{stage}",
                f"{steps_per_second:.2f}",
                f"{per_rank:.0f}",
                f"{per_rank * devices:.0f}",
                f"{utilisation:.1%}" if utilisation is not None else "n/a",
                f"{baseline / steps_per_second:.3f}",
            )
        )
    print_table(
        f"GPU path: {devices} x {name}, GPT-2 {args.layers}x{args.dim} ({total / 1e6:.1f} M parameters), "
        f"seq {args.seq}, batch {args.batch}/rank, packed chat, "
        f"{'bf16 + nccl' if cuda else 'fp32 + gloo (no CUDA: smoke run)'}; steps {WARMUP_STEPS}-{args.steps}; "
        f"model {flops_per_token / 1e9:.3f} GFLOP/token",
        ("run", "steps/s", "tokens/s per rank", "tokens/s", "MFU", f"ours ZeRO-{args.zero_stage} ÷ this"),
        table,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

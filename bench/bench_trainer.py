"""Trainer benchmarks on CPU: P1 overhead vs a plain HF Trainer, P2 packing vs padding, P4 steps/s during uploads.

    python -m bench.bench_trainer          # builds a tiny GPT-2 and chat data, runs each case under torchrun

Every case runs 2 ranks (``torchrun --nproc_per_node 2``, ZeRO-2, fp32 on CPU) on the same model, data and seed, and
is timed in-process by ``StepProbe``, a TrainerCallback recording rank 0's time at every step end; the first
``WARMUP_STEPS`` steps are left out (DeepSpeed set-up, allocator warm-up) and rates come from median step times
(the machine is shared: a burst of someone else's load must not decide a ratio).

- P1: steady-state tokens/s of ``finetune_trainer.train.run`` (all its callbacks: metrics, the per-step control
  all_reduce, checkpoint cadence, token counting) against a plain script (HF ``Trainer`` with the same arguments,
  DeepSpeed config and batches, no callbacks). Both see identical batches, so the tokens/s ratio is the steps/s
  ratio. Runs alternate and the median of ``REPEATS`` pairs is reported. Goal >= 0.98.
- P2: non-padding tokens/s (rank 0's ``finetune_tokens_total``) with packing against padded batches, on chat rows of
  very different lengths. Goal >= 1.5x.
- P4: median step time while a checkpoint upload (or its manifest commit) is in flight (checkpoints every 10 steps
  to SeaweedFS, the local S3) against a run without checkpoints; steps that include the synchronous local save or
  an evaluation are left out. A bigger GPT-2 (4 layers, 256 dims) makes each upload span several steps. With
  1 rank one core is free for the upload, as on a GPU node; with 2 ranks training holds both cores, and the S3
  server (whose CPU time for the uploads is printed; about 4x the client's) takes its share from training. The
  median ratio of ``P4_REPEATS`` alternating pairs is reported. Goal >= 0.95.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

WARMUP_STEPS = 20
REPEATS = 5
P4_REPEATS = 3
NPROC = 2
BATCH = 8


class StepProbe(TrainerCallback):
    """Rank 0's wall time at every step end, upload activity per step, and token counts at the window's edges."""

    def __init__(self, out: Path, start: int, metrics_url: str | None = None) -> None:
        self.out = out
        self.start = start
        self.metrics_url = metrics_url
        self.times: dict[int, float] = {}
        self.busy_begin: dict[int, bool] = {}
        self.busy_end: dict[int, bool] = {}
        self.saved: list[int] = []
        self.evaluated: list[int] = []
        self.tokens: dict[int, float] = {}

    @staticmethod
    def _uploading() -> bool:
        return any(t.name.startswith(("upload-step-", "commit-step-")) for t in threading.enumerate())

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            self.busy_begin[state.global_step + 1] = self._uploading()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        step = state.global_step
        self.times[step] = time.perf_counter()
        self.busy_end[step] = self._uploading()
        if self.metrics_url and step in (self.start, state.max_steps):
            self.tokens[step] = _scrape_counter(self.metrics_url, "finetune_tokens_total")

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.saved.append(state.global_step)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.evaluated.append(state.global_step)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            self.out.write_text(
                json.dumps(
                    {
                        "start": self.start,
                        "end": state.max_steps,
                        "times": self.times,
                        "busyBegin": self.busy_begin,
                        "busyEnd": self.busy_end,
                        "saved": self.saved,
                        "evaluated": self.evaluated,
                        "tokens": self.tokens,
                    }
                )
            )


def _scrape_counter(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return float("nan")


# --- workers (one per rank, started by torchrun) ----------------------------------------------------------------


def worker_ours(config_path: Path, probe_path: Path) -> int:
    import torch.distributed as dist

    from finetune_trainer.config import load_config
    from finetune_trainer.metrics import bind_address
    from finetune_trainer.train import run

    config = load_config(config_path)
    url = f"http://{bind_address()}:{config.metrics.port}/metrics"
    callbacks = [StepProbe(probe_path, WARMUP_STEPS, url)]
    profile_to = os.environ.get("BENCH_PROFILE")
    if profile_to and os.environ.get("RANK", "0") == "0":
        # Where rank 0's time goes (the calls that wait on the GPU show up as the syncs they are).
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        outcome = profiler.runcall(run, config, extra_callbacks=callbacks)
        with open(profile_to, "w") as handle:
            pstats.Stats(profiler, stream=handle).sort_stats("cumulative").print_stats(60)
            pstats.Stats(profiler, stream=handle).sort_stats("tottime").print_stats(40)
    else:
        outcome = run(config, extra_callbacks=callbacks)
    if dist.is_initialized():
        dist.destroy_process_group()
    return outcome.code


def worker_plain(config_path: Path, probe_path: Path) -> int:
    """What a user would write by hand: HF Trainer, the same arguments, batches and DeepSpeed config.

    On a GPU it runs as ours does there: nccl, the config's precision (bf16 in bench_gpu), one device per rank.
    """
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer
    from transformers import TrainingArguments as Args

    from finetune_trainer.config import load_config
    from finetune_trainer.data_store import build_datasets
    from finetune_trainer.storage import pull_model
    from finetune_trainer.train import DTYPES, build_deepspeed_config, resolve_precision

    config = load_config(config_path)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_dir = pull_model(config.model.uri, config.local.cacheDir, local_rank=local_rank)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = build_datasets(config, tokenizer, local_rank=local_rank)
    t = config.training
    cuda = torch.cuda.is_available()
    precision = resolve_precision(t.precision, cuda=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported())
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    args = Args(
        output_dir=str(Path(config.local.workDir) / "plain"),
        use_cpu=not cuda,
        ddp_backend="nccl" if cuda else "gloo",
        deepspeed=build_deepspeed_config(config, world, precision=precision, cuda=cuda),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        per_device_train_batch_size=t.batchSize,
        gradient_accumulation_steps=t.gradientAccumulationSteps,
        learning_rate=t.learningRate,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmupRatio,
        max_steps=t.maxSteps or -1,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logEvery,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[precision])
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data.train,
        data_collator=data.collator,
        callbacks=[StepProbe(probe_path, WARMUP_STEPS)],
    )
    trainer.train()
    dist.destroy_process_group()
    return 0


# --- the orchestrator -----------------------------------------------------------------------------------------


def prepare(root: Path) -> dict[str, str]:
    from finetune_trainer.testing import build_tiny_model, generic_corpus, toy_chat_rows

    rows = toy_chat_rows(3000, seed=3)
    (root / "store" / "data").mkdir(parents=True)
    (root / "store" / "data" / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = generic_corpus(500) + [m["content"] for r in rows[:500] for m in r["messages"]]
    build_tiny_model(root / "store" / "model", texts=texts)
    # P4's checkpoints must take a while to upload (~70 MB: weights, DeepSpeed module copy, Adam states).
    build_tiny_model(root / "store" / "model-p4", texts=texts, n_layer=4, n_embd=256, n_head=4)
    return {
        "model": f"file://{root}/store/model",
        "model-p4": f"file://{root}/store/model-p4",
        "data": f"file://{root}/store/data/chat.jsonl",
    }


def write_config(root: Path, name: str, uris: dict[str, str], port: int, **sections: dict[str, Any]) -> Path:
    config: dict[str, Any] = {
        "model": {"uri": uris["model"]},
        "dataset": {"uri": uris["data"], "format": "chat", "evalSplit": 0.02},
        "output": {"uri": f"file://{root}/out/{name}"},
        "training": {
            "maxSteps": 160,
            "batchSize": BATCH,
            "maxSeqLength": 128,
            "learningRate": 0.001,
            "logEvery": 10,
            "scheduler": "constant",
        },
        "deepspeed": {"zeroStage": 2},
        "checkpoint": {"everyMinutes": 10080},
        "metrics": {"port": port},
        "local": {"cacheDir": str(root / "cache"), "workDir": str(root / "work" / name)},
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    path = root / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def launch(mode: str, config: Path, probe: Path, env: dict[str, str], nproc: int = NPROC) -> dict[str, Any]:
    from localcluster.seaweedfs import free_ports

    (master_port,) = free_ports(1)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master-port={master_port}",
        "-m",
        "bench.bench_trainer",
        "--worker",
        mode,
        "--config",
        str(config),
        "--probe",
        str(probe),
    ]
    log = probe.with_suffix(".log")
    with log.open("w") as handle:
        code = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False).returncode
    if code != 0:
        # The log lives in a temporary folder that is gone once the caller returns: show its end now.
        raise RuntimeError(f"{mode} run failed ({code}); end of {log}:\n{log.read_text(errors='replace')[-4000:]}")
    return dict(json.loads(probe.read_text()))


def window_rate(probe: dict[str, Any]) -> tuple[float, float]:
    """(steps/s, rank-0 tokens/s) in the window; tokens NaN when not measured.

    Steps/s is 1 / the median step time: on a machine shared with other work a burst of load stretches a few steps,
    which a median ignores and a mean over the window does not. Tokens per step are averaged over the window.
    """
    times = {int(k): v for k, v in probe["times"].items()}
    start, end = probe["start"], probe["end"]
    durations = [times[s] - times[s - 1] for s in range(start + 1, end + 1) if s - 1 in times and s in times]
    steps_per_second = 1 / statistics.median(durations)
    tokens = {int(k): v for k, v in probe["tokens"].items()}
    tokens_per_step = (tokens[end] - tokens[start]) / (end - start) if tokens else float("nan")
    return steps_per_second, tokens_per_step * steps_per_second


def upload_split(probe: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Step durations with an upload in flight for the whole step, and with nothing in flight at all."""
    times = {int(k): v for k, v in probe["times"].items()}
    begin = {int(k): v for k, v in probe["busyBegin"].items()}
    end = {int(k): v for k, v in probe["busyEnd"].items()}
    disturbed = {s + 1 for s in probe["saved"]} | {s + 1 for s in probe["evaluated"]}
    busy: list[float] = []
    quiet: list[float] = []
    for step in range(probe["start"] + 1, probe["end"] + 1):
        if step in disturbed or step - 1 not in times:
            continue
        duration = times[step] - times[step - 1]
        if begin.get(step) and end.get(step):
            busy.append(duration)
        elif not begin.get(step) and not end.get(step):
            quiet.append(duration)
    return busy, quiet


def process_tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its direct children, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0.0
    for member in [pid, *map(int, children)]:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def print_table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def main() -> None:
    # `python -m bench.bench_trainer p2 p4` runs only those cases.
    cases = {a.lower() for a in sys.argv[1:] if a.lower() in ("p1", "p2", "p4")} or {"p1", "p2", "p4"}

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # The repo first, then whatever the caller set (a venv-less machine finds the packages that way).
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")])
        ),
    }
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        root = Path(tmp)
        uris = prepare(root)
        print(f"tiny GPT-2 (2 layers, 64 dims), {NPROC} ranks, ZeRO-2, CPU, batch {BATCH}/rank", flush=True)

        if "p1" in cases:
            run_p1(root, uris, env)
        if "p2" in cases:
            run_p2(root, uris, env)
        if "p4" in cases:
            run_p4(root, uris, env)


def run_p1(root: Path, uris: dict[str, str], env: dict[str, str]) -> None:
    from localcluster.seaweedfs import free_ports

    pairs: list[tuple[float, float, float, float]] = []
    rates: dict[str, tuple[float, float]] = {}
    for repeat in range(REPEATS):
        port = free_ports(1)[0]
        ours_cfg = write_config(root, f"p1-ours-{repeat}", uris, port)
        plain_cfg = write_config(root, f"p1-plain-{repeat}", uris, port)
        # Which goes first alternates, so a drift in the machine's load does not favour one side.
        for mode in ("ours", "plain") if repeat % 2 == 0 else ("plain", "ours"):
            config = ours_cfg if mode == "ours" else plain_cfg
            rates[mode] = window_rate(launch(mode, config, root / f"p1-{mode}-{repeat}.probe", env))
        ours, plain = rates["ours"], rates["plain"]
        pairs.append((ours[0], plain[0], ours[1], ours[1] * plain[0] / ours[0]))
        print(f"  P1 run {repeat + 1}: ours {ours[0]:.2f} steps/s, plain {plain[0]:.2f} steps/s", flush=True)
    ratios = [o / p for o, p, _, _ in pairs]
    best = pairs[ratios.index(statistics.median_low(ratios))]
    print_table(
        f"P1 trainer overhead (median of {REPEATS} alternating pairs; steps {WARMUP_STEPS}-160)",
        ("trainer", "steps/s", "tokens/s (rank 0)", "ratio"),
        [
            ("plain HF Trainer", f"{best[1]:.2f}", f"{best[3]:.0f}", "1.00"),
            ("finetune_trainer", f"{best[0]:.2f}", f"{best[2]:.0f}", f"{statistics.median(ratios):.3f}"),
        ],
    )


def run_p2(root: Path, uris: dict[str, str], env: dict[str, str]) -> None:
    from localcluster.seaweedfs import free_ports

    results = {}
    for packing in (False, True):
        name = f"p2-{'packed' if packing else 'padded'}"
        config = write_config(
            root, name, uris, free_ports(1)[0], training={"packing": packing, "maxSeqLength": 256, "maxSteps": 120}
        )
        results[packing] = window_rate(launch("ours", config, root / f"{name}.probe", env))
    padded, packed = results[False], results[True]
    print_table(
        "P2 packing vs padding, variable-length chat (maxSeqLength 256; non-pad tokens/s of rank 0)",
        ("batches", "steps/s", "non-pad tokens/s", "ratio"),
        [
            ("padded", f"{padded[0]:.2f}", f"{padded[1]:.0f}", "1.00"),
            ("packed", f"{packed[0]:.2f}", f"{packed[1]:.0f}", f"{packed[1] / padded[1]:.2f}"),
        ],
    )


def run_p4(root: Path, uris: dict[str, str], env: dict[str, str]) -> None:
    from localcluster.seaweedfs import SeaweedFS, free_ports

    cases = (("none", {"everyMinutes": 10080}), ("every10", {"everySteps": 10, "keep": 2}))
    rows = []
    with SeaweedFS(root / "seaweedfs") as s3:
        s3.create_bucket("bench")
        # In production the S3 endpoint runs elsewhere; here it shares the 2 cores, so it only gets what training
        # leaves (this measures the trainer's upload client, not the server stealing a core).
        server = s3._process.pid  # type: ignore[union-attr]
        os.setpriority(os.PRIO_PGRP, server, 19)
        for nproc in (1, 2):
            pairs: list[tuple[float, float]] = []
            counts: dict[str, int] = {}
            server_cpu: dict[str, float] = {"none": 0.0, "every10": 0.0}
            for repeat in range(P4_REPEATS):
                rates: dict[str, float] = {}
                # Which case goes first alternates, so a drift in the machine's load does not favour one side.
                for case, checkpoint in cases if repeat % 2 == 0 else tuple(reversed(cases)):
                    name = f"p4-{nproc}-{case}-{repeat}"
                    config = write_config(
                        root,
                        name,
                        uris,
                        free_ports(1)[0],
                        model={"uri": uris["model-p4"]},
                        output={"uri": f"s3://bench/{name}"},
                        training={"maxSteps": 100},
                        checkpoint=checkpoint,
                        storage={"forcePathStyle": True},
                    )
                    cpu_before = process_tree_cpu_seconds(server)
                    probe = launch("ours", config, root / f"{name}.probe", {**env, **s3.env()}, nproc)
                    server_cpu[case] += process_tree_cpu_seconds(server) - cpu_before
                    busy, quiet = upload_split(probe)
                    durations = quiet if case == "none" else busy
                    counts[case] = counts.get(case, 0) + len(durations)
                    rates[case] = 1 / statistics.median(durations)
                pairs.append((rates["none"], rates["every10"]))
                ratio = rates["every10"] / rates["none"]
                print(f"  P4 {nproc} rank(s), run {repeat + 1}: ratio {ratio:.3f}", flush=True)
            ratios = [busy / quiet for quiet, busy in pairs]
            quiet_rate, busy_rate = pairs[ratios.index(statistics.median_low(ratios))]
            uploads_cpu = (server_cpu["every10"] - server_cpu["none"]) / P4_REPEATS
            label = f"{nproc} rank(s), {'1 core idle' if nproc == 1 else 'no core idle'}"
            rows.append((label, "no checkpoints", str(counts["none"]), f"{quiet_rate:.2f}", "1.00", "", "-"))
            rows.append(
                (
                    "",
                    "upload in flight",
                    str(counts["every10"]),
                    f"{busy_rate:.2f}",
                    f"{statistics.median(ratios):.3f}",
                    f"{min(ratios):.3f}-{max(ratios):.3f}",
                    f"{uploads_cpu:.1f}",
                )
            )
    print_table(
        f"P4 steps/s while a checkpoint uploads vs a run without checkpoints (median of {P4_REPEATS} alternating "
        "pairs; GPT-2 4x256, ~70 MB checkpoints every 10 steps to SeaweedFS on the same 2 cores; save and eval "
        "steps left out)",
        ("run", "steps", "count", "median steps/s", "ratio", "pairs", "S3 server CPU s per run for the uploads"),
        rows,
    )
    print(
        "The last column is the local S3 server's CPU time in a run with checkpoints minus a run without: work "
        "that lands on the training cores here and on another machine in a cluster."
    )


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=("ours", "plain"), required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--probe", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.worker == "ours":
        return worker_ours(args.config, args.probe)
    return worker_plain(args.config, args.probe)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(worker_main(sys.argv[1:]))
    main()

"""Data preparation at 10 k, 100 k and 1 M chat rows: once per node into memory maps, against every rank reading it.

    python -m bench.bench_data [--rows 10000,100000,1000000] [--seq 512]

Generated chats (``toy_chat_rows``, about 500 bytes a row) in one JSONL file, a locally trained GPT-2 tokenizer of
8,192 tokens, the chat format with packing. Side by side, each in a fresh process:
- ``in-memory``: the pipeline every rank ran before preparation existed (every row read, tokenized and packed into
  Python lists and numpy arrays in the rank), loaded from this repository's history at ``BASELINE_REVISION``;
- ``prepare``: a node's first preparation (``build_datasets`` with an empty cache), with a process per core;
- ``cached``: a rank's start when the prepared data is in the node cache (what a restart or a resume pays), and
  that rank's memory after reading 2,000 items: its private (anonymous) memory, and the file pages it mapped, which
  the page cache shares between the ranks of a node.
Peak RSS is the process's high-water mark (for ``prepare``, the largest of it and its workers). For the largest size
the trainer itself then runs twice with two ranks (``bench_trainer``'s worker, 2 steps): a first start, which
prepares the data, and a restart on the same node cache, each timed from the launch to the end of the first step;
and two more nodes share through ``dataset.cache`` on a local SeaweedFS: one prepares and uploads, the other fetches.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASELINE_REVISION = "e85cbcc4463a3d1bc26e7ca23b14c21df3db62ef"
GOALS = {"cached_s": 2.0, "rank_mb": 200.0, "speedup": 1.8}


def _peak_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def _memory_mb() -> tuple[float, float]:
    """(anonymous, file-backed) resident memory of this process."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["RssAnon"].split()[0]) / 1024, int(fields["RssFile"].split()[0]) / 1024


def _config(work: Path, seq: int, node: str = "cache", shared: str | None = None) -> Any:
    from finetune_trainer.config import config_from_dict

    return config_from_dict({
        "model": {"uri": f"file://{work}/model"},
        "dataset": {"uri": f"file://{work}/chat.jsonl", "format": "chat", **({"cache": shared} if shared else {})},
        "output": {"uri": f"file://{work}/out"},
        "training": {"maxSteps": 1, "maxSeqLength": seq, "packing": True},
        "storage": {"forcePathStyle": True},
        "local": {"cacheDir": str(work / node), "workDir": str(work / "work")},
    })


def _baseline_module() -> Any:
    shown = subprocess.run(["git", "-C", str(REPO), "show", f"{BASELINE_REVISION}:trainer/finetune_trainer/data.py"],
                           capture_output=True, text=True, check=False)
    if shown.returncode != 0:
        raise RuntimeError(f"the in-memory baseline is read from git history at {BASELINE_REVISION}, which this clone "
                           f"lacks (a shallow clone? `git fetch --unshallow`): {shown.stderr.strip()}")
    source = shown.stdout
    path = Path(tempfile.mkdtemp(prefix="bench-data-")) / "baseline_data.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_data", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the module runs
    spec.loader.exec_module(module)
    return module


def measure(mode: str, work: Path, seq: int, shared: str | None = None) -> dict[str, float]:
    """One measurement in this process (run by ``main`` in a fresh one); ``share`` and ``fetch`` are two more nodes
    that use ``shared`` as dataset.cache."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    config = _config(work, seq, {"share": "node-a", "fetch": "node-b"}.get(mode, "cache"), shared)
    files = [work / "chat.jsonl"]
    anon_before, file_before = _memory_mb()
    started = time.perf_counter()
    if mode == "in-memory":
        data = _baseline_module().build_datasets(config, tokenizer, train_files=files)
    else:
        from finetune_trainer.data_store import build_datasets

        data = build_datasets(config, tokenizer, train_files=files)
    seconds = time.perf_counter() - started
    result = {"seconds": seconds, "peak_mb": max(_peak_mb(), _peak_mb(resource.RUSAGE_CHILDREN)),
              "rows": data.stats.rows, "sequences": len(data.train)}
    if mode == "cached":
        for index in range(min(2000, len(data.train))):
            data.train[(index * 7919) % len(data.train)]
    anon, mapped = _memory_mb()
    # What holding the data costs the rank beyond its imports and tokenizer: private memory, and mapped file pages.
    result["data_mb"], result["file_mb"] = anon - anon_before, mapped - file_before
    return result


def _run(mode: str, work: Path, seq: int, shared: str | None = None, env: dict[str, str] | None = None
         ) -> dict[str, float]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **(env or {}), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-m", "bench.bench_data", "--measure", mode, "--work", str(work),
                           "--seq", str(seq), *(["--shared", shared] if shared else [])],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def restart_to_first_step(work: Path, seq: int) -> tuple[float, float]:
    """Seconds from launching two ranks to their first step: a first start (preparing) and a restart (cached)."""
    from bench.bench_trainer import launch
    from localcluster.seaweedfs import free_ports

    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": path}
    seconds = []
    for attempt in ("first", "restart"):
        config = {
            "model": {"uri": f"file://{work}/model"},
            "dataset": {"uri": f"file://{work}/chat.jsonl", "format": "chat", "evalSplit": 0.001},
            "output": {"uri": f"file://{work}/out-{attempt}"},
            "training": {"maxSteps": 2, "batchSize": 2, "maxSeqLength": seq, "packing": True, "logEvery": 1},
            "checkpoint": {"everyMinutes": 10080},
            "metrics": {"port": free_ports(1)[0]},
            "local": {"cacheDir": str(work / "node-cache"), "workDir": str(work / f"work-{attempt}")},
        }
        (work / f"{attempt}.json").write_text(json.dumps(config))
        started = time.perf_counter()
        probe = launch("ours", work / f"{attempt}.json", work / f"{attempt}.probe", env, nproc=2)
        seconds.append(float(probe["times"]["1"]) - started)
    return seconds[0], seconds[1]


def _write_rows(path: Path, count: int) -> None:
    from finetune_trainer.testing import toy_chat_rows

    with path.open("w") as handle:
        for start in range(0, count, 50_000):
            rows = toy_chat_rows(min(50_000, count - start), seed=start)
            handle.write("".join(json.dumps(row) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="10000,100000,1000000")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shared", help=argparse.SUPPRESS)
    args = parser.parse_args(sys.argv[1:] if argv is None and __name__ == "__main__" else argv or [])
    if args.measure:
        print(json.dumps(measure(args.measure, args.work, args.seq, args.shared)))
        return 0

    from bench.bench_trainer import print_table
    from finetune_trainer.testing import build_tiny_model, generic_corpus, toy_chat_rows
    from localcluster.seaweedfs import SeaweedFS

    rows: list[tuple[str, ...]] = []
    starts: tuple[str, float, float] = ("", 0.0, 0.0)
    shared: tuple[str, float, float, float] = ("", 0.0, 0.0, 0.0)
    with tempfile.TemporaryDirectory(prefix="bench-data-") as scratch:
        base = Path(scratch)
        texts = generic_corpus(2000) + [m["content"] for r in toy_chat_rows(2000) for m in r["messages"]]
        build_tiny_model(base / "model", texts=texts, vocab_size=8192, n_positions=args.seq)
        for count in (int(n) for n in args.rows.split(",")):
            work = base / f"rows-{count}"
            work.mkdir()
            (work / "model").symlink_to(base / "model")
            _write_rows(work / "chat.jsonl", count)
            before = _run("in-memory", work, args.seq)
            cold = _run("prepare", work, args.seq)
            warm = _run("cached", work, args.seq)
            speedup = before["seconds"] / cold["seconds"]
            rows.append((
                f"{count:,}", f"{(work / 'chat.jsonl').stat().st_size / 1e6:.0f} MB",
                f"{before['seconds']:.1f} s, holds {before['data_mb']:.0f} MB",
                f"{cold['seconds']:.1f} s, peak {cold['peak_mb']:.0f} MB", f"{speedup:.2f}x",
                f"{warm['seconds']:.2f} s", f"{warm['data_mb']:.0f} MB + {warm['file_mb']:.0f} MB shared",
            ))
            if count == max(int(n) for n in args.rows.split(",")):
                first, restart = restart_to_first_step(work, args.seq)
                starts = (f"{count:,}", first, restart)
                with SeaweedFS(base / "s3") as server:
                    server.client().create_bucket(Bucket="bench")
                    share = _run("share", work, args.seq, "s3://bench/prepared", server.env())
                    fetch = _run("fetch", work, args.seq, "s3://bench/prepared", server.env())
                shared = (f"{count:,}", cold["seconds"], share["seconds"], fetch["seconds"])
            (work / "chat.jsonl").unlink()
    print_table(
        f"Data preparation, chat with packing at maxSeqLength {args.seq}, {os.cpu_count()} CPUs; goals: first "
        f"preparation >= {GOALS['speedup']}x the in-memory time, cached start <= {GOALS['cached_s']:.0f} s at 1 M "
        f"rows, a rank's private memory <= {GOALS['rank_mb']:.0f} MB",
        ("rows", "JSONL", "in-memory, per rank", "prepare, per node", "speed-up", "cached start",
         "rank data memory after 2,000 items"),
        rows,
    )
    print_table(
        f"Sharing through dataset.cache (SeaweedFS on this machine), {shared[0]} rows: each node preparing for itself, "
        "against one node preparing and uploading and another fetching",
        ("a node prepares for itself", "one prepares and uploads", "another fetches"),
        [(f"{shared[1]:.1f} s", f"{shared[2]:.1f} s", f"{shared[3]:.1f} s")],
    )
    print_table(
        f"Two trainer ranks on {starts[0]} rows, launch -> end of the first step (goal: restart <= 15 s)",
        ("first start (prepares)", "restart (prepared data cached)"),
        [(f"{starts[1]:.1f} s", f"{starts[2]:.1f} s")],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

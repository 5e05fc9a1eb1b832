"""P3, the S3 model pull: ``pull_model`` vs boto3's default ``download_file`` on a local SeaweedFS (goal >= 1.3x).

    python -m bench.bench_pull [--size-mb 256] [--rounds 3]

One random safetensors-sized object is uploaded with boto3's defaults (multipart, CRC32 checksums, as ``aws s3 cp``
or a training job would write it), then fetched ``--rounds`` times by each method, alternating which goes first.
``pull_model`` is timed whole: client creation, listing, HEADs, parallel ranged GETs and checksum verification,
into an emptied cache; boto3 reuses one client and verifies nothing. One untimed warm-up run of each comes
first; deleting the previous copy is not timed. The table shows medians, and the client's CPU seconds: on a
machine with few cores the local server competes for the same CPUs, so the client's CPU use bounds the gain.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from finetune_trainer.config import StorageConfig
from finetune_trainer.storage import pull_model
from localcluster.seaweedfs import SeaweedFS

GOAL = 1.3


def _cpu_seconds() -> float:
    """CPU time of this process, all threads; the server's is not included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=256, help="object size in MiB (>= 200 for the target)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    size = args.size_mb * 1024 * 1024

    with tempfile.TemporaryDirectory(prefix="bench-pull-") as scratch, SeaweedFS(Path(scratch) / "weed") as server:
        work = Path(scratch)
        os.environ.update(server.env())
        client = server.client()
        client.create_bucket(Bucket="bench")
        source = work / "model.safetensors"
        source.write_bytes(os.urandom(size))
        client.upload_file(str(source), "bench", "models/big/model.safetensors")
        client.put_object(Bucket="bench", Key="models/big/config.json", Body=b"{}")
        source.unlink()

        boto3_target = work / "boto3.bin"
        cache = work / "cache"

        def clean() -> None:
            boto3_target.unlink(missing_ok=True)
            shutil.rmtree(cache, ignore_errors=True)

        def boto3_default() -> None:
            client.download_file("bench", "models/big/model.safetensors", str(boto3_target))

        def finetune_pull() -> None:
            folder = pull_model("s3://bench/models/big", cache, StorageConfig(forcePathStyle=True), local_rank=0)
            assert (folder / "model.safetensors").stat().st_size == size

        methods = {"boto3 download_file (defaults)": boto3_default, "finetune_trainer pull_model": finetune_pull}
        timings: dict[str, list[float]] = {name: [] for name in methods}
        cpu: dict[str, list[float]] = {name: [] for name in methods}
        for method in methods.values():  # warm-up, untimed: imports, botocore's service model, connections
            clean()
            method()
        for round_number in range(args.rounds):
            order = list(methods) if round_number % 2 == 0 else list(reversed(methods))
            for name in order:
                clean()  # untimed: deleting the previous copy
                cpu_before = _cpu_seconds()
                started = time.perf_counter()
                methods[name]()
                timings[name].append(time.perf_counter() - started)
                cpu[name].append(_cpu_seconds() - cpu_before)
        clean()

    baseline = statistics.median(timings["boto3 download_file (defaults)"])
    print(
        f"\nS3 model pull: one {args.size_mb} MiB object from SeaweedFS on 127.0.0.1, {args.rounds} rounds "
        f"alternating, {os.cpu_count()} CPUs"
    )
    print(f"{'method':<34}{'median s':>10}{'MB/s':>10}{'ratio':>8}{'client CPU s':>14}   runs (s)")
    for name, runs in timings.items():
        median = statistics.median(runs)
        print(
            f"{name:<34}{median:>10.3f}{size / 1e6 / median:>10.1f}{baseline / median:>8.2f}"
            f"{statistics.median(cpu[name]):>14.3f}   " + " ".join(f"{r:.3f}" for r in runs)
        )
    ratio = baseline / statistics.median(timings["finetune_trainer pull_model"])
    print(f"goal: pull_model >= {GOAL:.2f}x boto3 -> {ratio:.2f}x {'met' if ratio >= GOAL else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

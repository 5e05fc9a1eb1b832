"""Runs every benchmark in turn (``make bench``); each prints its own ratio table."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = [
    "bench.bench_trainer",
    "bench.bench_pull",
    "bench.bench_data",
    "bench.bench_operator",
    "bench.bench_operator_scale",
    "bench.bench_tracking",
]


def main() -> int:
    selected = sys.argv[1:] or BENCHMARKS
    for name in selected:
        module = name if name.startswith("bench.") else f"bench.{name}"
        print(f"\n=== {module} ===", flush=True)
        importlib.import_module(module).main()
    return 0


if __name__ == "__main__":
    sys.exit(main())

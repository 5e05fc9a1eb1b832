"""Tracking benchmark on CPU: steps/s with MLflow tracking against a live server, with the server stopped for 20 s
mid-run, and without tracking, side by side in one run.

    python -m bench.bench_tracking [--repeats N]   # a real MLflow server (SQLite, artifacts in SeaweedFS)

Each case is the same 1-rank run of ``finetune_trainer.train.run`` (tiny GPT-2, ZeRO-2, fp32, metrics logged every
``LOG_EVERY`` steps) timed in-process by ``bench_trainer.StepProbe`` (rank 0's time at every step end; the first
``WARMUP_STEPS`` steps left out); rates are 1 / the median step time, so a burst of someone else's load on this
shared machine does not decide a ratio. In the outage case the server is stopped 5 s after the run logged its first
loss and started again 20 s later (its restart takes a while more: the table says how long), and the rates of the
steps that ended while it was stopped, and while it restarted (its start competes for the same cores here), are
shown on their own. The last column counts the loss points the server holds afterwards against the logging steps:
what was logged during the outage must arrive. Cases alternate (none, live, outage); each round's ratios are
against its own run without tracking, and the median round's are reported. Goal: ratios >= 0.98.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from bench.bench_trainer import WARMUP_STEPS, launch, prepare, print_table, write_config

MAX_STEPS = 3000
LOG_EVERY = 5
OUTAGE_S = 20.0


def median_rate(probe: dict[str, Any], inside: tuple[float, float] | None = None) -> tuple[float, int]:
    """(steps/s from the median step time, steps counted); ``inside`` keeps the steps that ended in that window."""
    times = {int(k): v for k, v in probe["times"].items()}
    disturbed = {s + 1 for s in probe["evaluated"]} | {s + 1 for s in probe["saved"]}
    durations = [
        times[s] - times[s - 1]
        for s in range(max(WARMUP_STEPS, 1) + 1, probe["end"] + 1)
        if s - 1 in times and s in times and s not in disturbed
        and (inside is None or inside[0] <= times[s] <= inside[1])
    ]
    return (1 / statistics.median(durations) if durations else float("nan")), len(durations)


def run_case(root: Path, uris: dict[str, str], env: dict[str, str], case: str, server: Any, n: int) -> dict[str, Any]:
    from localcluster.seaweedfs import free_ports

    name = f"{case}-{n}"
    experiment = f"bench-{uuid.uuid4().hex[:8]}"
    tracking = {} if case == "none" else {"mlflow": {"trackingUri": server.url, "experiment": experiment}}
    config = write_config(root, name, uris, free_ports(1)[0], training={"maxSteps": MAX_STEPS, "logEvery": LOG_EVERY},
                          tracking=tracking)
    outcome: dict[str, Any] = {}
    server_cpu = _server_cpu(server)
    worker = threading.Thread(target=lambda: outcome.update(launch("ours", config, root / f"{name}.probe", env, 1)))
    began = time.monotonic()
    worker.start()
    away: tuple[float, float] | None = None
    if case == "outage":
        while worker.is_alive() and not _first_loss(server, experiment):
            time.sleep(0.2)
        time.sleep(5)
        stopped = time.perf_counter()
        server.stop()
        time.sleep(OUTAGE_S)
        restarting = time.perf_counter()
        server.start()
        away = (stopped, restarting, time.perf_counter())
    worker.join()
    rate, steps = median_rate(outcome)
    result = {"case": case, "rate": rate, "steps": steps, "wall": time.monotonic() - began}
    if away is not None:
        # While stopped nothing else runs; while restarting, the server's own start competes for these cores.
        result["away_s"] = away[2] - away[0]
        result["stopped_rate"], result["stopped_steps"] = median_rate(outcome, (away[0], away[1]))
        result["restart_s"] = away[2] - away[1]
        result["restart_rate"], result["restart_steps"] = median_rate(outcome, (away[1], away[2]))
    # The server runs on these cores too (in a cluster it has its own): its CPU time is what it took from training.
    result["server_cpu_s"] = _server_cpu(server) - server_cpu if case == "live" else float("nan")
    if case != "none":
        # The run's last updates are sent while the worker exits (drained for at most 30 s).
        runs = server.runs(experiment)
        result["points"] = len(server.metric_history(runs[0]["info"]["run_id"], "loss")) if runs else 0
    return result


def _server_cpu(server: Any) -> float:
    from bench.bench_trainer import process_tree_cpu_seconds

    process = getattr(server, "_process", None)
    return process_tree_cpu_seconds(process.pid) if process is not None else float("nan")


def _first_loss(server: Any, experiment: str) -> bool:
    runs = server.runs(experiment)
    return bool(runs and server.metric_history(runs[0]["info"]["run_id"], "loss"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    # `python -m bench` passes its own arguments (benchmark names) through.
    args, _ = parser.parse_known_args(sys.argv[1:])
    from localcluster.mlflow import MlflowServer
    from localcluster.seaweedfs import SeaweedFS

    repo = Path(__file__).resolve().parent.parent
    # The ranks import this checkout's packages, whatever the virtualenv's editable install points at.
    path = [str(repo / part) for part in ("trainer", "operator", "client")] + [str(repo)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(path)}
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as tmp:
        root = Path(tmp)
        uris = prepare(root)
        with SeaweedFS(root / "s3") as s3, MlflowServer(root / "mlflow", s3) as server:
            print(f"tiny GPT-2, 1 rank, ZeRO-2, CPU, {MAX_STEPS} steps, loss logged every {LOG_EVERY}; MLflow "
                  f"{server.url} (started in {server.start_seconds:.0f} s)", flush=True)
            rounds: dict[str, list[dict[str, Any]]] = {"none": [], "live": [], "outage": []}
            for n in range(args.repeats):
                for case in rounds:
                    rounds[case].append(run_case(root, uris, env, case, server, n))
                    print(f"  round {n + 1} {case}: {json.dumps(rounds[case][-1], default=str)}", flush=True)
            report(rounds)


def report(rounds: dict[str, list[dict[str, Any]]]) -> None:
    """Each round's rates against that round's run without tracking; the median round's figures."""
    ratios = {case: [r["rate"] / base["rate"] for r, base in zip(results, rounds["none"], strict=True)]
              for case, results in rounds.items()}

    def median_round(case: str) -> tuple[dict[str, Any], float]:
        order = sorted(range(len(ratios[case])), key=lambda i: ratios[case][i])
        i = order[(len(order) - 1) // 2]
        return rounds[case][i], rounds["none"][i]["rate"]

    expected = MAX_STEPS // LOG_EVERY
    rows = []
    for case, label in (("none", "no tracking"), ("live", "tracking, live server"),
                        ("outage", f"tracking, server stopped {OUTAGE_S:.0f} s mid-run")):
        r, base = median_round(case)
        spread = f"{min(ratios[case]):.3f}-{max(ratios[case]):.3f}"
        rows.append((label, f"{r['rate']:.2f}", f"{r['rate'] / base:.3f}", spread, str(r["steps"]),
                     f"{r['points']}/{expected}" if "points" in r else "-",
                     f"{r['server_cpu_s']:.1f}" if case == "live" else "-"))
        if case == "outage":
            rows.append((f"  steps while it was stopped ({OUTAGE_S:.0f} s)", f"{r['stopped_rate']:.2f}",
                         f"{r['stopped_rate'] / base:.3f}", "", str(r["stopped_steps"]), "-", "-"))
            rows.append((f"  steps while it restarted ({r['restart_s']:.0f} s, on these cores)",
                         f"{r['restart_rate']:.2f}", f"{r['restart_rate'] / base:.3f}", "", str(r["restart_steps"]),
                         "-", "-"))
    print_table("Tracking: steps/s (median step time) against no tracking in the same round",
                ("run", "steps/s", "ratio", "rounds", "steps timed", "loss points in MLflow", "server CPU s"), rows)


if __name__ == "__main__":
    main()

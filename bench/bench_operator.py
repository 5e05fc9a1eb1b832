"""P5, the operator on the real control plane: FineTuneJob → pods latency, 200 jobs at once, RSS, API writes.

    python -m bench.bench_operator [--jobs 50] [--burst 200] [--nodes 2]

etcd, kube-apiserver and kube-controller-manager (``localcluster.controlplane``; no scheduler) and the operator
(``python -m finetune_operator`` with the chart's ServiceAccount and RBAC) run as separate processes, as in a
cluster; this process plays the user and the kubelet (it patches pod phases as the admin). Latency is from the
POST of a FineTuneJob to the watch event of its last pod.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import psutil

from localcluster.chart import install_chart
from localcluster.controlplane import ControlPlane
from localcluster.operator_process import OperatorProcess

REPO = pathlib.Path(__file__).resolve().parents[1]
JOBS = "/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs"
GOALS = {"p50": 0.050, "p99": 0.250, "burst": 15.0, "rss": 200.0}
WRITE_VERBS = ("create", "patch", "patch_status", "delete")


def _job(name: str, nodes: int) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "s3://models/tiny-gpt2"},
            "dataset": {"uri": "s3://datasets/support/train.jsonl"},
            "output": {"uri": f"s3://finetune-output/{name}"},
            "training": {"maxSteps": 60},
            "distributed": {"nodes": nodes},
            "resources": {"cpu": "2", "memory": "4Gi"},
            "storage": {"credentialsSecret": "s3-credentials"},
        },
    }


class Watch:
    """One watch stream; every event is handed to ``on_event`` with the time it arrived."""

    def __init__(self, session: aiohttp.ClientSession, url: str,
                 on_event: Callable[[str, dict[str, Any], float], None]) -> None:
        self.session, self.url, self.on_event = session, url, on_event
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        # A real API server answers a watch with a Status (429 while a new CRD's watch cache initialises) or ends
        # the stream after its request timeout: watch again, after the delay it asks for. A fresh watch replays
        # every object as ADDED, which the handlers take as a no-op.
        while True:
            async with self.session.get(self.url, params={"watch": "1"},
                                        timeout=aiohttp.ClientTimeout(total=None)) as response:
                retry_after = 0.2
                async for raw in response.content:
                    if not raw.strip():
                        continue
                    event = json.loads(raw)
                    # A Status instead of an event, or an ERROR event carrying one (410 Gone: watch again).
                    if "type" not in event or event["type"] == "ERROR":
                        event = event.get("object", event)
                        retry_after = float((event.get("details") or {}).get("retryAfterSeconds", 1))
                        break
                    self.on_event(event["type"], event["object"], time.perf_counter())
            await asyncio.sleep(retry_after)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


async def _until(check: Callable[[], bool], timeout: float, what: str, watches: list[Watch]) -> None:
    deadline = time.perf_counter() + timeout
    while not check():
        for watch in watches:
            if watch.task is not None and watch.task.done():
                raise RuntimeError(f"the watch of {watch.url} ended while waiting for {what}") from (
                    watch.task.exception())
        if time.perf_counter() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.002)


def _running() -> dict[str, Any]:
    """The trainer container's status as a kubelet reports it once started."""
    return {"name": "trainer", "ready": True, "restartCount": 0, "image": "trainer", "imageID": "",
            "state": {"running": {"startedAt": "2025-01-01T00:00:00Z"}}}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def _operator_metrics(text: str) -> dict[str, float]:
    """API requests by verb from the operator's Prometheus text."""
    values: dict[str, float] = {}
    for match in re.finditer(r'^finetune_operator_api_requests_total\{verb="(\w+)"\} ([0-9.e+]+)$', text, re.M):
        values[match.group(1)] = float(match.group(2))
    return values


Row = tuple[str, str, str, str]


class OperatorBench:
    """The measurements against one control plane and operator: this process plays the user and the kubelet."""

    goals = GOALS
    # Where the bench says every pod runs; nothing answers there, so the operator reads no progress.
    pod_ip = "10.0.0.1"

    def __init__(self, args: argparse.Namespace, session: aiohttp.ClientSession, operator: OperatorProcess) -> None:
        self.args, self.session, self.operator = args, session, operator
        self.pods_seen: dict[str, set[str]] = defaultdict(set)
        self.pod_times: dict[str, float] = {}
        self.phases: dict[str, str] = {}
        self.job_writes: dict[str, set[str]] = defaultdict(set)
        self.watches = [Watch(session, "/api/v1/pods", self._on_pod),
                        Watch(session, "/apis/finetune.dev/v1alpha1/finetunejobs", self._on_job)]

    def _on_pod(self, kind: str, pod: dict[str, Any], now: float) -> None:
        job = pod["metadata"].get("labels", {}).get("finetune.dev/job-name")
        if kind == "ADDED" and job:
            self.pods_seen[job].add(pod["metadata"]["name"])
            if len(self.pods_seen[job]) == self.args.nodes:
                self.pod_times.setdefault(job, now)

    def _on_job(self, kind: str, job: dict[str, Any], now: float) -> None:
        name = job["metadata"]["name"]
        self.phases[name] = (job.get("status") or {}).get("phase", "")
        self.job_writes[name].add(job["metadata"]["resourceVersion"])

    def has_pods(self, name: str) -> Callable[[], bool]:
        return lambda: name in self.pod_times

    async def until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        await _until(check, timeout, what, self.watches)

    async def namespace(self, name: str) -> None:
        async with self.session.post("/api/v1/namespaces", json={"apiVersion": "v1", "kind": "Namespace",
                                                                 "metadata": {"name": name}}) as response:
            response.raise_for_status()
        # Pods are refused until the namespace's default ServiceAccount exists.
        for _ in range(300):
            async with self.session.get(f"/api/v1/namespaces/{name}/serviceaccounts/default") as response:
                if response.status == 200:
                    return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"namespace {name} got no default ServiceAccount")

    async def create(self, ns: str, name: str) -> float:
        started = time.perf_counter()
        async with self.session.post(JOBS.format(ns=ns), json=self.job_body(name)) as response:
            if response.status != 201:
                raise RuntimeError(f"create {name}: {response.status} {await response.text()}")
        return started

    def job_body(self, name: str) -> dict[str, Any]:
        return _job(name, self.args.nodes)

    def close(self) -> None:
        """What the bench itself started (nothing here)."""

    async def patch_pod(self, ns: str, name: str, status: dict[str, Any]) -> None:
        async with self.session.patch(f"/api/v1/namespaces/{ns}/pods/{name}/status", data=json.dumps(
                {"status": status}), headers={"Content-Type": "application/merge-patch+json"}) as response:
            response.raise_for_status()

    async def run_pods(self, ns: str, names: list[str], **status: Any) -> None:
        """Every pod of ``names`` reported Running, as a kubelet would."""
        await asyncio.gather(*(
            self.patch_pod(ns, f"{name}-a0-n{rank}", {"phase": "Running", **status, "containerStatuses": [_running()]})
            for name in names for rank in range(self.args.nodes)
        ))

    async def latency(self) -> list[Row]:
        """One job at a time (after a warm-up job): POST → the watch event of its last pod."""
        await self.namespace("latency")
        latencies: list[float] = []
        for i in range(self.args.jobs + 1):
            name = f"lat-{i}"
            started = await self.create("latency", name)
            await self.until(self.has_pods(name), 10, f"pods of {name}")
            if i:
                latencies.append(self.pod_times[name] - started)
        p50, p99 = statistics.median(latencies), _percentile(latencies, 99)
        return [
            ("FineTuneJob → all pods exist, p50", f"{p50 * 1000:.1f} ms", f"≤ {self.goals['p50'] * 1000:.0f} ms",
             "ok" if p50 <= self.goals["p50"] else "MISSED"),
            ("FineTuneJob → all pods exist, p99", f"{p99 * 1000:.1f} ms", f"≤ {self.goals['p99'] * 1000:.0f} ms",
             "ok" if p99 <= self.goals["p99"] else "MISSED"),
        ]

    async def burst(self) -> list[Row]:
        """A burst of jobs created at once: all with pods, then all Running once their pods run; then RSS."""
        burst = self.args.burst
        await self.namespace("burst")
        names = [f"burst-{i}" for i in range(burst)]
        started = time.perf_counter()
        await asyncio.gather(*(self.create("burst", name) for name in names))
        created = time.perf_counter()
        await self.until(lambda: all(name in self.pod_times for name in names), 120, "the burst's pods")
        with_pods = time.perf_counter() - started
        running_started = time.perf_counter()
        await self.run_pods("burst", names, podIP=self.pod_ip)
        await self.until(lambda: all(self.phases.get(name) == "Running" for name in names), 120, "the burst Running")
        all_running = time.perf_counter() - started
        rows: list[Row] = [
            (f"{burst} jobs at once → all have pods", f"{with_pods:.2f} s", f"(POSTs took {created - started:.2f} s)",
             ""),
            (f"{burst} jobs at once → all Running", f"{all_running:.2f} s", f"≤ {self.goals['burst']:.0f} s",
             "ok" if all_running <= self.goals["burst"] else "MISSED"),
            ("  of which: pods patched Running → jobs Running", f"{time.perf_counter() - running_started:.2f} s",
             "", ""),
        ]
        await asyncio.sleep(3 * 5)  # three resync rounds (5 s each) with every job live
        assert self.operator.process is not None
        rss = psutil.Process(self.operator.process.pid).memory_info().rss / 2**20
        total = self.args.jobs + 1 + burst
        rows.append((f"operator RSS with {total} jobs", f"{rss:.0f} MB", f"≤ {self.goals['rss']:.0f} MB",
                     "ok" if rss <= self.goals["rss"] else "MISSED"))
        return rows

    async def lifecycle(self) -> list[Row]:
        """API writes of one whole lifecycle: create → Running → rank 0 exits 0 → Succeeded → deleted."""
        await self.namespace("life")
        before = _operator_metrics(self.operator.metrics())
        lifecycle = [f"life-{i}" for i in range(10)]
        await asyncio.gather(*(self.create("life", name) for name in lifecycle))
        await self.until(lambda: all(name in self.pod_times for name in lifecycle), 30, "lifecycle pods")
        await self.run_pods("life", lifecycle)
        await self.until(lambda: all(self.phases.get(name) == "Running" for name in lifecycle), 30,
                         "lifecycle Running")
        terminated = {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": "2025-01-01T00:00:00Z",
                                     "finishedAt": "2025-01-01T00:01:00Z"}}
        await asyncio.gather(*(self.patch_pod("life", f"{name}-a0-n0", {
            "phase": "Succeeded", "containerStatuses": [{**_running(), "state": terminated, "ready": False}]})
            for name in lifecycle))
        await self.until(lambda: all(self.phases.get(name) == "Succeeded" for name in lifecycle), 30, "Succeeded")
        await asyncio.sleep(1.0)
        for name in lifecycle:
            async with self.session.delete(JOBS.format(ns="life") + "/" + name) as response:
                response.raise_for_status()
        await asyncio.sleep(2.0)
        after = _operator_metrics(self.operator.metrics())
        own = {verb: (after.get(verb, 0) - before.get(verb, 0)) / len(lifecycle) for verb in WRITE_VERBS}
        # Every write to the FineTuneJob bumps its resourceVersion: the operator's status patches, and anything
        # kopf writes (nothing now: no finalizer, no annotations); the test's own two (create, delete) are not
        # the operator's.
        job_object = statistics.mean(len(self.job_writes[name]) - 2 for name in lifecycle)
        kopf_writes = job_object - own["patch_status"]
        detail = ", ".join(f"{verb} {count:.1f}" for verb, count in own.items())
        return [(f"API writes per job lifecycle ({self.args.nodes} nodes)", f"{sum(own.values()) + kopf_writes:.1f}",
                 f"operator client: {detail}; kopf on the job: {kopf_writes:.1f}", "")]


async def run_bench(
    args: argparse.Namespace, bench_class: type[OperatorBench], measure: Callable[[Any], Awaitable[list[Row]]]
) -> list[Row]:
    """A fresh control plane with the chart and the operator, a ``bench_class`` watching it, ``measure``'s rows."""
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="bench-operator-"))
    plane = ControlPlane(workdir / "control-plane", scheduler=False).start()
    operator: OperatorProcess | None = None
    try:
        kubeconfig = install_chart(plane, workdir / "operator.kubeconfig")
        operator = OperatorProcess(kubeconfig, workdir / "operator.log", args=["--log-level", "WARNING"],
                                   env={"PYTHONUNBUFFERED": "1"})
        operator.start()
        connector = aiohttp.TCPConnector(limit=100, ssl=plane.admin_tls)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(plane.url, connector=connector, timeout=timeout) as session:
            bench = bench_class(args, session, operator)
            for watch in bench.watches:
                watch.start()
            await asyncio.sleep(0.2)
            try:
                return await measure(bench)
            finally:
                for watch in bench.watches:
                    await watch.stop()
                bench.close()
    finally:
        if operator is not None:
            operator.stop()
        plane.stop()


async def run(args: argparse.Namespace) -> list[Row]:
    async def measure(bench: OperatorBench) -> list[Row]:
        return [*await bench.latency(), *await bench.burst(), *await bench.lifecycle()]

    return await run_bench(args, OperatorBench, measure)


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    widths = [max(len(row[i]) for row in [("measure", "value", "goal / detail", "")] + rows) for i in range(4)]
    header = ("measure", "value", "goal / detail", "")
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=50, help="jobs for the latency percentiles")
    parser.add_argument("--burst", type=int, default=200, help="jobs created at once")
    parser.add_argument("--nodes", type=int, default=2, help="pods per job")
    args = parser.parse_args(sys.argv[1:] if argv is None and __name__ == "__main__" else argv or [])
    print_table(asyncio.run(run(args)))


if __name__ == "__main__":
    main()

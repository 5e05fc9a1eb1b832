"""The operator at cluster scale on the real control plane: 10,000 foreign pods, 1,000 jobs, API rates, throttling.

    python -m bench.bench_operator_scale [--foreign-pods 10000] [--burst 1000] [--jobs 50] [--window 60]

Same set-up as ``bench_operator`` (etcd, kube-apiserver, kube-controller-manager, the operator with the chart's
ServiceAccount; this process plays user and kubelet). In order:
1. ``--foreign-pods`` pods in ten other namespaces, none of them the operator's;
2. ten finished and ten suspended jobs, then the operator's own API requests over ``--window`` seconds, per job per
   hour (its client's requests: kopf's watch streams are not per job);
3. ``--burst`` jobs created at once: all with pods, all Running once their pods run;
4. ``--jobs`` jobs one at a time with all of those present: POST → last pod's watch event, p50 and p99;
5. requests and status writes per running job per hour over the window, the operator's CPU and RSS;
6. the operator's ServiceAccount put in an API Priority and Fairness level of one seat that rejects what does not
   fit, then 100 jobs at once: every job must get exactly its pods and reach Running, however many 429s.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from typing import Any

import aiohttp
import psutil
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from bench.bench_operator import JOBS, OperatorBench, Row, _job, _operator_metrics, _running, print_table, run_bench
from finetune_operator.constants import DEFAULT_PROGRESS_SECONDS
from localcluster.chart import OPERATOR_USER
from localcluster.operator_process import OperatorProcess
from localcluster.seaweedfs import free_ports

GOALS = {"p50": 0.050, "p99": 0.250, "burst": 60.0, "rss": 250.0, "quiet_per_hour": 15.0}
FLOW = "/apis/flowcontrol.apiserver.k8s.io/v1"
TIGHT_LEVEL = {
    "apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "PriorityLevelConfiguration",
    "metadata": {"name": "ftj-bench-one-seat"},
    "spec": {"type": "Limited", "limited": {"nominalConcurrencyShares": 1, "lendablePercent": 0,
                                            "limitResponse": {"type": "Reject"}}},
}


def _flow_schema(user: str) -> dict[str, Any]:
    namespace, name = user.removeprefix("system:serviceaccount:").split(":")
    return {
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "FlowSchema",
        "metadata": {"name": "ftj-bench-operator"},
        "spec": {
            "priorityLevelConfiguration": {"name": TIGHT_LEVEL["metadata"]["name"]},
            "matchingPrecedence": 500, "distinguisherMethod": {"type": "ByUser"},
            "rules": [{
                "subjects": [{"kind": "ServiceAccount", "serviceAccount": {"name": name, "namespace": namespace}}],
                "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"], "namespaces": ["*"],
                                   "clusterScope": True}],
            }],
        },
    }


def _goal(value: float, goal: float) -> str:
    return "ok" if value <= goal else "MISSED"


class ScaleBench(OperatorBench):
    """``OperatorBench`` with the foreign pods, the request rates and the throttled run. Every pod runs at
    127.0.0.1, where one fake rank 0 serves progress for all jobs, so the operator reads progress as in a cluster."""

    goals = GOALS
    pod_ip = "127.0.0.1"

    def __init__(self, args: argparse.Namespace, session: aiohttp.ClientSession, operator: OperatorProcess) -> None:
        super().__init__(args, session, operator)
        (self.metrics_port,) = free_ports(1)
        registry = CollectorRegistry()
        for name, value in (("finetune_step", 10), ("finetune_total_steps", 100), ("finetune_train_loss", 1.5)):
            Gauge(name, name, ["rank"], registry=registry).labels(rank="0").set(value)
        self.metrics_server, _ = start_http_server(self.metrics_port, addr="127.0.0.1", registry=registry)

    async def post(self, path: str, body: dict[str, Any]) -> None:
        async with self.session.post(path, json=body) as response:
            if response.status not in (200, 201):
                raise RuntimeError(f"POST {path}: {response.status} {await response.text()}")

    async def foreign_pods(self, count: int) -> list[Row]:
        limit = asyncio.Semaphore(50)
        started = time.perf_counter()
        for n in range(10):
            await self.namespace(f"foreign-{n}")

        async def one(i: int) -> None:
            async with limit:
                await self.post(f"/api/v1/namespaces/foreign-{i % 10}/pods", {
                    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"app-{i}", "labels": {"app": "other"}},
                    "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]}})

        await asyncio.gather(*(one(i) for i in range(count)))
        return [(f"{count:,} foreign pods in 10 namespaces created", f"{time.perf_counter() - started:.1f} s", "", "")]

    def requests(self) -> dict[str, float]:
        return _operator_metrics(self.operator.metrics())

    async def per_job_per_hour(self, jobs: int, window: float) -> tuple[float, float, float]:
        """(requests, status writes, operator CPU seconds) over ``window`` seconds, per job per hour for the first
        two."""
        assert self.operator.process is not None
        process = psutil.Process(self.operator.process.pid)
        before, cpu = self.requests(), sum(process.cpu_times()[:2])
        await asyncio.sleep(window)
        after, cpu_after = self.requests(), sum(process.cpu_times()[:2])
        scale = 3600 / window / jobs
        total = sum(after.values()) - sum(before.values())
        writes = after.get("patch_status", 0) - before.get("patch_status", 0)
        return total * scale, writes * scale, cpu_after - cpu

    async def quiet_jobs(self, window: float) -> list[Row]:
        """Ten finished and ten suspended jobs, then the operator's requests for them."""
        await self.namespace("quiet")
        done, held = [f"done-{i}" for i in range(10)], [f"held-{i}" for i in range(10)]
        await asyncio.gather(*(self.create("quiet", name) for name in done))
        for name in held:
            job = {**self.job_body(name), "spec": {**self.job_body(name)["spec"], "suspend": True}}
            await self.post(JOBS.format(ns="quiet"), job)
        await self.until(lambda: all(name in self.pod_times for name in done), 60, "the finishing jobs' pods")
        await self.run_pods("quiet", done)
        terminated = {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": "2025-01-01T00:00:00Z",
                                     "finishedAt": "2025-01-01T00:01:00Z"}}
        await asyncio.gather(*(self.patch_pod("quiet", f"{name}-a0-n0", {
            "phase": "Succeeded", "containerStatuses": [{**_running(), "state": terminated, "ready": False}]})
            for name in done))
        await self.until(lambda: all(self.phases.get(n) == "Succeeded" for n in done)
                         and all(self.phases.get(n) == "Suspended" for n in held), 60, "finished and suspended")
        await asyncio.sleep(10)  # the last events and status writes of finishing
        requests, _, _ = await self.per_job_per_hour(20, self.args.window)
        return [("API requests per finished or suspended job per hour", f"{requests:.1f}",
                 f"≤ {GOALS['quiet_per_hour']:.0f}", _goal(requests, GOALS["quiet_per_hour"]))]

    def close(self) -> None:
        self.metrics_server.shutdown()

    def job_body(self, name: str) -> dict[str, Any]:
        job = _job(name, self.args.nodes)
        job["spec"]["metrics"] = {"port": self.metrics_port}
        return job

    async def running_jobs(self) -> list[Row]:
        """The latency jobs run too, then the requests of all running jobs over the window."""
        latency = [f"lat-{i}" for i in range(self.args.jobs + 1)]
        await self.run_pods("latency", latency, podIP=self.pod_ip)
        running = [*latency, *(f"burst-{i}" for i in range(self.args.burst))]
        await self.until(lambda: all(self.phases.get(n) == "Running" for n in running), 120, "every job Running")
        await asyncio.sleep(2 * DEFAULT_PROGRESS_SECONDS)  # their first progress read and status write
        requests, writes, cpu = await self.per_job_per_hour(len(running), self.args.window)
        assert self.operator.process is not None
        rss = psutil.Process(self.operator.process.pid).memory_info().rss / 2**20
        present = self.args.burst + self.args.jobs + 1 + 20
        return [
            ("API requests per running job per hour", f"{requests:.1f}",
             f"of them status writes {writes:.1f} (progress read every {DEFAULT_PROGRESS_SECONDS:.0f} s)", ""),
            (f"operator CPU with {present} jobs and the foreign pods", f"{cpu / self.args.window:.2f} cores",
             f"over {self.args.window:.0f} s", ""),
            (f"operator RSS with {present} jobs and {self.args.foreign_pods:,} foreign pods", f"{rss:.0f} MB",
             f"≤ {GOALS['rss']:.0f} MB", _goal(rss, GOALS["rss"])),
        ]

    async def rejected(self) -> float:
        async with self.session.get("/metrics") as response:
            text = await response.text()
        pattern = r'^apiserver_flowcontrol_rejected_requests_total\{[^}]*flow_schema="ftj-bench-operator"[^}]*\} (\S+)$'
        return sum(float(v) for v in re.findall(pattern, text, re.M))

    async def throttled(self, count: int = 100) -> list[Row]:
        await self.post(f"{FLOW}/prioritylevelconfigurations", TIGHT_LEVEL)
        await self.post(f"{FLOW}/flowschemas", _flow_schema(OPERATOR_USER))
        await self.namespace("throttled")
        names = [f"tight-{i}" for i in range(count)]
        started = time.perf_counter()
        await asyncio.gather(*(self.create("throttled", name) for name in names))
        await self.until(lambda: all(name in self.pod_times for name in names), 600, "the throttled jobs' pods")
        await self.run_pods("throttled", names, podIP="10.0.0.1")
        await self.until(lambda: all(self.phases.get(n) == "Running" for n in names), 600, "the throttled Running")
        seconds = time.perf_counter() - started
        await asyncio.sleep(5)  # a duplicate would show up as a third pod of some job
        extra = sum(len(self.pods_seen[name]) - self.args.nodes for name in names)
        rejected = await self.rejected()
        return [(f"{count} jobs at once, operator at one APF seat: 429s absorbed", f"{rejected:.0f} rejected",
                 f"all Running in {seconds:.1f} s; duplicate pods {extra}, jobs not Running 0",
                 "ok" if extra == 0 and rejected > 0 else "MISSED")]


async def run(args: argparse.Namespace) -> list[Row]:
    async def measure(bench: ScaleBench) -> list[Row]:
        rows = [*await bench.foreign_pods(args.foreign_pods), *await bench.quiet_jobs(args.window)]
        rows += await bench.burst()
        rows += await bench.latency()
        rows += await bench.running_jobs()
        return rows + await bench.throttled()

    return await run_bench(args, ScaleBench, measure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--foreign-pods", type=int, default=10_000, help="pods of other applications")
    parser.add_argument("--burst", type=int, default=1000, help="jobs created at once (and then present)")
    parser.add_argument("--jobs", type=int, default=50, help="jobs for the latency percentiles")
    parser.add_argument("--nodes", type=int, default=2, help="pods per job")
    parser.add_argument("--window", type=float, default=60.0, help="seconds the request rates are counted over")
    args = parser.parse_args(sys.argv[1:] if argv is None and __name__ == "__main__" else argv or [])
    print_table(asyncio.run(run(args)))


if __name__ == "__main__":
    main()

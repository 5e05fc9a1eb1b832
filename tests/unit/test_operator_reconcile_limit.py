"""The limit on reconcile passes at once: a burst of jobs holds at most MAX_CONCURRENT_PASSES passes' data."""

from __future__ import annotations

import asyncio
from typing import Any

from operator_factories import make_job, make_pod
from test_operator_reconcile import make_reconciler

from finetune_operator.progress import ProgressSample
from finetune_operator.reconcile import MAX_CONCURRENT_PASSES, MAX_CONCURRENT_RESYNC_PASSES

RUNNING = {"phase": "Running", "attempt": 0, "restarts": 0, "countedFailures": 0, "startTime": "x"}


def test_a_burst_runs_at_most_the_limit_of_passes_at_once_and_all_of_them_in_the_end() -> None:
    reconciler, api, _ = make_reconciler(make_job(spec__distributed__nodes=1))
    gate, observing, peak = asyncio.Event(), set(), [0]
    list_pods = api.list_job_pods

    async def held_list(namespace: str, job_name: str) -> list[dict[str, Any]]:
        observing.add(job_name)
        peak[0] = max(peak[0], len(observing))
        await gate.wait()
        observing.discard(job_name)
        return await list_pods(namespace, job_name)

    api.list_job_pods = held_list  # type: ignore[method-assign]
    names = [f"job-{i}" for i in range(MAX_CONCURRENT_PASSES + 20)]

    async def scenario() -> None:
        tasks = [asyncio.create_task(reconciler.reconcile("ns", name, make_job(
            {"metadata.name": name}, spec__distributed__nodes=1))) for name in names]
        for _ in range(20):
            await asyncio.sleep(0)
        assert peak[0] == len(observing) == MAX_CONCURRENT_PASSES
        gate.set()
        await asyncio.gather(*tasks)
        await reconciler.close()

    asyncio.run(scenario())
    assert peak[0] == MAX_CONCURRENT_PASSES
    assert sum(1 for write in api.writes if write == "patch status") == len(names)


def test_the_resync_has_a_limit_of_its_own_and_new_jobs_never_wait_behind_it() -> None:
    reconciler, api, _ = make_reconciler(make_job(status=RUNNING))
    api.pods = {"job-a0-n0": make_pod(0, 0, "Running", ip="10.1.2.3")}
    gate, reading = asyncio.Event(), [0]

    async def slow_fetch(ip: str, port: int) -> ProgressSample | None:
        reading[0] += 1
        await gate.wait()
        return ProgressSample(step=5, total_steps=50)

    reconciler._fetch = slow_fetch
    names = [f"job-{i}" for i in range(MAX_CONCURRENT_RESYNC_PASSES + 5)]

    async def scenario() -> None:
        tasks = [asyncio.create_task(reconciler.reconcile("ns", name, make_job(
            {"metadata.name": name}, status=RUNNING), want_progress=True)) for name in names]
        for _ in range(20):
            await asyncio.sleep(0)
        assert reading[0] == MAX_CONCURRENT_RESYNC_PASSES
        # A new job's pass runs to its end while every resync place waits on a metrics endpoint.
        new = make_job({"metadata.name": "new", "metadata.uid": "uid-new"}, spec__distributed__nodes=1)
        api.job = new
        await asyncio.wait_for(reconciler.reconcile("ns", "new", new), 5)
        assert "create Pod new-a0-n0" in api.writes
        gate.set()
        await asyncio.gather(*tasks)
        await reconciler.close()

    asyncio.run(scenario())
    assert reading[0] == len(names)

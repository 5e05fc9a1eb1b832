"""Observe → decide → act against an in-memory API: one status patch, no stale double restarts, no silent errors."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from operator_factories import at, make_job, make_pod

from finetune_operator.api import ApiError
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.progress import ProgressSample
from finetune_operator.reconcile import Reconciler
from finetune_operator.settings import Settings


class FakeApi:
    """The KubeApi methods the reconciler uses, over dicts; every write is logged."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job: dict[str, Any] | None = job
        self.pods: dict[str, dict[str, Any]] = {}
        self.others: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.writes: list[str] = []
        self.fail_pod_creates: str | None = None

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.job)

    async def list_jobs(self, namespace: str | None) -> list[dict[str, Any]]:
        return [copy.deepcopy(self.job)] if self.job is not None else []

    async def list_job_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        return [copy.deepcopy(p) for p in self.pods.values()]

    async def list_pod_events(self, namespace: str, pod_names: Sequence[str]) -> list[dict[str, Any]]:
        return []

    async def create(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        name = body["metadata"]["name"]
        if body["kind"] == "Pod" and self.fail_pod_creates:
            self.writes.append(f"create Pod {name} -> 403")
            raise ApiError("create", 403, self.fail_pod_creates)
        self.writes.append(f"create {body['kind']} {name}")
        if body["kind"] == "Event":
            self.events.append(dict(body))
            return dict(body)
        store = self.pods if body["kind"] == "Pod" else None
        if store is not None:
            if name in store:
                return None
            store[name] = {**copy.deepcopy(dict(body)), "status": {"phase": "Pending"}}
            return copy.deepcopy(store[name])
        self.others[(body["kind"], name)] = dict(body)
        return dict(body)

    async def create_or_update_data(self, body: Mapping[str, Any]) -> bool:
        self.writes.append(f"apply {body['kind']} {body['metadata']['name']}")
        self.others[(body["kind"], body["metadata"]["name"])] = dict(body)
        return True

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        self.writes.append(f"delete {kind} {name}")
        return self.pods.pop(name, None) is not None

    async def delete_job(self, namespace: str, name: str) -> bool:
        self.writes.append("delete FineTuneJob")
        self.job = None
        return True

    async def patch_job_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any] | None:
        self.writes.append("patch status")
        if self.job is None:
            return None
        status = self.job.setdefault("status", {})
        for key, value in patch.items():
            if value is None:
                status.pop(key, None)
            else:
                status[key] = value
        return self.job

    async def create_event(self, body: Mapping[str, Any]) -> None:
        await self.create(body)

    async def close(self) -> None:
        pass


class Clock:
    """Fake time for the reconciler: the wall clock, the monotonic clock and sleep all read ``seconds``."""

    def __init__(self) -> None:
        self.seconds = 100.0

    def __call__(self) -> Any:
        return at(self.seconds)

    def monotonic(self) -> float:
        return self.seconds

    async def sleep(self, delay: float) -> None:
        self.seconds += max(0.0, delay)
        await asyncio.sleep(0)  # let the other tasks run, as a real sleep would


def make_reconciler(job: dict[str, Any], sample: ProgressSample | None = None) -> tuple[Reconciler, FakeApi, Clock]:
    api = FakeApi(job)
    clock = Clock()

    async def fetch(ip: str, port: int) -> ProgressSample | None:
        return sample

    reconciler = Reconciler(api, Settings(trainer_image="img"), OperatorMetrics(),  # type: ignore[arg-type]
                            clock=clock, sleep=clock.sleep, monotonic=clock.monotonic, fetch=fetch)
    return reconciler, api, clock


def test_first_reconcile_creates_the_gang_and_patches_status_once_then_nothing() -> None:
    reconciler, api, _ = make_reconciler(make_job(spec__distributed__nodes=2))

    async def scenario() -> None:
        await reconciler.reconcile("ns", "job", api.job)
        assert api.writes[:5] == ["create Service job", "apply ConfigMap job-config", "create Pod job-a0-n0",
                                  "create Pod job-a0-n1", "patch status"]
        assert api.writes[5:] == ["create Event " + api.events[0]["metadata"]["name"]]
        api.writes.clear()
        await reconciler.reconcile("ns", "job", api.job)
        assert api.writes == []
        await reconciler.close()

    asyncio.run(scenario())
    assert api.job is not None and api.job["status"]["phase"] == "Pending"


def test_a_stale_body_cannot_restart_the_same_failure_twice() -> None:
    running = {"phase": "Running", "attempt": 0, "restarts": 0, "countedFailures": 0, "startTime": "x"}
    job = make_job(spec__distributed__nodes=2, status=running)
    reconciler, api, clock = make_reconciler(job)
    api.pods = {p["metadata"]["name"]: p for p in (make_pod(0, 0, "Running"), make_pod(1, 0, "Failed", exit_code=1))}
    stale = copy.deepcopy(job)

    async def scenario() -> None:
        await reconciler.reconcile("ns", "job", stale)
        assert api.job is not None
        assert (api.job["status"]["attempt"], api.job["status"]["restarts"]) == (1, 1)
        # The watch still delivers the old status (attempt 0, Running) while a failed pod lingers.
        api.pods["job-a0-n1"] = make_pod(1, 0, "Failed", exit_code=1)
        clock.seconds += 1
        await reconciler.reconcile("ns", "job", stale)
        assert (api.job["status"]["attempt"], api.job["status"]["restarts"], api.job["status"]["countedFailures"]) \
            == (1, 1, 1)
        await reconciler.close()

    asyncio.run(scenario())


def test_failed_creates_are_reported_once_in_the_message_and_raised() -> None:
    reconciler, api, _ = make_reconciler(make_job())
    api.fail_pod_creates = 'pods "job-a0-n0" is forbidden: exceeded quota'

    async def scenario() -> None:
        for _ in range(2):
            with pytest.raises(ApiError):
                await reconciler.reconcile("ns", "job", api.job)
        await reconciler.close()

    asyncio.run(scenario())
    assert api.job is not None
    assert api.job["status"]["message"] == (
        "Attempt 0: 0 of 1 pod(s) running (API error: create failed (403): "
        'pods "job-a0-n0" is forbidden: exceeded quota)'
    )


def test_own_pod_events_need_no_reconcile_but_changes_do() -> None:
    reconciler, api, _ = make_reconciler(make_job())

    async def scenario() -> None:
        await reconciler.reconcile("ns", "job", api.job)
        await reconciler.close()

    asyncio.run(scenario())
    pod = api.pods["job-a0-n0"]
    assert reconciler.pod_changed(pod, "ADDED") is None
    assert reconciler.pod_changed({**pod, "status": {"phase": "Running"}}, "MODIFIED") == ("ns", "job")
    assert reconciler.pod_changed(pod, "DELETED") == ("ns", "job")


def test_the_timer_reads_progress_of_a_running_job() -> None:
    running = {"phase": "Running", "attempt": 0, "restarts": 0, "countedFailures": 0, "startTime": "x"}
    sample = ProgressSample(step=5, total_steps=50, observed_at=1.0)
    reconciler, api, _ = make_reconciler(make_job(status=running), sample)
    api.pods = {"job-a0-n0": make_pod(0, 0, "Running", ip="10.1.2.3")}

    async def scenario() -> None:
        await reconciler.reconcile("ns", "job", api.job)
        assert api.job is not None and "progress" not in api.job["status"]
        await reconciler.reconcile("ns", "job", api.job, want_progress=True)
        await reconciler.close()

    asyncio.run(scenario())
    assert api.job is not None
    assert api.job["status"]["progress"] == {"step": 5, "totalSteps": 50, "percent": 10.0, "summary": "5/50 (10%)"}


def test_a_running_job_is_resynced_only_when_its_progress_is_due() -> None:
    running = {"phase": "Running", "attempt": 0, "restarts": 0, "countedFailures": 0, "startTime": "x"}
    reconciler, api, clock = make_reconciler(make_job(status=running), ProgressSample(step=5, total_steps=50))
    api.pods = {"job-a0-n0": make_pod(0, 0, "Running", ip="10.1.2.3")}
    reconciler.job_seen(api.job)
    started = record_triggers(reconciler, clock)

    async def scenario() -> None:
        await reconciler.reconcile("ns", "job", api.job, want_progress=True)
        assert api.job is not None and api.job["status"]["progress"]["step"] == 5
        assert not reconciler.resync_one("ns", "job")  # progress just read; pod changes come as watch events
        clock.seconds += reconciler.settings.progress_seconds
        assert reconciler.resync_one("ns", "job")
        await reconciler.close()

    asyncio.run(scenario())
    assert [(name, progress) for _, name, progress in started] == [("job", True)]


def test_a_queued_job_waits_for_kueue_not_for_the_resync() -> None:
    reconciler, api, clock = make_reconciler(make_job(status={"phase": "Queued", "attempt": 0}))
    reconciler.job_seen(api.job)
    reconciler._slots[("ns", "job")].status = {"phase": "Queued", "attempt": 0}
    started = record_triggers(reconciler, clock)
    assert not reconciler.resync_one("ns", "job")
    reconciler._slots[("ns", "job")].status = {"phase": "Pending", "attempt": 0}
    assert reconciler.resync_one("ns", "job")
    assert [name for _, name, _ in started] == ["job"]


def test_a_finished_job_settles_and_its_ttl_deletes_it() -> None:
    finished = {"phase": "Succeeded", "completionTime": "2025-01-01T00:01:00Z", "attempt": 0}
    reconciler, api, clock = make_reconciler(make_job(status=finished))

    async def scenario() -> None:
        await reconciler.reconcile("ns", "job", api.job)
        assert api.job is not None
        assert reconciler.is_settled("ns", "job", api.job)
        api.job["spec"]["ttlSecondsAfterFinished"] = 10
        api.job["metadata"]["generation"] = 2
        assert not reconciler.is_settled("ns", "job", api.job)
        await reconciler.reconcile("ns", "job", api.job)
        assert "delete FineTuneJob" in api.writes
        await reconciler.close()

    asyncio.run(scenario())


# ---- the resync: the operator's own periodic reconcile (no kopf timer, so no finalizer on the jobs) --------------


def named_job(name: str, **paths: Any) -> dict[str, Any]:
    job = make_job(**paths)
    job["metadata"].update(name=name, uid=f"uid-{name}")
    return job


def record_triggers(reconciler: Reconciler, clock: Clock) -> list[tuple[float, str, bool]]:
    started: list[tuple[float, str, bool]] = []

    def trigger(namespace: str, name: str, *, want_progress: bool = False) -> None:
        started.append((clock.seconds, name, want_progress))

    reconciler.trigger = trigger  # type: ignore[method-assign]
    return started


async def run_until(clock: Clock, seconds: float) -> None:
    """Yield to the other tasks until fake time has reached ``seconds``."""
    for _ in range(10_000):
        if clock.seconds >= seconds:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"fake time stuck at {clock.seconds}, waiting for {seconds}")


def test_resync_reconciles_every_known_job_once_per_period_spread_over_it() -> None:
    reconciler, _, clock = make_reconciler(make_job())
    for name in ("a", "b", "c", "d"):
        reconciler.job_seen(named_job(name))
    started = record_triggers(reconciler, clock)
    begin = clock.seconds

    async def scenario() -> None:
        task = asyncio.create_task(reconciler.resync_forever(0.4))
        await run_until(clock, begin + 0.8)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    # One start every period / jobs, not all at once; the next round starts one period after the first.
    names = ["a", "b", "c", "d"]
    assert [(name, progress) for _, name, progress in started[:8]] == [(n, True) for n in names + names]
    offsets = [round(when - begin, 6) for when, _, _ in started[:8]]
    assert offsets == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


def test_resync_skips_a_job_being_reconciled_and_a_settled_one() -> None:
    finished = {"phase": "Succeeded", "completionTime": "2025-01-01T00:01:00Z", "attempt": 0}
    reconciler, api, clock = make_reconciler(make_job(status=finished))

    async def scenario() -> None:
        await reconciler.reconcile("ns", "job", api.job)
        reconciler.job_seen(named_job("busy"))
        reconciler.job_seen(named_job("idle"))
        started = record_triggers(reconciler, clock)
        async with reconciler._slots[("ns", "busy")].lock:
            assert not reconciler.resync_one("ns", "busy")
        assert not reconciler.resync_one("ns", "job")  # settled: Succeeded, nothing to do
        assert not reconciler.resync_one("ns", "unknown")
        assert reconciler.resync_one("ns", "idle")
        assert [name for _, name, _ in started] == ["idle"]
        await reconciler.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("spec", "status", "settled"),
    [
        pytest.param({"suspend": True}, {"phase": "Suspended", "attempt": 0}, True, id="suspended"),
        pytest.param({}, {"phase": "Succeeded", "completionTime": "2025-01-01T00:01:00Z", "attempt": 0}, True,
                     id="succeeded"),
        pytest.param({"ttlSecondsAfterFinished": 600}, {"phase": "Succeeded", "completionTime": "2025-01-01T00:01:00Z",
                                                        "attempt": 0}, False, id="waiting-for-its-ttl"),
        pytest.param({}, {"phase": "Pending", "attempt": 0}, False, id="pending"),
    ],
)
def test_only_a_finished_or_suspended_job_with_nothing_to_do_skips_the_resync(
    spec: dict[str, Any], status: dict[str, Any], settled: bool
) -> None:
    job = make_job(status=status, **{f"spec__{key}": value for key, value in spec.items()})
    reconciler, api, _ = make_reconciler(job)

    async def scenario() -> None:
        await reconciler.reconcile("ns", "job", api.job)
        assert reconciler.is_settled("ns", "job", api.job) is settled
        await reconciler.close()

    asyncio.run(scenario())


def test_resync_pauses_while_another_replica_works() -> None:
    reconciler, _, clock = make_reconciler(make_job())
    reconciler.job_seen(named_job("a"))
    started = record_triggers(reconciler, clock)
    answers = [False, True]
    begin = clock.seconds

    async def active() -> bool:
        return answers[0]

    async def scenario() -> None:
        task = asyncio.create_task(reconciler.resync_forever(0.1, active))
        await asyncio.sleep(0)  # the first round asks, hears "not active" and pauses
        # Paused: what this replica remembered is dropped (kopf relists it on resuming), requeues do nothing.
        assert reconciler.paused and reconciler.known_jobs() == []
        reconciler._requeued("ns", "a")
        assert started == []
        answers.pop(0)
        reconciler.job_seen(named_job("b"))  # kopf resumed and relisted
        await run_until(clock, begin + 0.1)
        await asyncio.sleep(0)
        assert not reconciler.paused
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    assert [(round(when - begin, 6), name) for when, name, _ in started] == [(0.1, "b")]

# ---- watch gaps: a job deleted or edited while the watch was broken ------------------------------------------


def created_gang(reconciler: Reconciler, api: FakeApi) -> None:
    """The first reconcile of the job (its body from the watch) created the gang; the writes are forgotten."""
    reconciler.job_seen(copy.deepcopy(api.job or {}))
    asyncio.run(reconciler.reconcile("ns", "job"))
    assert sorted(api.pods) == ["job-a0-n0", "job-a0-n1"]
    api.writes.clear()


def test_an_audit_forgets_a_job_deleted_during_a_watch_gap_and_its_metrics() -> None:
    reconciler, api, clock = make_reconciler(make_job(spec__distributed__nodes=2))
    created_gang(reconciler, api)
    assert reconciler.metrics.phases.counts()["Pending"] == 1
    api.job = None  # deleted; the watch that would have said so was broken
    clock.seconds += 1
    assert asyncio.run(reconciler.audit_jobs()) == [("ns", "job")]
    assert reconciler.known_jobs() == []
    assert reconciler.metrics.phases.counts()["Pending"] == 0


def test_an_audit_keeps_a_job_first_seen_while_the_list_was_being_read() -> None:
    reconciler, api, clock = make_reconciler(make_job())
    list_jobs = api.list_jobs

    async def list_while_a_job_arrives(namespace: str | None) -> list[dict[str, Any]]:
        clock.seconds += 1
        reconciler.job_seen(named_job("new"))  # its watch event came before the list's answer
        return await list_jobs(namespace)

    api.list_jobs = list_while_a_job_arrives  # type: ignore[method-assign]
    assert asyncio.run(reconciler.audit_jobs()) == []
    assert reconciler.known_jobs() == [("ns", "new")]


def test_a_requeue_of_a_job_deleted_unseen_creates_nothing_and_forgets_it() -> None:
    reconciler, api, _ = make_reconciler(make_job(spec__distributed__nodes=2))
    created_gang(reconciler, api)
    api.job = None
    api.pods.clear()  # the garbage collector removed the children of the deleted job

    async def scenario() -> None:
        await reconciler.reconcile("ns", "job")  # the remembered body would recreate the gang
        await reconciler.close()

    asyncio.run(scenario())
    assert api.writes == []
    assert reconciler.known_jobs() == []
    assert reconciler.metrics.phases.counts()["Pending"] == 0


def test_a_job_suspended_during_a_watch_gap_is_decided_on_its_new_spec_before_any_create() -> None:
    reconciler, api, _ = make_reconciler(make_job(spec__distributed__nodes=2))
    created_gang(reconciler, api)
    assert api.job is not None
    api.job["spec"]["suspend"] = True
    api.job["metadata"]["generation"] = 2
    api.pods.clear()

    async def scenario() -> None:
        await reconciler.reconcile("ns", "job")
        await reconciler.close()

    asyncio.run(scenario())
    assert not [write for write in api.writes if write.startswith("create Pod")]
    assert api.job["status"]["phase"] == "Suspended"

"""One reconcile per FineTuneJob: observe (job, labelled pods, their events, rank 0's metrics), decide, act.

Reconciles of one job never overlap: a trigger that arrives while one runs marks the job dirty and the running
reconcile goes round once more, so a burst of pod events costs at most two passes. The status this process wrote
last is authoritative over a possibly older status in a watch event (only the operator writes status), which
keeps decisions such as "attempt N failed" from being taken twice on stale data.

Besides watch events and requeues, ``resync_forever`` reconciles every known job once per ``resync_seconds``
(progress, events, deadlines nothing watched reports), spread evenly over the period. It is the operator's own task,
not a kopf timer: kopf would put a finalizer on every job for a timer, and a job deleted while the operator is down
would then never go away.

Watch gaps: a job deleted while the watch was broken sends no DELETED event. Each resync round after kopf relisted
the jobs (and every ``AUDIT_SECONDS`` in any case) reads which jobs exist and forgets the others with their metrics
(``job_presence``); and no reconcile creates children on a remembered body alone: it reads the job first, so a
requeue or resync that fires before the forgetting creates nothing for a job that is gone.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import hashlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import kopf

from finetune_operator import constants as c
from finetune_operator.api import ApiError, KubeApi, gather_actions, merge_patch_between
from finetune_operator.builders import build_event, workload_name
from finetune_operator.decide import decide
from finetune_operator.decision import (
    CreateChild,
    Decision,
    DeleteJob,
    DeletePod,
    DeletePodGroup,
    DeleteWorkload,
    PatchWorkloadStatus,
)
from finetune_operator.gang import GangObservation, observe_pod_groups
from finetune_operator.gang_policy import unavailable_message
from finetune_operator.job_presence import JobKey, RememberedJob, jobs_gone, remembered_body
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.pod_creation import record_create_refusal
from finetune_operator.pod_view import PodView, observe_pods
from finetune_operator.progress import ProgressSample, StepRateTracker, fetch_progress
from finetune_operator.queue_policy import workload_unavailable_message
from finetune_operator.retry_policy import reconcile_retry_delay
from finetune_operator.settings import Settings
from finetune_operator.spec import parse_meta, parse_time
from finetune_operator.workload import QueueObservation, observe_workload, placement_of

log = logging.getLogger(__name__)

# The longest the operator goes without checking which remembered jobs still exist (a watch can break silently:
# kopf reconnects a watch after 70 s without an event, and a relist with no job left in it shows nothing).
AUDIT_SECONDS = 300.0
# Appended to status.message when a request of this reconcile failed (quota, admission webhook, ...).
API_ERROR_MARK = " (API error: "
# A requeue fires a little after the moment it waits for, so the deadline has surely passed.
REQUEUE_MARGIN_SECONDS = 0.05
# Passes for watch events and requeues running at once; the others wait holding nothing but their coroutine. Each
# pass holds its job's pods, the children it builds and the API's answers (about 100 kB for a new 2-node job): 1,000
# jobs created at once all in flight left ~100 MB of freed but unreturnable heap behind. Four per connection of the
# API client keep every connection busy (DEFAULT_POOL_SIZE), so a burst is not slower.
MAX_CONCURRENT_PASSES = 64
# The resync's passes (progress reads, deadlines) have a limit of their own: a new job never waits behind them, and
# a thousand pending jobs' resyncs cannot crowd a burst's passes out of the API client.
MAX_CONCURRENT_RESYNC_PASSES = 16

Clock = Callable[[], datetime.datetime]
# Injected beside the clock so that unit tests drive the resync's pacing with fake time, not wall-clock windows.
Sleep = Callable[[float], Awaitable[None]]
Monotonic = Callable[[], float]
ProgressFetcher = Callable[[str, int], Awaitable[ProgressSample | None]]
# Asked before each resync round; False pauses the resync (another replica works, see peering.PeeringCheck).
ActiveCheck = Callable[[], Awaitable[bool]]


class PodCreateRefused(ApiError):
    """The API server refused a pod of the gang (admission, validation, quota, RBAC), not merely failed to answer."""


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def pod_fingerprint(pod: Mapping[str, Any]) -> bytes:
    """What of a pod ``decide`` can react to: its status and whether it is being deleted. A digest, not the status
    itself: a thousand running gangs would otherwise keep a kilobyte or two of JSON per pod."""
    metadata = pod.get("metadata") or {}
    text = json.dumps([pod.get("status"), metadata.get("deletionTimestamp")], sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


@dataclass
class _JobSlot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    dirty: bool = False
    want_progress: bool = False
    body: dict[str, Any] | None = None
    uid: str | None = None
    # The status this process last wrote, newer than any the watch may still deliver.
    status: dict[str, Any] | None = None
    reconciled_generation: int | None = None
    settled: bool = False
    progress_read_at: float | None = None
    errors: int = 0
    requeue: asyncio.TimerHandle | None = None
    pods: dict[str, bytes] = field(default_factory=dict)
    # When the watch (or a read) last showed the job, on the reconciler's monotonic clock.
    seen_at: float = 0.0
    # The body was read from the API server by this reconcile, not remembered from the watch.
    body_read: bool = False


class Reconciler:
    """Owns the per-job state and runs observe → decide → act; kopf handlers only call into it."""

    def __init__(
        self,
        api: KubeApi,
        settings: Settings,
        metrics: OperatorMetrics,
        *,
        clock: Clock = utc_now,
        sleep: Sleep = asyncio.sleep,
        monotonic: Monotonic = time.monotonic,
        fetch: ProgressFetcher | None = None,
    ) -> None:
        self.api = api
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.sleep = sleep
        self.monotonic = monotonic
        self._fetch = fetch
        self._http: aiohttp.ClientSession | None = None
        self._slots: dict[tuple[str, str], _JobSlot] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._rates = StepRateTracker()
        # While paused (kopf peering: another replica works) requeues and resync rounds do nothing.
        self.paused = False
        # Whether the next resync round checks which jobs still exist (kopf relisted them), and when it last did.
        self._audit_due = True
        self._audited_at: float | None = None
        self._jitter = random.random
        self._passes = asyncio.Semaphore(MAX_CONCURRENT_PASSES)
        self._resync_passes = asyncio.Semaphore(MAX_CONCURRENT_RESYNC_PASSES)

    async def close(self) -> None:
        for slot in self._slots.values():
            if slot.requeue is not None:
                slot.requeue.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        await self.api.close()

    # ---- triggers ---------------------------------------------------------------------------------------

    def job_seen(self, body: Mapping[str, Any], event_type: str | None = None) -> bool:
        """Remember the newest body from the watch; True when it needs a reconcile (new, edited, first seen)."""
        metadata = body.get("metadata") or {}
        key = (str(metadata.get("namespace") or "default"), str(metadata.get("name")))
        if event_type == "DELETED":
            self.forget(*key)
            return False
        slot = self._slot(key)
        uid = metadata.get("uid")
        if slot.uid is not None and uid != slot.uid:
            # The same name now belongs to a new object: nothing remembered applies to it.
            self.forget(*key)
            slot = self._slot(key)
        slot.uid = uid
        slot.body = remembered_body(body)
        slot.body_read = False
        slot.seen_at = self.monotonic()
        generation = metadata.get("generation")
        return slot.reconciled_generation is None or generation != slot.reconciled_generation

    def _slot(self, key: JobKey) -> _JobSlot:
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _JobSlot(seen_at=self.monotonic())
        return slot

    def pod_changed(self, pod: Mapping[str, Any], event_type: str | None = None) -> tuple[str, str] | None:
        """The owning job's (namespace, name) when this pod event may change a decision, else None."""
        metadata = pod.get("metadata") or {}
        job_name = (metadata.get("labels") or {}).get(c.LABEL_JOB_NAME)
        if not job_name:
            return None
        key = (str(metadata.get("namespace") or "default"), str(job_name))
        slot = self._slots.get(key)
        name = str(metadata.get("name"))
        if event_type == "DELETED":
            if slot is not None:
                slot.pods.pop(name, None)
            return key
        if slot is not None and slot.pods.get(name) == pod_fingerprint(pod):
            return None
        return key

    def trigger(self, namespace: str, name: str, *, want_progress: bool = False) -> None:
        """Reconcile soon, in a task of its own (pod events must not wait for a job's reconcile)."""
        task = asyncio.get_running_loop().create_task(
            self._reconcile_logged(namespace, name, want_progress=want_progress)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def forget(self, namespace: str, name: str) -> None:
        slot = self._slots.pop((namespace, name), None)
        if slot is not None:
            if slot.requeue is not None:
                slot.requeue.cancel()
            if slot.uid:
                self.metrics.phases.set(slot.uid, None)
                self._rates.forget(slot.uid)

    def request_audit(self) -> None:
        """kopf relisted the jobs (a watch started again): the next resync round checks which jobs still exist."""
        self._audit_due = True

    async def audit_jobs(self) -> list[JobKey]:
        """Forget every remembered job that no longer exists (deleted while the watch was broken); those forgotten."""
        listed_from = self.monotonic()
        self._audit_due = False
        listed: list[dict[str, Any]] = []
        try:
            for namespace in self.settings.namespaces or (None,):
                listed += await self.api.list_jobs(namespace)
        except ApiError:
            self._audit_due = True
            raise
        self._audited_at = listed_from
        remembered = {key: RememberedJob(slot.uid, slot.seen_at) for key, slot in self._slots.items()}
        gone = jobs_gone(remembered, listed, listed_from)
        for key in gone:
            log.info("forgetting %s/%s: it was deleted while the watch was not looking", *key)
            self.forget(*key)
        return gone

    def _audit_needed(self) -> bool:
        return self._audit_due or self._audited_at is None or self.monotonic() - self._audited_at >= AUDIT_SECONDS

    def is_settled(self, namespace: str, name: str, body: Mapping[str, Any]) -> bool:
        """A finished or suspended job with nothing left to do needs no resync reconcile until it changes."""
        slot = self._slots.get((namespace, name))
        generation = (body.get("metadata") or {}).get("generation")
        return slot is not None and slot.settled and slot.reconciled_generation == generation

    def known_jobs(self) -> list[tuple[str, str]]:
        """(namespace, name) of every job the watch has shown and not yet reported deleted."""
        return list(self._slots)

    def pause(self) -> None:
        """Stop acting on remembered jobs (another replica took over); kopf relists them when it resumes."""
        if not self.paused:
            self.paused = True
            for key in list(self._slots):
                self.forget(*key)

    # ---- resync ------------------------------------------------------------------------------------------

    def resync_one(self, namespace: str, name: str) -> bool:
        """Start the resync reconcile of one job (reading progress); False when none is needed right now.

        A job whose reconcile runs already is skipped (that one sees the newest state), as is a settled one, a
        queued one (Kueue's admission arrives as a Workload watch event; no deadline runs while queued), and a
        running one whose progress is not due: its pods' changes arrive as watch events and its deadline as a
        requeue, so a round would only list its pods again.
        """
        slot = self._slots.get((namespace, name))
        if self.paused or slot is None or slot.lock.locked():
            return False
        if slot.body is not None and self.is_settled(namespace, name, slot.body):
            return False
        status = slot.status or {}
        if status.get("phase") == c.PHASE_QUEUED:
            return False
        if status.get("phase") == c.PHASE_RUNNING and not self._progress_due(slot, status):
            return False
        self.trigger(namespace, name, want_progress=True)
        return True

    async def resync_forever(self, period: float, active: ActiveCheck | None = None) -> None:
        """Every ``period`` seconds, reconcile each known job once, the starts spread evenly over the period.

        No thundering herd: 200 jobs at 5 s start one reconcile every 25 ms. Never returns (cancel it).
        """
        while True:
            started = self.monotonic()
            try:
                await self._resync_round(started, period, active)
            except Exception:  # the resync must outlive any one round's surprise
                log.exception("a resync round failed")
            await self.sleep(max(0.0, started + period - self.monotonic()))

    async def _resync_round(self, started: float, period: float, active: ActiveCheck | None) -> None:
        if active is not None and not await self._still_active(active):
            self.pause()
            return
        self.paused = False
        if self._audit_needed():
            try:
                await self.audit_jobs()
            except ApiError as exc:
                log.warning("checking which jobs still exist failed; trying again next round: %s", exc)
        keys = self.known_jobs()
        step = period / max(1, len(keys))
        for index, key in enumerate(keys):
            delay = started + index * step - self.monotonic()
            if delay > 0:
                await self.sleep(delay)
            self.resync_one(*key)

    @staticmethod
    async def _still_active(active: ActiveCheck) -> bool:
        try:
            return await active()
        except Exception:
            log.exception("the peering check failed; pausing the resync until it answers")
            return False

    async def _reconcile_logged(self, namespace: str, name: str, *, want_progress: bool = False) -> None:
        try:
            await self.reconcile(namespace, name, want_progress=want_progress)
        except ApiError as exc:
            log.warning("reconcile of %s/%s failed, retrying: %s", namespace, name, exc)
        except Exception:
            log.exception("reconcile of %s/%s crashed", namespace, name)

    # ---- reconcile --------------------------------------------------------------------------------------

    async def reconcile(
        self,
        namespace: str,
        name: str,
        body: Mapping[str, Any] | None = None,
        *,
        want_progress: bool = False,
    ) -> Decision | None:
        """Reconcile one job now, or let the reconcile already running for it go round again.

        Raises ApiError when this call's own pass failed (a retry is already scheduled).
        """
        if body is not None:
            self.job_seen(body)
        key = (namespace, name)
        slot = self._slot(key)
        if slot.lock.locked():
            slot.dirty = True
            slot.want_progress = slot.want_progress or want_progress
            return None
        decision: Decision | None = None
        async with slot.lock:
            first = True
            while first or slot.dirty:
                want = want_progress or slot.want_progress
                slot.dirty = slot.want_progress = False
                try:
                    async with self._resync_passes if want else self._passes:
                        decision = await self._reconcile_once(namespace, name, slot, want_progress=want)
                except ApiError as error:
                    slot.errors += 1
                    self._schedule(key, slot, reconcile_retry_delay(slot.errors, error.retry_after, self._jitter()))
                    if first:
                        raise
                    log.warning("reconcile of %s/%s failed; retrying", namespace, name, exc_info=True)
                else:
                    slot.errors = 0
                first = False
        return decision

    async def _reconcile_once(
        self, namespace: str, name: str, slot: _JobSlot, *, want_progress: bool
    ) -> Decision | None:
        started = time.perf_counter()
        # Observe: the job (cached from the watch, fetched when unknown), its pods and what is needed of events.
        body = slot.body
        read_now, slot.body_read = slot.body_read, False
        if body is None:
            body = await self.api.get_job(namespace, name)
            if body is None:
                self.forget(namespace, name)
                return None
            self.job_seen(body)
            read_now = True
        if (body.get("metadata") or {}).get("deletionTimestamp"):
            return None
        if slot.status is not None:
            body = {**body, "status": slot.status}
        uid = (body.get("metadata") or {}).get("uid")
        pods = [p for p in await self.api.list_job_pods(namespace, name) if _owned_by(p, uid)]
        slot.pods = {str(p["metadata"]["name"]): pod_fingerprint(p) for p in pods}
        views = observe_pods(pods)
        unscheduled = [v.name for v in views if v.phase == "Pending" and not v.scheduled and not v.deleting]
        events = await self.api.list_pod_events(namespace, unscheduled) if unscheduled else []
        old_status: dict[str, Any] = dict(body.get("status") or {})
        message = str(old_status.get("message") or "")
        if API_ERROR_MARK in message:
            # The note about a failed request belongs to that reconcile only; decide sees the plain message.
            body = {**body, "status": {**old_status, "message": message.split(API_ERROR_MARK, 1)[0]}}
        sample = None
        if want_progress and old_status.get("phase") == c.PHASE_RUNNING and self._progress_due(slot, old_status):
            slot.progress_read_at = self.monotonic()
            sample = await self._read_progress(body, views, str(uid))
        queue = await observe_queue(self.api, body, views)
        gang = await observe_gang(self.api, body)

        # Decide.
        now = self.clock()
        decision = decide(body, pods, events, now, self.settings, sample, queue, gang)
        creates = any(isinstance(a, CreateChild) for a in decision.actions)
        if creates and not read_now and not await self._still_there(namespace, name, slot):
            return None

        # Act: deletes, then the Service and ConfigMap, then the pods; one status patch; the Events.
        errors = await self._act(body, decision, slot)
        status = decision.status
        refusal = next((e for e in errors if isinstance(e, PodCreateRefused)), None)
        if refusal is not None:
            # The next pass's decide fails the job if this refusal is permanent or has lasted too long.
            generation = int((body.get("metadata") or {}).get("generation") or 0)
            status = record_create_refusal(status, refusal.status, refusal.message, now, generation)
            self._schedule((namespace, name), slot, REQUEUE_MARGIN_SECONDS)
        if errors:
            status = {**status, "message": f"{status.get('message', '')}{API_ERROR_MARK}{errors[0]})"}
        patch = merge_patch_between(old_status, status)
        if patch:
            written = await self.api.patch_job_status(namespace, name, patch)
            if written is None:
                self.forget(namespace, name)
                return decision
        if self._slots.get((namespace, name)) is not slot:
            return decision  # forgotten meanwhile (the job is gone): remember nothing of it, metrics included
        slot.status = status
        slot.reconciled_generation = (body.get("metadata") or {}).get("generation")
        await self._emit_events(body, decision, now)
        self._record_metrics(body, decision, old_status, status, now)
        # A finished or suspended job with nothing left to do changes only through its own or its pods' watch
        # events; resyncing it would list its pods every round for nothing.
        slot.settled = (
            status.get("phase") in c.SETTLED_PHASES and not decision.actions and decision.requeue_after is None
        )
        if decision.requeue_after is not None:
            self._schedule((namespace, name), slot, decision.requeue_after + REQUEUE_MARGIN_SECONDS)
        elapsed = time.perf_counter() - started
        self.metrics.reconcile_seconds.observe(elapsed)
        log.debug("reconciled %s/%s in %.0f ms: phase %s, %d actions, %d errors", namespace, name, elapsed * 1000,
                  status.get("phase"), len(decision.actions), len(errors))
        if errors:
            raise errors[0] if isinstance(errors[0], ApiError) else ApiError("act", 0, str(errors[0]))
        return decision

    async def _still_there(self, namespace: str, name: str, slot: _JobSlot) -> bool:
        """Whether the remembered job may get children now, read from the API server: the watch may have missed
        its deletion (forgotten here) or an edit (decided again with the new spec)."""
        fresh = await self.api.get_job(namespace, name)
        remembered = (slot.body or {}).get("metadata") or {}
        if fresh is None:
            log.info("%s/%s is gone; forgetting it instead of creating its children", namespace, name)
            self.forget(namespace, name)
            return False
        metadata = fresh.get("metadata") or {}
        self.job_seen(fresh)
        if metadata.get("uid") != remembered.get("uid"):
            self.trigger(namespace, name)  # a new job of the same name, with a slot of its own
            return False
        if metadata.get("generation") != remembered.get("generation") or metadata.get("deletionTimestamp"):
            slot.dirty = slot.body_read = True  # the next pass decides on the body just read
            return False
        return True

    async def _act(self, body: Mapping[str, Any], decision: Decision, slot: _JobSlot) -> list[BaseException]:
        metadata = body.get("metadata") or {}
        namespace = str(metadata.get("namespace") or "default")
        # Adopt with an owner that has no labels: kopf.adopt would copy the job's labels, and a Kueue
        # queue-name label on the pods would make Kueue gate them as workloads of their own.
        owner = kopf.Body({
            "apiVersion": body.get("apiVersion", c.API_VERSION),
            "kind": body.get("kind", c.KIND),
            "metadata": {"name": str(metadata.get("name")), "namespace": namespace, "uid": str(metadata.get("uid"))},
        })
        deletes = [self.api.delete("Pod", namespace, a.name) for a in decision.actions if isinstance(a, DeletePod)]
        if any(isinstance(a, DeleteJob) for a in decision.actions):
            deletes.append(self.api.delete_job(namespace, str(metadata.get("name"))))
        deletes += [self.api.delete_workload(namespace, a.name) for a in decision.actions
                    if isinstance(a, DeleteWorkload)]
        deletes += [self.api.patch_workload_status(namespace, a.name, a.patch) for a in decision.actions
                    if isinstance(a, PatchWorkloadStatus)]
        deletes += [self.api.delete_pod_group(namespace, a.api_version, a.name) for a in decision.actions
                    if isinstance(a, DeletePodGroup)]
        errors = await gather_actions(deletes)
        creates = [a for a in decision.actions if isinstance(a, CreateChild)]

        async def create_child(action: CreateChild) -> None:
            child = copy.deepcopy(dict(action.body))
            kopf.adopt(child, owner=owner)
            if action.update_existing:
                await self.api.create_or_update_data(child)
                return
            try:
                created = await self.api.create(child)
            except ApiError as error:
                if action.kind == "Pod" and 400 <= error.status < 500 and error.status not in (409, 429):
                    raise PodCreateRefused(error.verb, error.status, error.message) from error
                raise
            if created is not None and action.kind == "Pod":
                # Our own ADDED event then needs no reconcile of its own.
                slot.pods[action.name] = pod_fingerprint(created)

        first = [create_child(a) for a in creates if a.kind != "Pod"]
        errors += await gather_actions(first)
        if not errors:
            errors += await gather_actions([create_child(a) for a in creates if a.kind == "Pod"])
        return errors

    async def _emit_events(self, body: Mapping[str, Any], decision: Decision, now: datetime.datetime) -> None:
        if not decision.events_to_emit:
            return
        meta = parse_meta(body)
        api_version = str(body.get("apiVersion", c.API_VERSION))
        errors = await gather_actions([
            self.api.create_event(build_event(meta, e.type, e.reason, e.message, now, api_version=api_version))
            for e in decision.events_to_emit
        ])
        for error in errors:
            log.warning("posting an event for %s/%s failed: %s", meta.namespace, meta.name, error)

    def _record_metrics(
        self,
        body: Mapping[str, Any],
        decision: Decision,
        old: Mapping[str, Any],
        new: Mapping[str, Any],
        now: datetime.datetime,
    ) -> None:
        metadata = body.get("metadata") or {}
        uid = str(metadata.get("uid"))
        old_phase, phase = old.get("phase"), new.get("phase")
        self.metrics.phases.set(uid, phase)
        if phase == old_phase:
            return
        # The phase transition's Event comes first and carries its reason.
        reason = decision.events_to_emit[0].reason if decision.events_to_emit else str(phase)
        if old_phase is None:
            self.metrics.jobs_created.inc()
        if phase == c.PHASE_SUCCEEDED:
            self.metrics.jobs_succeeded.inc()
        elif phase == c.PHASE_FAILED:
            self.metrics.jobs_failed.labels(reason=reason).inc()
        elif phase == c.PHASE_RESTARTING:
            self.metrics.jobs_restarted.labels(reason=reason).inc()
        if phase == c.PHASE_RUNNING and not old.get("startTime") and new.get("startTime"):
            created = parse_time(metadata.get("creationTimestamp"))
            if created is not None:
                self.metrics.submitted_to_running_seconds.observe(max(0.0, (now - created).total_seconds()))

    def _progress_due(self, slot: _JobSlot, status: Mapping[str, Any]) -> bool:
        if slot.progress_read_at is None or "progress" not in status:
            return True
        return self.monotonic() - slot.progress_read_at >= self.settings.progress_seconds

    async def _read_progress(self, body: Mapping[str, Any], views: list[Any], uid: str) -> ProgressSample | None:
        status = body.get("status") or {}
        attempt = status.get("attempt", 0)
        rank0 = next((v for v in views if v.rank == 0 and v.attempt == attempt and v.phase == "Running"), None)
        if rank0 is None or not rank0.pod_ip:
            return None
        port = ((body.get("spec") or {}).get("metrics") or {}).get("port", 9400)
        if self._fetch is not None:
            sample = await self._fetch(rank0.pod_ip, int(port))
        else:
            if self._http is None:
                self._http = aiohttp.ClientSession()
            sample = await fetch_progress(self._http, rank0.pod_ip, int(port))
        if sample is None:
            return None
        return self._rates.observe(uid, sample)

    def _schedule(self, key: tuple[str, str], slot: _JobSlot, delay: float) -> None:
        """Reconcile this job again after ``delay`` seconds (one pending requeue per job, the earliest wins)."""
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        existing = slot.requeue
        if existing is not None and not existing.cancelled() and loop.time() < existing.when() <= when:
            return
        if existing is not None:
            existing.cancel()
        slot.requeue = loop.call_at(when, self._requeued, *key)

    def _requeued(self, namespace: str, name: str) -> None:
        slot = self._slots.get((namespace, name))
        if slot is not None:
            slot.requeue = None
        if not self.paused:
            self.trigger(namespace, name)


async def observe_queue(
    api: KubeApi, body: Mapping[str, Any], views: Sequence[PodView]
) -> QueueObservation | None:
    """For a job with spec.queueName: its Kueue Workload (or why its API cannot be used); its
    WorkloadPriorityClass when the Workload is to be created; the admitted flavors while the gang has pods to
    create. Nothing is read for other jobs."""
    spec, metadata = body.get("spec") or {}, body.get("metadata") or {}
    if not spec.get("queueName"):
        return None
    namespace, name = str(metadata.get("namespace") or "default"), str(metadata.get("name"))
    try:
        workload = observe_workload(await api.get_workload(namespace, workload_name(name)))
    except ApiError as error:
        # Not served (no Kueue CRD) or forbidden (the chart did not grant it): the job fails saying which. RBAC
        # answers 403 before routing, so a 403 for an API that is not there is told apart by discovery.
        if error.status not in (403, 404):
            raise
        served = error.status == 403 and await api.serves(c.KUEUE_API_VERSION, c.KUEUE_WORKLOADS)
        return QueueObservation(unavailable=workload_unavailable_message(403 if served else 404, error.message))
    priority_class = spec.get("workloadPriorityClass")
    if workload is None and priority_class:
        found = await api.get_workload_priority_class(str(priority_class))
        value = (found or {}).get("value")
        return QueueObservation(None, None, value if isinstance(value, int) else 0, found is None)
    if workload is None or not workload.admitted or workload.evicted:
        return QueueObservation(workload)
    attempt = max([int((body.get("status") or {}).get("attempt") or 0), *(view.attempt for view in views)])
    nodes = int((spec.get("distributed") or {}).get("nodes") or 1)
    if sum(1 for view in views if view.attempt == attempt and not view.deleting) >= nodes:
        return QueueObservation(workload)
    flavors = await asyncio.gather(*(api.get_resource_flavor(flavor) for flavor in workload.flavor_names))
    return QueueObservation(workload, placement_of(flavor for flavor in flavors if flavor))


async def observe_gang(api: KubeApi, body: Mapping[str, Any]) -> GangObservation | None:
    """For a job with spec.gang: its PodGroups (a deleted job's of the same name left out), or why the
    scheduler's PodGroup API cannot be used (not served: no CRD; forbidden: the chart did not grant it)."""
    spec, metadata = body.get("spec") or {}, body.get("metadata") or {}
    gang = spec.get("gang") if isinstance(spec, Mapping) else None
    scheduler = str(gang.get("scheduler")) if isinstance(gang, Mapping) else ""
    api_version = c.POD_GROUP_API_VERSIONS.get(scheduler)
    if api_version is None:
        return None
    namespace, name = str(metadata.get("namespace") or "default"), str(metadata.get("name"))
    try:
        items = await api.list_pod_groups(namespace, name, api_version)
    except ApiError as error:
        if error.status != 403:
            raise
        # A 403 comes before routing: discovery tells whether the CRD is missing too.
        status = 403 if await api.serves(api_version, c.POD_GROUPS) else 404
        message = unavailable_message(scheduler, api_version, status, error.message)
        return GangObservation(api_version, unavailable=message)
    if items is None:
        return GangObservation(api_version, unavailable=unavailable_message(scheduler, api_version, 404))
    owned = [item for item in items if _owned_by(item, metadata.get("uid"))]
    return GangObservation(api_version, observe_pod_groups(owned))


def _owned_by(pod: Mapping[str, Any], uid: Any) -> bool:
    """Pods of a deleted job of the same name (owned by another uid) are left to the garbage collector."""
    refs = (pod.get("metadata") or {}).get("ownerReferences") or []
    controllers = [ref for ref in refs if ref.get("controller")]
    return not controllers or any(ref.get("uid") == uid for ref in controllers)

"""Thin kopf handlers: watch events of jobs, their pods and their Kueue Workloads trigger the reconcile; the
operator's own resync task reconciles every known job periodically.

Only the operator's pods are watched, selected by the API server (kopf's handler label filters apply in the client,
after every pod of the cluster has been listed and streamed). The liveness probe fails when the resync task or one
of kopf's watch tasks has ended, so that Kubernetes restarts an operator that would no longer see changes.

No handler needs a finalizer (kopf adds one for timers, daemons and mandatory deletion handlers): a FineTuneJob
deleted while the operator is down goes away at once, and the garbage collector removes its children through their
owner references. Only ``on.event`` handlers watch the jobs, so kopf writes nothing to them either (no finalizer, no
progress or last-handled-configuration annotations); the reconcile is level-based and needs no handler state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
from collections.abc import Iterable
from typing import Any, Final, cast

import kopf

from finetune_operator import constants as c
from finetune_operator.api import (
    API_RBAC,
    COSCHEDULING_API_RBAC,
    KUEUE_API_RBAC,
    LIST_CHUNK,
    OWNER_RBAC,
    PEERING_API_GROUP,
    VOLCANO_API_RBAC,
    KubeApi,
    Rule,
    load_connection,
    peering_rbac,
)
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.peering import PeeringCheck
from finetune_operator.reconcile import Reconciler
from finetune_operator.settings import Settings

JOBS = (c.GROUP, c.VERSION, c.PLURAL)
MEMO_RECONCILER = "reconciler"
MEMO_METRICS = "metrics"
MEMO_RESYNC = "resync"
MEMO_IDENTITY = "identity"
MEMO_PRIORITY = "priority"
MEMO_WATCHING = "watching"
PODS = ("", "v1", "pods")
IDLE_WORKER_SECONDS = 0.5
WORKLOADS = (c.KUEUE_GROUP, c.KUEUE_VERSION, c.KUEUE_WORKLOADS)

# What kopf itself does with the handlers below: list and watch the jobs and the labelled pods, post Events
# (warnings and errors), watch CRDs to notice the FineTuneJob CRD change (cluster-scoped), and with peering list,
# watch and patch (keep-alives) the peering object. A cluster-wide kopf watches across all namespaces and never
# lists them; given namespaces by name, it lists and watches namespaces (KOPF_NAMESPACED_RBAC).
KOPF_RBAC: Final[frozenset[Rule]] = frozenset({
    (c.GROUP, c.PLURAL, "list"),
    (c.GROUP, c.PLURAL, "watch"),
    ("", "pods", "list"),
    ("", "pods", "watch"),
    ("", "events", "create"),
})
KOPF_CLUSTER_RBAC: Final[frozenset[Rule]] = frozenset({
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
})
# Watching named namespaces (not cluster-wide), kopf also lists and watches namespaces to start and stop its
# per-namespace watches; refused, it retries for about a minute before it falls back to the names it was given.
KOPF_NAMESPACED_RBAC: Final[frozenset[Rule]] = frozenset({
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
})


# With Kueue: kopf lists and watches the jobs' Workloads (admission and eviction trigger the job's reconcile).
# Where Kueue's CRDs do not exist, kopf serves no such resource and asks for nothing.
KOPF_KUEUE_RBAC: Final[frozenset[Rule]] = frozenset({
    (c.KUEUE_GROUP, c.KUEUE_WORKLOADS, "list"),
    (c.KUEUE_GROUP, c.KUEUE_WORKLOADS, "watch"),
})


def kopf_peering_rbac(clusterwide: bool) -> frozenset[Rule]:
    plural = "clusterkopfpeerings" if clusterwide else "kopfpeerings"
    return frozenset({(PEERING_API_GROUP, plural, verb) for verb in ("list", "watch", "patch")})


def required_rbac(*, clusterwide: bool, peering: bool, kueue: bool = False, volcano: bool = False,
                  coscheduling: bool = False) -> frozenset[Rule]:
    """Every permission the operator uses, its own requests (api.API_RBAC) and kopf's: exactly the chart's RBAC
    (``kueue`` where Kueue's CRDs exist; ``volcano`` and ``coscheduling`` with the chart's gangScheduling values)."""
    rules = API_RBAC | OWNER_RBAC | KOPF_RBAC | KOPF_CLUSTER_RBAC
    if kueue:
        rules |= KUEUE_API_RBAC | KOPF_KUEUE_RBAC
    if volcano:
        rules |= VOLCANO_API_RBAC
    if coscheduling:
        rules |= COSCHEDULING_API_RBAC
    if not clusterwide:
        rules |= KOPF_NAMESPACED_RBAC
    if peering:
        rules |= peering_rbac(clusterwide) | kopf_peering_rbac(clusterwide)
    return rules


def peering_priority() -> int:
    """A random priority per replica: kopf pauses every peer when the highest priority is shared."""
    return random.SystemRandom().randint(1, 1_000_000)


def peering_identity() -> str:
    """This replica's name among the peers: the host (the pod name in a cluster), the process and a random tail."""
    return f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: Settings) -> None:
    """kopf's settings for this operator (called at start-up, before any watch begins)."""
    # The operator posts its own Events for phase changes; kopf's per-handler "succeeded" Events would only
    # double the API writes of every job.
    kopf_settings.posting.level = logging.WARNING
    kopf_settings.posting.reporting_component = c.MANAGED_BY
    # Only on.event handlers: kopf keeps no handler progress and writes nothing to the jobs. Should a changing
    # handler ever be added, its bookkeeping must go to annotations: the CRD's structural schema prunes status.kopf.
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage()
    kopf_settings.peering.standalone = settings.peering is None
    kopf_settings.peering.clusterwide = settings.clusterwide
    if settings.peering is not None:
        kopf_settings.peering.name = settings.peering
        kopf_settings.peering.priority = peering_priority()
    # Pods and Kueue Workloads are listed and watched only with the operator's label (other teams' Workloads are
    # none of its business), and every initial list (or relist) comes in pages.
    kopf_settings.watching.label_selectors[PODS] = c.LABEL_JOB_NAME
    kopf_settings.watching.label_selectors[WORKLOADS] = c.LABEL_JOB_NAME
    kopf_settings.watching.chunk_size = LIST_CHUNK
    # Watches reconnect regularly so a silently dropped connection cannot hide events for long.
    kopf_settings.watching.server_timeout = 300
    kopf_settings.watching.client_timeout = 330
    kopf_settings.networking.request_timeout = 60
    # kopf keeps a worker task per object for this long after its last event, holding that event's whole body: 5 s
    # (kopf's default) of a thousand new jobs' and pods' bodies at once during a burst. Our handlers only trigger a
    # reconcile, so a worker started again for a later event costs nothing worth keeping them for.
    kopf_settings.queueing.idle_timeout = IDLE_WORKER_SECONDS


async def operate(
    settings: Settings,
    *,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
) -> None:
    """Run the operator in the current event loop until ``stop_flag`` is set (or a signal arrives)."""
    kopf_settings = kopf.OperatorSettings()
    configure_kopf(kopf_settings, settings)
    # Our own identity (not kopf's guess) so the resync's peering check finds this replica among the peers.
    identity = peering_identity()
    memo = kopf.Memo()
    memo[MEMO_IDENTITY] = identity
    memo[MEMO_PRIORITY] = kopf_settings.peering.priority
    await kopf.operator(
        registry=build_registry(settings),
        settings=kopf_settings,
        identity=cast(Any, identity),  # kopf's Identity is a NewType of str, not exported
        standalone=settings.peering is None,
        peering_name=settings.peering,
        clusterwide=settings.clusterwide,
        namespaces=settings.namespaces,
        liveness_endpoint=settings.liveness_endpoint,
        memo=memo,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def missing_watches(task_names: Iterable[str], namespaces: Iterable[str]) -> list[str]:
    """The watches of jobs and pods (per namespace, or cluster-wide) that have no running kopf watcher task.

    kopf names a watcher's task ``watcher for <plural>.<version>[.<group>]@<namespace or None>``.
    """
    running = set()
    for name in task_names:
        if name.startswith("watcher for "):
            resource, _, namespace = name.removeprefix("watcher for ").rpartition("@")
            running.add(f"{resource.split('.', 1)[0]}@{namespace}")
    wanted = [f"{plural}@{namespace}" for plural in (c.PLURAL, PODS[2]) for namespace in (list(namespaces) or ["None"])]
    return [watch for watch in wanted if watch not in running]


def _reconciler(memo: kopf.Memo) -> Reconciler:
    reconciler: Reconciler = memo[MEMO_RECONCILER]
    return reconciler


def build_registry(settings: Settings) -> kopf.OperatorRegistry:
    """A registry with every handler of the operator; nothing is registered at import time."""
    registry = kopf.OperatorRegistry()
    operator_settings = settings

    @kopf.on.login(id="login", registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        # Explicit, read at login time: the kubernetes client would read KUBECONFIG once at import.
        return load_connection(settings.kubeconfig)

    @kopf.on.startup(id="startup", registry=registry)
    async def startup(memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
        metrics = OperatorMetrics()
        port = metrics.serve(operator_settings.metrics_port, operator_settings.bind_address)
        api = KubeApi(lambda: load_connection(operator_settings.kubeconfig), metrics)
        reconciler = Reconciler(api, operator_settings, metrics)
        memo[MEMO_METRICS] = metrics
        memo[MEMO_RECONCILER] = reconciler
        active = None
        if operator_settings.peering is not None:
            active = PeeringCheck(api, operator_settings.peering, operator_settings.namespaces,
                                  memo.get(MEMO_IDENTITY, ""), int(memo.get(MEMO_PRIORITY, 0)))
        memo[MEMO_RESYNC] = asyncio.get_running_loop().create_task(
            reconciler.resync_forever(operator_settings.resync_seconds, active), name="finetunejob resync")
        logger.info("FineTuneJob operator: metrics on %s:%d, namespaces %s, trainer image %s, resync every %gs",
                    operator_settings.bind_address, port, ",".join(operator_settings.namespaces) or "all",
                    operator_settings.trainer_image, operator_settings.resync_seconds)

    @kopf.on.probe(id="watching", registry=registry)
    async def watching(memo: kopf.Memo, **_: Any) -> str:
        # A PermanentError turns /healthz into a 500 at once (kopf retries other errors first).
        resync: asyncio.Task[None] | None = memo.get(MEMO_RESYNC)
        if resync is not None and resync.done():
            raise kopf.PermanentError("the resync task has ended")
        started = memo.get(MEMO_WATCHING, False)
        missing = missing_watches((t.get_name() for t in asyncio.all_tasks()), operator_settings.namespaces)
        if missing and started:
            raise kopf.PermanentError(f"kopf's watches ended: {', '.join(missing)}")
        # Until every watch has started once (kopf starts them after its first scan of the CRDs), none is missing.
        memo[MEMO_WATCHING] = started or not missing
        return "ok"

    @kopf.on.cleanup(id="cleanup", registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        if MEMO_RESYNC in memo:
            task: asyncio.Task[None] = memo[MEMO_RESYNC]
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if MEMO_RECONCILER in memo:
            await _reconciler(memo).close()
        if MEMO_METRICS in memo:
            memo[MEMO_METRICS].stop()

    @kopf.on.event(*JOBS, id="job-event", registry=registry)
    async def job_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        # Every job the watch shows (created, edited, or listed when the operator starts) is remembered for the
        # resync; a new one or a new generation is reconciled now. DELETED forgets it. A listed job (no event
        # type) means kopf (re)started its watch: the jobs deleted while it was down are found by an audit.
        reconciler = _reconciler(memo)
        if event.get("type") is None:
            reconciler.request_audit()
        if reconciler.job_seen(dict(body), event.get("type")) and not body.meta.get("deletionTimestamp"):
            reconciler.trigger(body.meta.namespace or "default", body.meta.name or "")

    @kopf.on.event(*PODS, id="pod-event", labels={c.LABEL_JOB_NAME: kopf.PRESENT}, registry=registry)
    async def pod_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        reconciler = _reconciler(memo)
        owner = reconciler.pod_changed(body, event.get("type"))
        if owner is not None:
            reconciler.trigger(*owner)

    @kopf.on.event(*WORKLOADS, id="workload-event", labels={c.LABEL_JOB_NAME: kopf.PRESENT}, registry=registry)
    async def workload_event(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        # Admission, eviction, a deleted Workload: the job named in its label decides what follows.
        job_name = body.meta.labels.get(c.LABEL_JOB_NAME)
        if job_name:
            _reconciler(memo).trigger(body.meta.namespace or "default", job_name)

    return registry

"""Thin kopf handlers: create, resume, update, a timer and pod events all run the same reconcile."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import kopf

from finetune_operator import constants as c
from finetune_operator.api import ApiError, KubeApi, load_connection
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.reconcile import ERROR_BACKOFF_SECONDS, Reconciler
from finetune_operator.settings import Settings

JOBS = (c.GROUP, c.VERSION, c.PLURAL)
MEMO_RECONCILER = "reconciler"
MEMO_METRICS = "metrics"


def peering_priority() -> int:
    """A random priority per replica: kopf pauses every peer when the highest priority is shared."""
    return random.SystemRandom().randint(1, 1_000_000)


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: Settings) -> None:
    """kopf's settings for this operator (called at start-up, before any watch begins)."""
    # The operator posts its own Events for phase changes; kopf's per-handler "succeeded" Events would only
    # double the API writes of every job.
    kopf_settings.posting.level = logging.WARNING
    kopf_settings.posting.reporting_component = c.MANAGED_BY
    # The CRD's structural schema prunes status.kopf, so kopf's retry bookkeeping lives in annotations only.
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage()
    kopf_settings.peering.standalone = settings.peering is None
    kopf_settings.peering.clusterwide = settings.clusterwide
    if settings.peering is not None:
        kopf_settings.peering.name = settings.peering
        kopf_settings.peering.priority = peering_priority()
    # Watches reconnect regularly so a silently dropped connection cannot hide events for long.
    kopf_settings.watching.server_timeout = 300
    kopf_settings.watching.client_timeout = 330
    kopf_settings.networking.request_timeout = 60


async def operate(
    settings: Settings,
    *,
    stop_flag: asyncio.Event | None = None,
    ready_flag: asyncio.Event | None = None,
) -> None:
    """Run the operator in the current event loop until ``stop_flag`` is set (or a signal arrives)."""
    kopf_settings = kopf.OperatorSettings()
    configure_kopf(kopf_settings, settings)
    await kopf.operator(
        registry=build_registry(settings),
        settings=kopf_settings,
        standalone=settings.peering is None,
        peering_name=settings.peering,
        clusterwide=settings.clusterwide,
        namespaces=settings.namespaces,
        liveness_endpoint=settings.liveness_endpoint,
        memo=kopf.Memo(),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def _reconciler(memo: kopf.Memo) -> Reconciler:
    reconciler: Reconciler = memo[MEMO_RECONCILER]
    return reconciler


def _retry_delay(error: ApiError) -> float:
    return ERROR_BACKOFF_SECONDS[2] if error.status in (0, 429) or error.status >= 500 else ERROR_BACKOFF_SECONDS[-1]


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
        memo[MEMO_METRICS] = metrics
        memo[MEMO_RECONCILER] = Reconciler(api, operator_settings, metrics)
        logger.info("FineTuneJob operator: metrics on %s:%d, namespaces %s, trainer image %s",
                    operator_settings.bind_address, port, ",".join(operator_settings.namespaces) or "all",
                    operator_settings.trainer_image)

    @kopf.on.cleanup(id="cleanup", registry=registry)
    async def cleanup(memo: kopf.Memo, **_: Any) -> None:
        if MEMO_RECONCILER in memo:
            await _reconciler(memo).close()
        if MEMO_METRICS in memo:
            memo[MEMO_METRICS].stop()

    @kopf.on.create(*JOBS, id="reconcile", registry=registry)
    @kopf.on.resume(*JOBS, id="reconcile", registry=registry)
    @kopf.on.update(*JOBS, id="reconcile", registry=registry)
    async def reconcile_job(
        spec: kopf.Spec, patch: kopf.Patch, logger: kopf.Logger, body: kopf.Body, memo: kopf.Memo, **_: Any
    ) -> None:
        # The spec is only read; status goes through the reconciler's single status patch, never kopf's patch.
        try:
            await _reconciler(memo).reconcile(body.meta.namespace or "default", body.meta.name or "", dict(body))
        except ApiError as error:
            raise kopf.TemporaryError(str(error), delay=_retry_delay(error)) from error

    @kopf.on.timer(*JOBS, id="resync", interval=settings.resync_seconds, registry=registry)
    async def resync_job(
        spec: kopf.Spec, patch: kopf.Patch, logger: kopf.Logger, body: kopf.Body, memo: kopf.Memo, **_: Any
    ) -> None:
        reconciler = _reconciler(memo)
        namespace, name = body.meta.namespace or "default", body.meta.name or ""
        if reconciler.is_settled(namespace, name, body):
            return
        try:
            await reconciler.reconcile(namespace, name, dict(body), want_progress=True)
        except ApiError as error:
            raise kopf.TemporaryError(str(error), delay=_retry_delay(error)) from error

    @kopf.on.event(*JOBS, id="job-event", registry=registry)
    async def job_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        # The watch event arrives before kopf's create handler (which waits for kopf's finalizer): reacting
        # here starts the pods one round trip earlier.
        reconciler = _reconciler(memo)
        if reconciler.job_seen(dict(body), event.get("type")) and not body.meta.get("deletionTimestamp"):
            reconciler.trigger(body.meta.namespace or "default", body.meta.name or "")

    @kopf.on.event("", "v1", "pods", id="pod-event", labels={c.LABEL_JOB_NAME: kopf.PRESENT}, registry=registry)
    async def pod_event(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        reconciler = _reconciler(memo)
        owner = reconciler.pod_changed(body, event.get("type"))
        if owner is not None:
            reconciler.trigger(*owner)

    return registry

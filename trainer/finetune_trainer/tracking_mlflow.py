"""MLflow tracking of a run (``tracking.mlflow``), on rank 0 only, through a ``TrainerCallback``.

Every MLflow call goes through the ``tracking.SendQueue`` thread, so the training loop never waits on the tracking
server. Logged: the recipe as params, tags (job namespace/name/uid, attempt, base model URI and its sha256/ETags),
each logged metric per step (loss, learning rate, grad norm, eval loss, epoch, tokens/s), ``result.json`` and the
evaluation samples (``<output.uri>/samples.jsonl``, when present) as artifacts, and with ``registerModelAs`` a new
model version whose source is the exported model's S3 URI. One run per job: the run id is written into every
checkpoint (``tracking.json``); a resumed attempt logs to that run, or to the run tagged with the job's uid when no
checkpoint names one yet, and its steps continue from the checkpoint's. The run and the server's reachability are
exposed on rank 0's metrics endpoint, where the operator reads them into ``status.tracking``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune_trainer.config import TrainerConfig
from finetune_trainer.distributed import DistContext
from finetune_trainer.metrics import LABELS, TrainerMetrics
from finetune_trainer.storage import ObjectStore
from finetune_trainer.tracking import (
    MAX_BATCH_PARAMS,
    RUN_FILE,
    TAG_JOB_UID,
    TAG_OUTPUT_URI,
    MetricPoint,
    SendQueue,
    StoredRun,
    choose_run,
    flatten_params,
    metric_points,
    model_etags,
    read_stored_run,
    run_tags,
)

log = logging.getLogger(__name__)

# Bounded waits: one HTTP request, and the end of the run for what is still queued.
REQUEST_TIMEOUT_S = 10
DRAIN_TIMEOUT_S = 30.0
# At the end, how long result.json waits for a run still being started.
RUN_START_WAIT_S = 15.0
SAMPLES_NAME = "samples.jsonl"
RESULT_NAME = "result.json"
# The client's own retries would hold the send thread for minutes; the queue retries instead. No telemetry.
CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT_S),
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
}


class NoRunError(RuntimeError):
    """The server refused to start the run, so there is nothing to log to."""


def is_permanent(exc: BaseException) -> bool:
    """The server answered and refused (a 4xx other than timeouts and throttling): retrying cannot help."""
    from mlflow.exceptions import RestException

    if isinstance(exc, NoRunError):
        return True
    if isinstance(exc, RestException):
        status = int(exc.get_http_status_code())  # type: ignore[no-untyped-call]
        return 400 <= status < 500 and status not in (408, 429)
    return False


class TrackingGauges:
    """rank 0's tracking series: ``finetune_tracking_run_info{run_id,experiment_id} 1``, ``finetune_tracking_up``
    (1: the latest call succeeded, 0: it failed) and ``finetune_tracking_queued`` (updates waiting)."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self._info = Gauge("finetune_tracking_run_info", "The tracking run rank 0 logs to (value 1).",
                           (*LABELS, "run_id", "experiment_id"), registry=registry)
        self._labels = labels
        self.up = Gauge("finetune_tracking_up", "1 when rank 0's latest call to the tracking server succeeded.",
                        LABELS, registry=registry).labels(**labels)
        self.queued = Gauge("finetune_tracking_queued", "Tracking updates waiting to be sent.", LABELS,
                            registry=registry).labels(**labels)
        # Unknown until the first call ends: the operator reads NaN as "no news", not as an unreachable server.
        self.up.set(math.nan)

    def run(self, run_id: str, experiment_id: str) -> None:
        self._info.clear()
        self._info.labels(**self._labels, run_id=run_id, experiment_id=experiment_id).set(1)

    def state(self, up: bool | None, queued: int) -> None:
        if up is not None:
            self.up.set(1 if up else 0)
        self.queued.set(queued)


class MlflowTracker:
    """The job's MLflow run: resolved, fed and closed through the send queue."""

    def __init__(
        self,
        config: TrainerConfig,
        store: ObjectStore,
        gauges: TrackingGauges,
        *,
        stored: StoredRun | None,
        world_size: int,
        model_dir: Path | None = None,
        client_factory: Callable[[str], Any] | None = None,
    ) -> None:
        assert config.tracking.mlflow is not None
        self.config = config
        self.settings = config.tracking.mlflow
        self.store = store
        self.gauges = gauges
        self.stored = stored
        self.world_size = world_size
        self.model_dir = model_dir
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.finished = False
        self._client_factory = client_factory or _mlflow_client
        self._client: Any = None
        self.queue = SendQueue(self._send_points, is_permanent=is_permanent, on_state=gauges.state)

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = self._client_factory(self.settings.trackingUri)
        return self._client

    def start(self) -> None:
        self.queue.call("start the run", self._start_run)
        self.queue.start()

    # calls made on the send thread ----------------------------------------------------------------------------

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(self.settings.experiment)
        if experiment is None:
            try:
                return str(self.client.create_experiment(self.settings.experiment))
            except MlflowException:  # created meanwhile by another job
                experiment = self.client.get_experiment_by_name(self.settings.experiment)
                if experiment is None:
                    raise
        if experiment.lifecycle_stage == "deleted":
            self.client.restore_experiment(experiment.experiment_id)
        return str(experiment.experiment_id)

    def _stored_state(self) -> str | None:
        from mlflow.exceptions import MlflowException

        if self.stored is None:
            return None
        try:
            return str(self.client.get_run(self.stored.run_id).info.lifecycle_stage)
        except MlflowException as exc:
            if is_permanent(exc):  # not found
                return None
            raise

    def _start_run(self) -> None:
        experiment_id = self._experiment_id()
        identity = (f"tags.`{TAG_JOB_UID}` = '{self.config.job.uid}'" if self.config.job.uid
                    else f"tags.`{TAG_OUTPUT_URI}` = '{self.config.output.uri}'")
        tagged = [(run.info.run_id, run.info.start_time or 0)
                  for run in self.client.search_runs([experiment_id], filter_string=identity, max_results=5)]
        choice = choose_run(self.stored, self.settings.trackingUri, self._stored_state(), tagged)
        tags = run_tags(self.config, world_size=self.world_size,
                        model_etags=model_etags(self.model_dir) if self.model_dir else None)
        if choice.run_id is None:
            run = self.client.create_run(experiment_id, tags=tags,
                                         run_name=self.settings.runName or self.config.job.name)
            run_id, experiment_id = run.info.run_id, run.info.experiment_id
        else:
            run_id = choice.run_id
            experiment_id = str(self.client.get_run(run_id).info.experiment_id)
            self.client.update_run(run_id, status="RUNNING")
            self._log_batch(run_id, tags=tags)
        self.run_id, self.experiment_id = run_id, experiment_id
        self.gauges.run(run_id, experiment_id)
        log.info("tracking: MLflow run %s (%s) in experiment %s", run_id,
                 "new" if choice.run_id is None else choice.reason, self.settings.experiment)
        # A call of its own: a param the server refuses (another value for a resumed run) loses nothing else.
        self.queue.call("log the params", self._log_params)

    def _log_params(self) -> None:
        assert self.run_id is not None
        params = sorted(flatten_params(self.config).items())
        for start in range(0, len(params), MAX_BATCH_PARAMS):
            self._log_batch(self.run_id, params=params[start:start + MAX_BATCH_PARAMS])

    def _terminate(self, status: str) -> None:
        if self.run_id is not None:  # no run was ever started: nothing to end
            self.client.set_terminated(self.run_id, status)

    def _log_batch(self, run_id: str, *, params: list[tuple[str, str]] | None = None,
                   tags: dict[str, str] | None = None) -> None:
        from mlflow.entities import Param, RunTag

        self.client.log_batch(run_id, params=[Param(k, v) for k, v in params or []],
                              tags=[RunTag(k, v) for k, v in (tags or {}).items()], synchronous=True)

    def _send_points(self, points: list[MetricPoint]) -> None:
        from mlflow.entities import Metric

        if self.run_id is None:  # its start was refused (the queue retries a start that failed otherwise)
            raise NoRunError("no MLflow run")
        self.client.log_batch(self.run_id, metrics=[Metric(p.key, p.value, p.timestamp_ms, p.step) for p in points],
                              synchronous=True)

    def _log_text(self, name: str, data: bytes) -> None:
        assert self.run_id is not None
        with tempfile.TemporaryDirectory(prefix="tracking-") as folder:
            path = Path(folder) / name
            path.write_bytes(data)
            self.client.log_artifact(self.run_id, str(path))

    def _log_samples(self) -> None:
        if self.store.exists(SAMPLES_NAME):
            self._log_text(SAMPLES_NAME, self.store.get_bytes(SAMPLES_NAME))

    def _register(self, model_uri: str) -> None:
        from mlflow.exceptions import MlflowException

        name = self.settings.registerModelAs
        assert name is not None and self.run_id is not None
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
        existing = self.client.search_model_versions(f"name = '{name}' and run_id = '{self.run_id}'")
        if any(version.source == model_uri for version in existing):
            return  # an earlier attempt registered this export already
        version = self.client.create_model_version(name, source=model_uri, run_id=self.run_id, await_creation_for=0)
        log.info("tracking: registered %s version %s from %s", name, version.version, model_uri)

    # what the run does -------------------------------------------------------------------------------------------

    def log_metrics(self, logs: dict[str, Any], step: int, tokens_per_second: float | None) -> None:
        self.queue.points(metric_points(logs, step=step, now=time.time(), tokens_per_second=tokens_per_second))

    def evaluated(self) -> None:
        self.queue.call("log samples.jsonl", self._log_samples)

    def write_run_file(self, checkpoint_dir: Path) -> None:
        """``tracking.json`` into a checkpoint folder being saved, once the run is known."""
        if self.run_id is not None and self.experiment_id is not None:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            stored = StoredRun(self.run_id, self.experiment_id, self.settings.trackingUri)
            (checkpoint_dir / RUN_FILE).write_text(stored.to_json())

    def run_info(self, wait: float = 0.0) -> dict[str, str] | None:
        """{runId, experimentId} once the run is known (result.json and the operator's final status carry it).

        ``wait``: seconds to give a run still being started (a short job can end before MLflow's client has even
        loaded); a server that failed a call is not waited for."""
        deadline = time.monotonic() + wait
        while self.run_id is None and self.queue.failures == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.run_id is None or self.experiment_id is None:
            return None
        return {"runId": self.run_id, "experimentId": self.experiment_id}

    def finish(self, result: dict[str, Any], model_uri: str) -> None:
        """After the export and result.json: the artifacts, the model version, the run FINISHED."""
        self.finished = True
        data = json.dumps(result, indent=2).encode()
        self.queue.call("log result.json", lambda: self._log_text(RESULT_NAME, data))
        self.queue.call("log samples.jsonl", self._log_samples)
        succeeded = result.get("status", "succeeded") == "succeeded"
        if self.settings.registerModelAs and succeeded:
            self.queue.call("register the model", lambda: self._register(model_uri))
        self.queue.call("end the run", lambda: self._terminate("FINISHED" if succeeded else "FAILED"))

    def close(self) -> None:
        """Drain the queue (bounded) and say what could not be sent. A run that did not finish (preempted, failed)
        is marked KILLED; the next attempt sets it RUNNING again."""
        if not self.finished:
            self.queue.call("mark the run KILLED", lambda: self._terminate("KILLED"))
        report = self.queue.close(DRAIN_TIMEOUT_S)
        if report.complete:
            log.info("tracking: everything sent to %s", self.settings.trackingUri)
        else:
            log.warning("tracking: not sent to %s within %.0f s: %s", self.settings.trackingUri, DRAIN_TIMEOUT_S,
                        report.describe())


def start_tracking(
    config: TrainerConfig,
    ctx: DistContext,
    metrics: TrainerMetrics,
    store: ObjectStore,
    restored_dir: Path | None,
    model_dir: Path | None,
) -> MlflowTracker | None:
    """Rank 0's tracker when the config names a tracking server, started (the run resolves in the background)."""
    if config.tracking.mlflow is None or ctx.rank != 0:
        return None
    labels = {"rank": str(ctx.rank), "job_name": config.job.name, "job_namespace": config.job.namespace}
    tracker = MlflowTracker(
        config,
        store,
        TrackingGauges(metrics.registry, labels),
        stored=read_stored_run(restored_dir),
        world_size=ctx.world_size,
        model_dir=model_dir,
    )
    tracker.start()
    return tracker


def _mlflow_client(tracking_uri: str) -> Any:
    for key, value in CLIENT_ENV.items():
        os.environ.setdefault(key, value)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


class TrackingCallback(TrainerCallback):
    """HF Trainer's side of tracking: log events become metric points, evaluations look for samples, and a step that
    ends with a save puts ``tracking.json`` into the checkpoint folder before HF writes the rest there (this callback
    runs after the checkpoint's, which decides the save), so it is uploaded with the checkpoint and listed in its
    manifest."""

    def __init__(self, tracker: MlflowTracker, tokens_per_second: Callable[[], float | None]) -> None:
        self.tracker = tracker
        self.tokens_per_second = tokens_per_second

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        tokens = self.tokens_per_second() if logs and "loss" in logs else None
        self.tracker.log_metrics(logs or {}, state.global_step, tokens)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.tracker.evaluated()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if control.should_save:
            from finetune_trainer.checkpoints import local_checkpoint_dir

            self.tracker.write_run_file(local_checkpoint_dir(str(args.output_dir), state.global_step))

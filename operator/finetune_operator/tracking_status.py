"""status.tracking: the experiment-tracking run rank 0 reports, its page in the tracking UI, and events when the
tracking server stops (or starts again) answering rank 0.

The trainer has no API access: it exposes the run on its metrics endpoint (``finetune_tracking_run_info`` with the
run's ids as labels, ``finetune_tracking_up``, ``finetune_tracking_queued``), and at the end in its result summary,
both read by the operator like the progress. An unreachable server is a Warning event, never a failure: rank 0
queues the updates and sends them when the server answers again.
"""

from __future__ import annotations

from finetune_operator import constants as c
from finetune_operator.job_status import JobStatus
from finetune_operator.progress import ProgressSample
from finetune_operator.spec import JobSpec


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def record_tracking(status: JobStatus, sample: ProgressSample | None, spec: JobSpec) -> None:
    """status.tracking from one reading of rank 0 (a scrape or the final summary); an Event when the server's
    reachability flips (the first reading that finds it unreachable counts as a flip)."""
    mlflow = spec.tracking.mlflow
    if mlflow is None or sample is None:
        return
    current = status.data.get("tracking")
    tracking = dict(current) if isinstance(current, dict) else {}
    if sample.tracking_run_id and sample.tracking_experiment_id:
        tracking.update(
            runId=sample.tracking_run_id,
            experimentId=sample.tracking_experiment_id,
            url=run_url(mlflow.tracking_uri, sample.tracking_experiment_id, sample.tracking_run_id),
        )
    if sample.tracking_up is not None:
        was = tracking.get("reachable")
        tracking["reachable"] = sample.tracking_up
        if not sample.tracking_up and was is not False:
            waiting = f"{sample.tracking_queued} updates wait" if sample.tracking_queued else "updates wait"
            status.emit(
                c.EVENT_WARNING,
                c.REASON_TRACKING_UNAVAILABLE,
                f"the MLflow tracking server {mlflow.tracking_uri} does not answer rank 0; {waiting} and are retried "
                "in the background; training goes on",
            )
        elif sample.tracking_up and was is False:
            status.emit(c.EVENT_NORMAL, c.REASON_TRACKING_AVAILABLE,
                        f"the MLflow tracking server {mlflow.tracking_uri} answers rank 0 again")
    if tracking:
        status.data["tracking"] = tracking

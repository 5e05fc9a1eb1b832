"""spec.tracking.mlflow in the operator: parsing with errors naming the field, the credentials as pod env only, the
run read from rank 0's metrics (the trainer's own gauges) or its final summary, and status.tracking with its events."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest
from operator_factories import make_job
from prometheus_client import CollectorRegistry, generate_latest

from finetune_operator.builders import build_config_map, build_worker_env
from finetune_operator.job_status import EventToEmit, JobStatus
from finetune_operator.progress import ProgressSample, parse_metrics, sample_from_result
from finetune_operator.spec import InvalidSpecError, parse_job
from finetune_operator.tracking_status import record_tracking
from finetune_trainer.tracking_mlflow import TrackingGauges

URI = "https://mlflow.example.com"
MLFLOW = {"trackingUri": URI, "experiment": "support"}


def job_with(mlflow: dict[str, Any] | None, paths: dict[str, Any] | None = None) -> dict[str, Any]:
    overrides = {"spec.tracking.mlflow": mlflow} if mlflow is not None else {}
    return make_job({**overrides, **(paths or {})})


@pytest.mark.parametrize(
    ("mlflow", "paths", "error_path"),
    [
        pytest.param(MLFLOW, {}, None, id="minimal"),
        pytest.param({**MLFLOW, "runName": "r", "registerModelAs": "support-bot", "credentialsSecret": "mlflow"}, {},
                     None, id="everything"),
        pytest.param({**MLFLOW, "trackingUri": "ftp://mlflow"}, {}, "spec.tracking.mlflow.trackingUri", id="not-http"),
        pytest.param({**MLFLOW, "trackingUri": "mlflow:5000"}, {}, "spec.tracking.mlflow.trackingUri", id="no-scheme"),
        pytest.param({**MLFLOW, "experiment": ""}, {}, "spec.tracking.mlflow.experiment", id="empty-experiment"),
        pytest.param({"trackingUri": URI}, {}, "spec.tracking.mlflow.experiment", id="no-experiment"),
        pytest.param({**MLFLOW, "experiment": "x" * 501}, {}, "spec.tracking.mlflow.experiment", id="long-experiment"),
        pytest.param({**MLFLOW, "runName": "x" * 251}, {}, "spec.tracking.mlflow.runName", id="long-run-name"),
        pytest.param({**MLFLOW, "registerModelAs": "a/b"}, {}, "spec.tracking.mlflow.registerModelAs",
                     id="slash-in-model-name"),
        pytest.param({**MLFLOW, "credentialsSecret": "mlflow"},
                     {"spec.env": [{"name": "MLFLOW_TRACKING_TOKEN", "value": "t"}]}, "spec.env[0].name",
                     id="env-duplicates-the-secret"),
        pytest.param(MLFLOW, {"spec.env": [{"name": "MLFLOW_TRACKING_TOKEN", "value": "t"}]}, None,
                     id="env-token-without-secret"),
    ],
)
def test_parsing(mlflow: dict[str, Any], paths: dict[str, Any], error_path: str | None) -> None:
    body = job_with(mlflow, paths)
    if error_path is None:
        parsed = parse_job(body).spec.tracking.mlflow
        assert parsed is not None and parsed.tracking_uri == URI
        return
    with pytest.raises(InvalidSpecError) as caught:
        parse_job(body)
    assert caught.value.field_path == error_path


@pytest.mark.parametrize(
    ("mlflow", "expected"),
    [
        pytest.param(None, [], id="no-tracking"),
        pytest.param(MLFLOW, [], id="no-secret"),
        pytest.param({**MLFLOW, "credentialsSecret": "mlflow-auth"}, [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": "mlflow-auth", "key": key, "optional": True}}}
            for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
        ], id="secret-keys-each-optional"),
    ],
)
def test_credentials_reach_the_pods_only_by_secret_reference(
    mlflow: dict[str, Any] | None, expected: list[dict[str, Any]]
) -> None:
    job = parse_job(job_with(mlflow))
    env = [item for item in build_worker_env(job, 0) if item["name"].startswith("MLFLOW_")]
    assert env == expected
    config = build_config_map(job)["data"]["config.json"]
    assert "mlflow-auth" not in config and "credentialsSecret" not in config


def trainer_exposition(run: tuple[str, str] | None, up: bool | None, queued: int) -> str:
    """Text as rank 0's registry serves it, made by the trainer's own tracking gauges."""
    registry = CollectorRegistry()
    gauges = TrackingGauges(registry, {"rank": "0", "job_name": "job", "job_namespace": "ns"})
    if run is not None:
        gauges.run(*run)
    gauges.state(up, queued)
    return generate_latest(registry).decode()


@pytest.mark.parametrize(
    ("run", "up", "queued", "expected"),
    [
        pytest.param(("run-1", "7"), True, 0, ("run-1", "7", True, 0), id="logging"),
        pytest.param(("run-1", "7"), False, 42, ("run-1", "7", False, 42), id="server-down"),
        pytest.param(None, False, 3, (None, None, False, 3), id="down-before-the-run-exists"),
        pytest.param(None, None, 1, (None, None, None, 1), id="no-call-ended-yet"),
    ],
)
def test_the_run_is_read_from_rank_0_metrics(
    run: tuple[str, str] | None, up: bool | None, queued: int, expected: tuple[Any, ...]
) -> None:
    sample = parse_metrics(trainer_exposition(run, up, queued))
    assert (sample.tracking_run_id, sample.tracking_experiment_id, sample.tracking_up,
            sample.tracking_queued) == expected


def test_the_final_summary_names_the_run() -> None:
    summary = json.dumps({"steps": 20, "tracking": {"runId": "run-1", "experimentId": "7"}})
    sample = sample_from_result(summary)
    assert sample is not None and (sample.tracking_run_id, sample.tracking_experiment_id) == ("run-1", "7")
    without = sample_from_result(json.dumps({"steps": 20}))
    assert without is not None and without.tracking_run_id is None


RUN = {"runId": "run-1", "experimentId": "7", "url": f"{URI}/#/experiments/7/runs/run-1"}
UP = ProgressSample(tracking_run_id="run-1", tracking_experiment_id="7", tracking_up=True, tracking_queued=0)
DOWN = ProgressSample(tracking_run_id="run-1", tracking_experiment_id="7", tracking_up=False, tracking_queued=12)


@pytest.mark.parametrize(
    ("before", "sample", "after", "events"),
    [
        pytest.param(None, UP, {**RUN, "reachable": True}, [], id="first-reading"),
        pytest.param({**RUN, "reachable": True}, DOWN, {**RUN, "reachable": False}, ["Warning TrackingUnavailable"],
                     id="server-goes-away"),
        pytest.param({**RUN, "reachable": False}, DOWN, {**RUN, "reachable": False}, [], id="still-away-no-repeat"),
        pytest.param({**RUN, "reachable": False}, UP, {**RUN, "reachable": True}, ["Normal TrackingAvailable"],
                     id="server-back"),
        pytest.param(None, ProgressSample(tracking_up=False, tracking_queued=3), {"reachable": False},
                     ["Warning TrackingUnavailable"], id="unreachable-from-the-start"),
        pytest.param({**RUN, "reachable": True}, ProgressSample(), {**RUN, "reachable": True}, [],
                     id="sample-without-tracking-keeps-the-status"),
        pytest.param({**RUN, "reachable": True}, ProgressSample(tracking_run_id="run-1", tracking_experiment_id="7"),
                     {**RUN, "reachable": True}, [], id="final-summary"),
    ],
)
def test_status_tracking_and_its_events(
    before: dict[str, Any] | None, sample: ProgressSample, after: dict[str, Any], events: list[str]
) -> None:
    status = JobStatus({"tracking": before} if before else {}, datetime.datetime.now(datetime.UTC), 1)
    record_tracking(status, sample, parse_job(job_with(MLFLOW)).spec)
    assert status.data.get("tracking") == after
    emitted: tuple[EventToEmit, ...] = status.events_to_emit()
    assert [f"{e.type} {e.reason}" for e in emitted] == events
    if events == ["Warning TrackingUnavailable"]:
        assert URI in emitted[0].message and "training goes on" in emitted[0].message


def test_no_status_tracking_without_tracking_in_the_spec() -> None:
    status = JobStatus({}, datetime.datetime.now(datetime.UTC), 1)
    record_tracking(status, DOWN, parse_job(make_job()).spec)
    assert "tracking" not in status.data and status.events_to_emit() == ()

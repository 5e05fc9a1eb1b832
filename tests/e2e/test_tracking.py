"""Experiment tracking end to end: a FineTuneJob with spec.tracking.mlflow on the local cluster logs one MLflow run
that status.tracking names, and a tracking server nobody answers at is a Warning event, never a failure."""

from __future__ import annotations

import functools
import socket
import uuid

import pytest
from e2e_helpers import apply, make_job

from localcluster import pytest_plugin
from localcluster.cluster import LocalCluster
from localcluster.mlflow import MlflowServer

wait_until = functools.partial(pytest_plugin.wait_until, interval=0.5)

pytestmark = pytest.mark.e2e

SMALL = {"cpu": "1", "memory": "3Gi"}
SHORT = {"maxSteps": 60, "evalEvery": 30}


def test_a_tracked_job_succeeds_and_its_status_names_the_one_mlflow_run(
    cluster: LocalCluster, mlflow_server: MlflowServer
) -> None:
    name, experiment, model = "tracked", f"e2e-{uuid.uuid4().hex[:8]}", f"e2e-{uuid.uuid4().hex[:8]}"
    tracking = {"mlflow": {"trackingUri": mlflow_server.url, "experiment": experiment, "registerModelAs": model}}
    apply(cluster, make_job(name, resources=SMALL, training=SHORT, tracking=tracking))

    done = cluster.wait_for_job(name, phases={"Succeeded"}, timeout=600)

    [run] = mlflow_server.runs(experiment)
    info = run["info"]
    tracked = done["status"]["tracking"]
    assert (tracked["runId"], tracked["experimentId"]) == (info["run_id"], info["experiment_id"])
    assert tracked["url"] == f"{mlflow_server.url}/#/experiments/{info['experiment_id']}/runs/{info['run_id']}"
    # Read from rank 0's metrics while it ran (absent only when no scrape fell after the run's start).
    assert tracked.get("reachable", True) is True
    assert info["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["finetune.job.uid"] == done["metadata"]["uid"] and tags["finetune.job.name"] == name
    assert [int(p["step"]) for p in mlflow_server.metric_history(info["run_id"], "loss")] == list(range(10, 61, 10))
    [version] = mlflow_server.model_versions(model)
    assert version["source"] == f"s3://finetune-output/{name}/model"
    assert info["run_id"] in cluster.kubectl("get", "ftj", name, "-o", "wide")


def test_an_unreachable_tracking_server_is_a_warning_not_a_failure(cluster: LocalCluster) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{probe.getsockname()[1]}"
    name = "untracked"
    tracking = {"mlflow": {"trackingUri": nobody, "experiment": "lost"}}
    apply(cluster, make_job(name, resources=SMALL, training=SHORT, tracking=tracking))

    done = cluster.wait_for_job(name, phases={"Succeeded"}, timeout=600)

    assert done["status"]["tracking"]["reachable"] is False
    events = cluster.kubectl("get", "events", "--field-selector", f"involvedObject.name={name}",
                             "-o", "custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message")
    warning = next(line for line in events.splitlines() if "TrackingUnavailable" in line)
    assert warning.startswith("Warning") and nobody in warning and "training goes on" in warning

"""Experiment tracking end to end: a FineTuneJob with spec.tracking.mlflow and eval prompts on the local cluster logs
one MLflow run that status.tracking names, even across a gang restart, and a tracking server nobody answers at is
a Warning event, never a failure."""

from __future__ import annotations

import functools
import os
import signal
import socket
import uuid

import pytest
from e2e_helpers import apply, make_job, read_json, s3_keys, training_process

from localcluster import pytest_plugin
from localcluster.cluster import LocalCluster
from localcluster.mlflow import MlflowServer

wait_until = functools.partial(pytest_plugin.wait_until, interval=0.5)

pytestmark = pytest.mark.e2e

SMALL = {"cpu": "1", "memory": "3Gi"}
SHORT = {"maxSteps": 60, "evalEvery": 30}
LONGER = {"maxSteps": 120, "evalEvery": 40}


def newest_checkpoint(cluster: LocalCluster, name: str) -> int:
    manifests = [k for k in s3_keys(cluster, f"{name}/checkpoints/") if k.endswith("/manifest.json")]
    return max((int(k.split("/")[2].removeprefix("step-")) for k in manifests), default=0)


def test_a_tracked_job_with_prompts_killed_midway_keeps_one_mlflow_run_and_registers_its_verified_model(
    cluster: LocalCluster, mlflow_server: MlflowServer
) -> None:
    name, experiment, model = "tracked", f"e2e-{uuid.uuid4().hex[:8]}", f"e2e-{uuid.uuid4().hex[:8]}"
    tracking = {"mlflow": {"trackingUri": mlflow_server.url, "experiment": experiment, "registerModelAs": model}}
    # The example's evaluation prompts are kept: answers at steps 0, 40, 80, 120 and a verified export.
    apply(cluster, make_job(name, resources=SMALL, training=LONGER, checkpoint={"everySteps": 20},
                            tracking=tracking))
    # Rank 0 killed after the first checkpoint: the gang restarts and resumes from it, in the same MLflow run.
    wait_until(lambda: newest_checkpoint(cluster, name) > 0, timeout=400, what="a first complete checkpoint")
    pid = wait_until(lambda: training_process(cluster, f"{name}-a0-n0"), timeout=30, what="rank 0's process")
    os.kill(pid, signal.SIGKILL)

    done = cluster.wait_for_job(name, phases={"Succeeded"}, timeout=900)

    assert done["status"]["restarts"] == 1
    conditions = {c["type"]: c for c in done["status"]["conditions"]}
    assert conditions["ModelVerified"]["status"] == "True"
    [run] = mlflow_server.runs(experiment)
    info = run["info"]
    tracked = done["status"]["tracking"]
    assert (tracked["runId"], tracked["experimentId"]) == (info["run_id"], info["experiment_id"])
    assert tracked["url"] == f"{mlflow_server.url}/#/experiments/{info['experiment_id']}/runs/{info['run_id']}"
    assert info["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["finetune.job.uid"] == done["metadata"]["uid"] and tags["finetune.job.name"] == name
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["training.maxSteps"] == "120" and params["training.learningRate"] == "0.003"
    # Every logging step of both attempts in the one run (steps redone after the resume appear twice).
    steps = [int(p["step"]) for p in mlflow_server.metric_history(info["run_id"], "loss")]
    assert sorted(set(steps)) == list(range(10, 121, 10)), steps
    assert {"result.json", "samples.jsonl"} <= set(mlflow_server.artifacts(info["run_id"]))
    result = read_json(cluster, f"{name}/result.json")
    assert [s["prompt"] for s in result["samples"]] == ["How do I reset my password?",
                                                       "My order arrived damaged. What should I do?"]
    assert result["verification"]["ok"] is True and result["tracking"]["runId"] == info["run_id"]
    [version] = mlflow_server.model_versions(model)
    assert version["source"] == f"s3://finetune-output/{name}/model" and version["run_id"] == info["run_id"]
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

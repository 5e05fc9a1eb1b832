"""MLflow tracking with real training and a real MLflow server, read back through its REST API as an outside client.

One run per job: params, a loss series per logging step, result.json as an artifact and a registered model version
whose source is the job's S3 model; a killed attempt and its resume log to the same run with steps continuing; a
tracking server stopped for 20 s mid-training neither stalls nor fails training, and what was logged meanwhile
arrives once it is back.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import TrainerSetup, metric_value, scrape, worker_pids

from finetune_trainer import exit_codes
from localcluster.mlflow import MlflowServer
from localcluster.pytest_plugin import wait_until

pytestmark = pytest.mark.integration

JOB_UID = "3f1c9a52-0000-4000-8000-00000000c0de"


def tracked_config(setup: TrainerSetup, server: MlflowServer, *, attempt: int = 0, register: str | None = None,
                   training: dict[str, Any] | None = None, checkpoint: dict[str, Any] | None = None,
                   experiment: str | None = None) -> tuple[Path, str]:
    """A config of ``setup`` logging to ``server`` under a new experiment (or ``experiment``), as job JOB_UID."""
    experiment = experiment or f"it-{uuid.uuid4().hex[:10]}"
    mlflow: dict[str, Any] = {"trackingUri": server.url, "experiment": experiment}
    if register:
        mlflow["registerModelAs"] = register
    config = setup.write_config(
        f"config-a{attempt}.json",
        training=training or {},
        checkpoint=checkpoint or {},
        tracking={"mlflow": mlflow},
        job={"uid": JOB_UID, "attempt": attempt},
    )
    return config, experiment


def steps(points: list[dict[str, Any]]) -> list[int]:
    return [int(point["step"]) for point in points]


def test_a_run_holds_params_metrics_result_and_the_registered_model(
    setup: TrainerSetup, mlflow_server: MlflowServer
) -> None:
    model_name = f"tiny-{uuid.uuid4().hex[:8]}"
    config, experiment = tracked_config(setup, mlflow_server, register=model_name)
    # Evaluation samples the job writes beside its outputs are logged too.
    setup.s3.put_object(Bucket=setup.bucket, Key="run/samples.jsonl", Body=b'{"prompt": "hi", "answer": "hello"}\n')

    launched = setup.run_launcher(config)

    assert launched.returncode == exit_codes.SUCCESS, launched.log()[-4000:]
    [run] = mlflow_server.runs(experiment)
    run_id = run["info"]["run_id"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["training.maxSteps"] == "20" and params["model.uri"] == setup.uri("model")
    assert params["deepspeed.zeroStage"] == "2" and params["export"] == "full"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["finetune.job.uid"] == JOB_UID and tags["finetune.model.uri"] == setup.uri("model")
    assert any(key.startswith("finetune.model.etag.") for key in tags)
    # logEvery 2 over 20 steps: one loss per logging step; evaluations at 0, 10, 20 and the final one.
    assert steps(mlflow_server.metric_history(run_id, "loss")) == list(range(2, 21, 2))
    assert len(mlflow_server.metric_history(run_id, "tokens_per_second")) == 10
    assert set(steps(mlflow_server.metric_history(run_id, "eval_loss"))) == {0, 10, 20}
    assert {"result.json", "samples.jsonl"} <= set(mlflow_server.artifacts(run_id))
    [version] = mlflow_server.model_versions(model_name)
    assert version["source"] == setup.uri("run/model") and version["run_id"] == run_id
    # The run is named in result.json and the termination message (the operator's status.tracking).
    assert setup.result()["tracking"] == {"runId": run_id, "experimentId": run["info"]["experiment_id"]}
    assert json.loads(setup.termination_message)["tracking"]["runId"] == run_id


def test_a_killed_attempt_and_its_resume_log_to_one_run(setup: TrainerSetup, mlflow_server: MlflowServer) -> None:
    long_run = {"maxSteps": 40, "gradientAccumulationSteps": 2}
    config, experiment = tracked_config(setup, mlflow_server, training=long_run, checkpoint={"everySteps": 5})
    first = setup.start_launcher(config, setup.env(nproc=2), log_name="first.log")
    # A checkpoint saved once the run is known holds its id (tracking.json, listed in the manifest).
    wait_until(lambda: naming_the_run(setup) or first.process.poll() is not None, 120, "a checkpoint naming the run")
    os.kill(worker_pids(config)[-1], signal.SIGKILL)
    assert first.wait() == exit_codes.FAILURE, first.log()[-3000:]
    resumed_from = max(setup.complete_checkpoints())
    assert resumed_from in naming_the_run(setup)
    # The killed attempt may not have had the chance to mark its run; the resume sets it RUNNING either way.
    [killed] = mlflow_server.runs(experiment)

    config, _ = tracked_config(setup, mlflow_server, attempt=1, training=long_run, checkpoint={"everySteps": 5},
                               experiment=experiment)
    second = setup.run_launcher(config, nproc=2)

    assert second.returncode == exit_codes.SUCCESS, second.log()[-4000:]
    assert "tracking: MLflow run" in second.log() and "the run named in the checkpoint" in second.log()
    [run] = mlflow_server.runs(experiment)
    assert run["info"]["run_id"] == killed["info"]["run_id"] and run["info"]["status"] == "FINISHED"
    assert {t["key"]: t["value"] for t in run["data"]["tags"]}["finetune.job.attempt"] == "1"
    logged = steps(mlflow_server.metric_history(run["info"]["run_id"], "loss"))
    # Every logging step is there, the resumed attempt's continuing past the checkpoint's step to the last.
    assert sorted(set(logged)) == list(range(2, 41, 2))
    assert logged[-1] == 40 and resumed_from < 40


def naming_the_run(setup: TrainerSetup) -> list[int]:
    return [step for step, manifest in setup.complete_checkpoints().items()
            if "tracking.json" in {entry["path"] for entry in manifest["files"]}]


def test_training_rides_out_a_tracking_server_outage(setup: TrainerSetup, mlflow_server: MlflowServer) -> None:
    # 20-45 steps/s here: training outlasts the 20 s outage and the server's restart (20-60 s on 2 busy cores).
    config, experiment = tracked_config(setup, mlflow_server,
                                        training={"maxSteps": 5000, "logEvery": 25, "evalEvery": 2500},
                                        checkpoint={"everySteps": 2500})
    port = json.loads(config.read_text())["metrics"]["port"]
    launched = setup.start_launcher(config, setup.env())
    run = wait_until(lambda: mlflow_server.runs(experiment), 120, "the MLflow run")[0]
    run_id = run["info"]["run_id"]
    wait_until(lambda: mlflow_server.metric_history(run_id, "loss"), 60, "a first loss point")

    mlflow_server.stop()
    stopped = time.monotonic()
    try:
        # Rank 0 says so on its metrics endpoint (the operator turns it into a TrackingUnavailable event)...
        wait_until(lambda: metric_value(scrape(f"http://127.0.0.1:{port}/metrics") or "", "finetune_tracking_up")
                   == 0, 30, "finetune_tracking_up 0")
        # ...while training goes on.
        step_then = metric_value(scrape(f"http://127.0.0.1:{port}/metrics") or "", "finetune_step") or 0
        time.sleep(max(0.0, 20 - (time.monotonic() - stopped)))
        step_now = metric_value(scrape(f"http://127.0.0.1:{port}/metrics") or "", "finetune_step") or 0
    finally:
        mlflow_server.start()
    assert launched.process.poll() is None and step_now > step_then, launched.log()[-3000:]

    assert launched.wait() == exit_codes.SUCCESS, launched.log()[-4000:]
    [run] = mlflow_server.runs(experiment)
    assert run["info"]["status"] == "FINISHED"
    assert steps(mlflow_server.metric_history(run_id, "loss")) == list(range(25, 5001, 25))
    assert "result.json" in mlflow_server.artifacts(run_id)

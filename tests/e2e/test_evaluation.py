"""End to end on the local cluster: sample answers at every evaluation, and ModelVerified from the export check."""

from __future__ import annotations

import json
from typing import Any

import pytest
from e2e_helpers import apply, make_job, read_json, s3_keys

from localcluster.cluster import LocalCluster

pytestmark = pytest.mark.e2e

SMALL = {"cpu": "1", "memory": "3Gi"}
# examples/tiny-cpu.yaml's evaluation block, with fewer steps.
SHORT = {"maxSteps": 20, "evalEvery": 10, "logEvery": 5}


def condition(job_status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in job_status.get("conditions", []) if c["type"] == kind), None)


def test_a_job_with_evaluation_prompts_succeeds_verified_with_samples(cluster: LocalCluster) -> None:
    name = "samples"
    job = make_job(name, resources=SMALL, training=SHORT, checkpoint={"everySteps": 10})
    prompts = job["spec"]["evaluation"]["prompts"]
    assert "created" in apply(cluster, job)

    done = cluster.wait_for_job(name, phases={"Succeeded", "Failed"}, timeout=600)["status"]

    assert done["phase"] == "Succeeded", done
    verified = condition(done, "ModelVerified")
    assert verified is not None and (verified["status"], verified["reason"]) == ("True", "Verified"), done
    assert "every weight finite" in verified["message"]
    result = read_json(cluster, f"{name}/result.json")
    assert [s["prompt"] for s in result["samples"]] == prompts
    assert result["verification"]["ok"] is True
    assert [a["prompt"] for a in result["verification"]["answers"]] == prompts
    assert f"{name}/samples.jsonl" in s3_keys(cluster, f"{name}/")
    body = cluster.s3.client().get_object(Bucket="finetune-output", Key=f"{name}/samples.jsonl")["Body"].read()
    steps = [json.loads(line)["step"] for line in body.decode().splitlines()]
    assert steps == [0, 0, 10, 10, 20, 20]
    assert "ModelVerified" in cluster.kubectl("describe", "ftj", name)


def test_a_corrupted_export_fails_the_job_with_model_verified_false(cluster: LocalCluster) -> None:
    name = "corrupt"
    # The trainer's fault-injection hook, through spec.env (not a reserved name): NaN in the stored weights.
    job = make_job(name, resources=SMALL, training=SHORT, checkpoint={"everySteps": 20},
                   env=[{"name": "FINETUNE_TEST_CORRUPT_EXPORT", "value": "model.safetensors"}])
    assert "created" in apply(cluster, job)

    failed = cluster.wait_for_job(name, phases={"Succeeded", "Failed"}, timeout=600)["status"]

    assert failed["phase"] == "Failed", failed
    verified = condition(failed, "ModelVerified")
    assert verified is not None and (verified["status"], verified["reason"]) == ("False", "VerificationFailed")
    assert verified["message"].startswith("model verification failed: model/model.safetensors: tensor"), verified
    failed_condition = condition(failed, "Failed")
    assert failed_condition is not None and failed_condition["reason"] == "PermanentError"
    assert "model/model.safetensors" in failed["message"]
    assert failed.get("restarts", 0) == 0
    assert read_json(cluster, f"{name}/result.json")["verification"]["ok"] is False

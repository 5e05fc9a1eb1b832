"""The trainer config the operator renders: accepted by the trainer's own loader, camelCase, without secrets."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest
import yaml
from operator_factories import make_job

from finetune_operator.render import render_trainer_config
from finetune_operator.spec import parse_job
from finetune_trainer.config import config_from_dict

EXAMPLES = sorted((pathlib.Path(__file__).parents[2] / "examples").glob("*.yaml"))


def example_job(path: pathlib.Path) -> dict[str, Any]:
    """The example's FineTuneJob (examples/kueue.yaml also holds the Kueue objects it waits in)."""
    body: dict[str, Any] = next(doc for doc in yaml.safe_load_all(path.read_text()) if doc["kind"] == "FineTuneJob")
    body["metadata"].update(namespace="team-a", uid="uid-1", generation=1)
    return body


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_renders_a_config_the_trainer_accepts(path: pathlib.Path) -> None:
    body = example_job(path)
    config = render_trainer_config(parse_job(body))
    loaded = config_from_dict(json.loads(json.dumps(config)))
    assert loaded.model.uri == body["spec"]["model"]["uri"]
    assert loaded.job.name == body["metadata"]["name"]
    assert loaded.local.cacheDir == "/scratch/cache"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_no_secret_reaches_the_config(path: pathlib.Path) -> None:
    text = json.dumps(render_trainer_config(parse_job(example_job(path))))
    assert "credentialsSecret" not in text
    assert "AWS_" not in text
    secret = example_job(path)["spec"].get("storage", {}).get("credentialsSecret")
    if secret:
        assert secret not in text


def test_tiny_example_renders_exactly() -> None:
    path = next(p for p in EXAMPLES if p.stem == "tiny-cpu")
    assert render_trainer_config(parse_job(example_job(path))) == {
        "model": {"uri": "s3://models/tiny-gpt2"},
        "dataset": {"uri": "s3://datasets/customer-support/customer-support.jsonl", "format": "chat",
                    "evalSplit": 0.1, "textField": "text", "promptField": "prompt", "completionField": "completion",
                    "messagesField": "messages", "maxMalformedRows": 0},
        "output": {"uri": "s3://finetune-output/tiny-cpu", "export": "full"},
        "training": {"method": "full", "learningRate": 0.003, "weightDecay": 0.0, "maxSteps": 400, "batchSize": 8,
                     "gradientAccumulationSteps": 1, "maxSeqLength": 256, "packing": True, "warmupRatio": 0.05,
                     "scheduler": "cosine", "precision": "auto", "gradientCheckpointing": False, "seed": 42,
                     "evalEvery": 50, "logEvery": 10},
        "deepspeed": {"zeroStage": 2, "offloadOptimizer": False, "offloadParams": False},
        "checkpoint": {"everySteps": 100, "keep": 2, "gracePeriodSeconds": 120},
        "metrics": {"port": 9400},
        "storage": {"forcePathStyle": True},
        "evaluation": {"prompts": ["How do I reset my password?", "My order arrived damaged. What should I do?"],
                       "maxNewTokens": 48, "sampling": False, "temperature": 0.7, "topP": 1.0,
                       "generationTimeoutSeconds": 60, "verifyExport": True},
        "tracking": {},
        "local": {"cacheDir": "/scratch/cache", "workDir": "/scratch/work"},
        "job": {"name": "tiny-cpu", "namespace": "team-a", "attempt": 0},
    }


def test_every_optional_section_is_accepted_by_the_trainer() -> None:
    body = make_job({
        "spec.model": {"uri": "s3://models/base", "revision": "v2", "sha256": "a" * 64},
        "spec.dataset": {"uri": "s3://data/train", "format": "promptCompletion", "evalUri": "s3://data/eval.jsonl",
                         "promptField": "q", "completionField": "a", "maxMalformedRows": 5},
        "spec.output": {"uri": "s3://out/run", "export": "merged"},
        "spec.training": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "targetModules": ["q_proj"]},
                          "epochs": 1.5, "evalEvery": 10, "earlyStopping": {"patience": 2, "minDelta": 0.01}},
        "spec.distributed.deepspeed": {"zeroStage": 3, "offloadOptimizer": True, "offloadParams": True},
        "spec.checkpoint": {"everyMinutes": 7.5, "keep": 4, "gracePeriodSeconds": 60},
        "spec.metrics": {"port": 9500, "pushgateway": "http://pushgateway:9091"},
        "spec.storage": {"endpoint": "http://s3.local:8333", "region": "eu-1", "forcePathStyle": True,
                         "credentialsSecret": "creds"},
        "spec.evaluation": {"promptsUri": "s3://data/prompts.jsonl", "maxNewTokens": 16, "sampling": True,
                            "temperature": 0.5, "topP": 0.9, "generationTimeoutSeconds": 30, "verifyExport": False},
        "spec.tracking.mlflow": {"trackingUri": "https://mlflow.example", "experiment": "support", "runName": "r1",
                                 "registerModelAs": "support-bot", "credentialsSecret": "mlflow-token"},
        "status": {"attempt": 4},
    })
    config = render_trainer_config(parse_job(body))
    # The Secret's name stays with the pods' secretKeyRef; the trainer finds the run again by the job's uid.
    assert config["tracking"] == {"mlflow": {"trackingUri": "https://mlflow.example", "experiment": "support",
                                             "runName": "r1", "registerModelAs": "support-bot"}}
    assert config["job"]["uid"] == body["metadata"]["uid"]
    loaded = config_from_dict(config)
    assert loaded.training.lora is not None and loaded.training.lora.targetModules == ["q_proj"]
    assert loaded.training.earlyStopping is not None and loaded.training.earlyStopping.minDelta == 0.01
    assert (loaded.deepspeed.zeroStage, loaded.checkpoint.everyMinutes, loaded.metrics.port) == (3, 7.5, 9500)
    assert (loaded.storage.endpoint, loaded.job.attempt, loaded.export) == ("http://s3.local:8333", 4, "merged")
    e = loaded.evaluation
    assert (e.promptsUri, e.prompts, e.maxNewTokens, e.sampling, e.temperature, e.topP) == (
        "s3://data/prompts.jsonl", [], 16, True, 0.5, 0.9)
    assert (e.generationTimeoutSeconds, e.verifyExport) == (30, False)

"""Parsing a FineTuneJob spec: the CRD's defaults, and every check beyond the schema naming its field."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from operator_factories import make_job

from finetune_operator.spec import (
    FineTuneJob,
    InvalidSpecError,
    parse_job,
    parse_quantity,
    uris_overlap,
)


def parse(**paths: Any) -> FineTuneJob:
    return parse_job(make_job(**paths))


def test_defaults_of_the_crd_apply_to_a_minimal_spec() -> None:
    spec = parse().spec
    assert (spec.dataset.format, spec.dataset.text_field, spec.dataset.max_malformed_rows) == ("chat", "text", 0)
    t = spec.training
    assert (t.method, t.learning_rate, t.batch_size, t.max_seq_length, t.scheduler, t.precision, t.seed) == (
        "full", 2e-4, 1, 1024, "cosine", "auto", 42)
    d = spec.distributed
    assert (d.nodes, d.procs_per_node, d.master_port, d.deepspeed.zero_stage) == (1, 1, 29500, 2)
    assert (spec.checkpoint.keep, spec.checkpoint.grace_period_seconds) == (3, 120)
    assert spec.metrics.port == 9400
    assert (spec.resources.gpus, spec.resources.cpu, spec.resources.memory) == (0, None, None)
    assert (spec.backoff_limit, spec.restart_backoff.initial_seconds, spec.restart_backoff.max_seconds) == (3, 10, 300)
    assert (spec.startup_deadline_seconds, spec.capacity_timeout_seconds) == (600, 1800)
    assert (spec.clean_pod_policy, spec.image_pull_policy, spec.suspend) == ("All", "IfNotPresent", False)
    assert spec.export == "full"
    e = spec.evaluation
    assert (e.prompts, e.prompts_uri, e.max_new_tokens, e.sampling, e.generation_timeout_seconds, e.verify_export) == (
        (), None, 64, False, 120, True)


def test_lora_defaults_to_adapter_export() -> None:
    assert parse(spec__training={"method": "lora", "maxSteps": 1}).spec.export == "adapter"


def test_metadata_and_attempt() -> None:
    job = parse(status={"attempt": 3})
    assert (job.name, job.namespace, job.meta.uid, job.meta.generation, job.attempt) == ("job", "ns", "uid-1", 1, 3)


@pytest.mark.parametrize(
    ("value", "amount"),
    [
        ("8", Decimal(8)),
        (8, Decimal(8)),
        ("7500m", Decimal("7.5")),
        ("0.5", Decimal("0.5")),
        ("64Gi", Decimal(64 * 2**30)),
        ("1e3", Decimal(1000)),
        ("100M", Decimal(10**8)),
    ],
)
def test_quantities(value: Any, amount: Decimal) -> None:
    assert parse_quantity(value, "x") == amount


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("s3://b/x", "s3://b/x/", True),
        ("s3://b/x", "s3://b/x/y", True),
        ("s3://b/x/y", "s3://b/x", True),
        ("s3://b/x", "s3://b/xy", False),
        ("s3://b/x", "s3://c/x", False),
    ],
)
def test_uri_overlap(a: str, b: str, overlap: bool) -> None:
    assert uris_overlap(a, b) is overlap


# Every check beyond the schema (and the CEL rules repeated), with the field path its message must start with.
INVALID: list[Any] = [
    pytest.param({"spec.training.maxSeqLength": 8192, "spec.training.batchSize": 256},
                 "spec.training.batchSize: batchSize x maxSeqLength = 2097152 tokens", id="tokens-per-micro-batch"),
    pytest.param({"spec.distributed": {"nodes": 64, "procsPerNode": 32}},
                 "spec.distributed: nodes x procsPerNode = 2048 processes exceeds the supported 1024",
                 id="world-size"),
    pytest.param({"spec.resources.memory": "lots"}, "spec.resources.memory: 'lots' is not a valid quantity",
                 id="memory-quantity"),
    pytest.param({"spec.resources.cpu": "2 cores"}, "spec.resources.cpu: '2 cores' is not a valid quantity",
                 id="cpu-quantity"),
    pytest.param({"spec.resources.cpu": "0"}, "spec.resources.cpu: 0 must be more than 0", id="cpu-zero"),
    pytest.param({"spec.resources": {"memory": "8Gi", "sharedMemory": "16Gi"}},
                 "spec.resources.sharedMemory: 16Gi exceeds spec.resources.memory 8Gi", id="shm-over-memory"),
    pytest.param({"spec.activeDeadlineSeconds": 100, "spec.checkpoint.gracePeriodSeconds": 120},
                 "spec.checkpoint.gracePeriodSeconds: 120 must be less than activeDeadlineSeconds 100",
                 id="grace-vs-deadline"),
    pytest.param({"spec.dataset.evalUri": "s3://data/train.jsonl"},
                 "spec.dataset.evalUri: equals spec.dataset.uri", id="eval-equals-train"),
    pytest.param({"spec.output.uri": "s3://models/base/finetuned"},
                 "spec.output.uri: s3://models/base/finetuned overlaps spec.model.uri s3://models/base",
                 id="output-inside-model"),
    pytest.param({"spec.output.uri": "s3://data"}, "spec.output.uri: s3://data overlaps spec.dataset.uri",
                 id="output-above-dataset"),
    pytest.param({"spec.model.uri": "file:///models/base", "spec.distributed.nodes": 2},
                 "spec.model.uri: file:///models/base is a node-local path but distributed.nodes is 2",
                 id="file-model-multi-node"),
    pytest.param({"spec.output.uri": "file:///out", "spec.distributed.nodes": 2},
                 "spec.output.uri: file:///out is a node-local path", id="file-output-multi-node"),
    pytest.param({"spec.metrics.port": 29499, "spec.distributed.procsPerNode": 2},
                 "spec.metrics.port: ports 29499-29500 (one per local rank) include distributed.masterPort 29500",
                 id="metrics-port-collides-with-master-port"),
    pytest.param({"spec.retryableExitCodes": [1, 64]},
                 "spec.retryableExitCodes: 64 is the trainer's permanent-error exit code", id="retry-invalid-code"),
    pytest.param({"spec.env": [{"name": "WORLD_SIZE", "value": "4"}]},
                 "spec.env[0].name: env WORLD_SIZE is reserved", id="reserved-env"),
    pytest.param({"spec.env": [{"name": "TORCHELASTIC_X", "value": "4"}]},
                 "spec.env[0].name: env TORCHELASTIC_X is reserved", id="reserved-env-prefix"),
    pytest.param({"spec.env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
                 "spec.env[1].name: env A is listed twice", id="duplicate-env"),
    pytest.param({"spec.env": [{"name": "A", "value": "1", "valueFrom": {}}]},
                 "spec.env[0]: set either value or valueFrom", id="env-value-and-value-from"),
    pytest.param({"spec.tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]},
                 "spec.tolerations[0].value: must be empty when operator is Exists", id="toleration-exists-value"),
    pytest.param({"metadata.name": "llama.v2"}, "metadata.name: 'llama.v2' must be a DNS-1035 label",
                 id="name-not-dns-label"),
    pytest.param({"metadata.name": "a" * 60, "spec.distributed.nodes": 12},
                 "metadata.name: too long: pod hostname", id="hostname-too-long"),
    # The CEL rules, for servers that skip them.
    pytest.param({"spec.training": {"epochs": 1, "maxSteps": 5}},
                 "spec.training: set exactly one of training.epochs and training.maxSteps", id="epochs-and-steps"),
    pytest.param({"spec.training": {}}, "spec.training: set exactly one", id="neither-epochs-nor-steps"),
    pytest.param({"spec.training.lora": {"r": 8}}, "spec.training.lora: only allowed with training.method 'lora'",
                 id="lora-without-method"),
    pytest.param({"spec.training.earlyStopping": {"patience": 2}}, "spec.training.earlyStopping: needs",
                 id="early-stopping-without-eval"),
    pytest.param({"spec.output.export": "merged"}, "spec.output.export: 'merged' needs training.method 'lora'",
                 id="merged-without-lora"),
    pytest.param({"spec.dataset.evalSplit": 0.1, "spec.dataset.evalUri": "s3://data/eval.jsonl"},
                 "spec.dataset: set either", id="eval-split-and-uri"),
    pytest.param({"spec.distributed.deepspeed": {"zeroStage": 1, "offloadOptimizer": True}},
                 "spec.distributed.deepspeed.offloadOptimizer: needs zeroStage 2 or 3", id="offload-optimizer"),
    pytest.param({"spec.distributed.deepspeed": {"offloadParams": True}},
                 "spec.distributed.deepspeed.offloadParams: needs zeroStage 3", id="offload-params"),
    pytest.param({"spec.resources.gpus": 2, "spec.distributed.procsPerNode": 4},
                 "spec.distributed.procsPerNode: 4 exceeds resources.gpus 2", id="procs-over-gpus"),
    pytest.param({"spec.evaluation.prompts": []}, "spec.evaluation.prompts: must hold at least one prompt",
                 id="evaluation-empty-prompt-list"),
    pytest.param({"spec.evaluation.prompts": ["hi", ""]}, "spec.evaluation.prompts[1]: must be a non-empty string",
                 id="evaluation-empty-prompt"),
    pytest.param({"spec.evaluation.prompts": ["x" * 4097]}, "spec.evaluation.prompts[0]: longer than 4096",
                 id="evaluation-prompt-too-long"),
    pytest.param({"spec.evaluation.prompts": ["q"] * 65}, "spec.evaluation.prompts: has 65 items, more than 64",
                 id="evaluation-too-many-prompts"),
    pytest.param({"spec.evaluation": {"prompts": ["hi"], "promptsUri": "s3://data/prompts.jsonl"}},
                 "spec.evaluation.promptsUri: set either evaluation.prompts or evaluation.promptsUri",
                 id="evaluation-prompts-and-uri"),
    pytest.param({"spec.evaluation.maxNewTokens": 4096}, "spec.evaluation.maxNewTokens: must be <= 2048",
                 id="evaluation-max-new-tokens"),
    pytest.param({"spec.restartBackoff": {"initialSeconds": 60, "maxSeconds": 30}},
                 "spec.restartBackoff.initialSeconds: cannot exceed", id="backoff-initial-over-max"),
    pytest.param({"spec.gang": {"scheduler": "volcano", "minMember": 3}, "spec.distributed.nodes": 2},
                 "spec.gang.minMember: 3 exceeds distributed.nodes 2", id="gang-min-member-over-nodes"),
    pytest.param({"spec.gang": {"scheduler": "coscheduling", "queue": "q"}},
                 "spec.gang.queue: is a Volcano queue", id="gang-queue-without-volcano"),
    pytest.param({"spec.gang": {"scheduler": "yunikorn"}},
                 "spec.gang.scheduler: 'yunikorn' is not one of volcano, coscheduling", id="gang-unknown-scheduler"),
    pytest.param({"spec.gang": {}}, "spec.gang.scheduler: required", id="gang-without-scheduler"),
    pytest.param({"spec.topology": {}}, "spec.topology: set exactly one", id="topology-empty"),
    pytest.param({"spec.topology": {"required": "a/b", "preferred": "a/b"}}, "spec.topology: set exactly one",
                 id="topology-both"),
    pytest.param({"spec.topology.required": "Zone/"},
                 "spec.topology.required: 'Zone/' must be a node label key", id="topology-not-a-label-key"),
    # Types and the schema's ranges: a malformed object must fail its job, not crash the operator.
    pytest.param({"spec.model": None}, "spec.model.uri: required", id="model-missing"),
    pytest.param({"spec.model.uri": "https://x/y"},
                 "spec.model.uri: 'https://x/y' must be s3://bucket/key or file:///absolute/path", id="bad-uri"),
    pytest.param({"spec.distributed.nodes": "2"}, "spec.distributed.nodes: must be an integer, got a string",
                 id="wrong-type"),
    pytest.param({"spec.distributed.nodes": 0}, "spec.distributed.nodes: must be >= 1, got 0", id="below-minimum"),
    pytest.param({"spec.cleanPodPolicy": "Some"}, "spec.cleanPodPolicy: 'Some' is not one of All, Running, None",
                 id="bad-enum"),
    pytest.param({"spec.training.learningRate": 0}, "spec.training.learningRate: must be > 0, got 0",
                 id="exclusive-minimum"),
    pytest.param({"spec.suspend": "yes"}, "spec.suspend: must be a boolean, got a string", id="bool-type"),
    pytest.param({"spec": []}, "spec: must be an object, got a list", id="spec-not-object"),
]


@pytest.mark.parametrize(("paths", "message"), INVALID)
def test_invalid_specs_name_the_field(paths: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSpecError) as caught:
        parse_job(make_job(paths))
    assert str(caught.value).startswith(message), str(caught.value)
    assert str(caught.value).startswith(caught.value.field_path + ":")


@pytest.mark.parametrize(
    "paths",
    [
        pytest.param({"spec.training.maxSeqLength": 65536}, id="longest-sequence"),
        pytest.param({"spec.distributed": {"nodes": 128, "procsPerNode": 8}}, id="world-1024"),
        pytest.param({"spec.resources": {"cpu": "7500m", "memory": "64Gi", "sharedMemory": "64Gi", "gpus": 8},
                      "spec.distributed.procsPerNode": 8}, id="shm-equals-memory"),
        pytest.param({"spec.model.uri": "file:///m", "spec.output.uri": "file:///o"}, id="file-uris-single-node"),
        pytest.param({"spec.dataset.uri": "file:///d", "spec.distributed.nodes": 2}, id="file-dataset-multi-node"),
        pytest.param({"spec.output.uri": "s3://out/jobx", "spec.model.uri": "s3://out/job"}, id="sibling-prefixes"),
        pytest.param({"spec.env": [{"name": "NCCL_DEBUG", "value": "INFO"}]}, id="user-env"),
        pytest.param({"spec.retryableExitCodes": [75, 134]}, id="retry-preempted-is-harmless"),
        pytest.param({"spec.gang": {"scheduler": "volcano", "minMember": 2, "queue": "research"},
                      "spec.distributed.nodes": 2, "spec.topology.preferred": "cloud.provider.com/topology-rack"},
                     id="gang-of-the-whole-size-with-topology"),
        pytest.param({"spec.topology.required": "nvidia.com/gpu.clique"}, id="nvlink-domain-label"),
    ],
)
def test_valid_edge_cases(paths: dict[str, Any]) -> None:
    parse_job(make_job(paths))


def test_annotations_are_resolved_once_per_class_not_per_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    import typing

    from finetune_operator import spec_reader

    calls: list[type] = []
    resolve = typing.get_type_hints

    def counted(cls: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(cls)
        return resolve(cls, *args, **kwargs)

    monkeypatch.setattr(spec_reader, "_TYPE_HINTS", {})
    monkeypatch.setattr(spec_reader.typing, "get_type_hints", counted)
    first = parse_job(make_job())
    resolved = len(calls)
    assert resolved > 0 and parse_job(make_job()) == first
    assert len(calls) == resolved

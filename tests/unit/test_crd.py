"""The FineTuneJob CRD: structural, every example valid, and bad jobs rejected with the offending field named."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from localcluster.crd_validation import CRDValidator, FieldError

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "finetune.dev_finetunejobs.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="module")
def schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def validator(crd: dict[str, Any]) -> CRDValidator:
    return CRDValidator.from_crd(crd)


def tiny_job() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())


def errors_for(validator: CRDValidator, job: dict[str, Any], old: dict[str, Any] | None = None) -> list[FieldError]:
    defaulted = validator.apply_defaults(job)
    return validator.validate(defaulted, validator.apply_defaults(old) if old else None)


# --- shape of the CRD -------------------------------------------------------------------------------


def test_crd_names_group_version_and_scope(crd: dict[str, Any]) -> None:
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == "finetunejobs.finetune.dev"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"]) == ("finetune.dev", "Namespaced")
    assert spec["names"]["kind"] == "FineTuneJob"
    assert spec["names"]["plural"] == "finetunejobs"
    assert spec["names"]["shortNames"] == ["ftj"]
    [version] = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_printer_columns_in_order(crd: dict[str, Any]) -> None:
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"].upper() for c in columns] == ["PHASE", "PROGRESS", "LOSS", "ETA", "RESTARTS", "AGE"]


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    untyped = [p for p, n in walk(schema) if "type" not in n and not n.get("x-kubernetes-int-or-string")]
    assert untyped == []
    preserving = [p for p, n in walk(schema) if n.get("x-kubernetes-preserve-unknown-fields")]
    assert preserving == []
    # int-or-string is the only anyOf allowed, and it may not carry types of its own besides the two.
    for path, node in walk(schema):
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), path
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path


def test_every_field_is_described(schema: dict[str, Any]) -> None:
    undocumented = [p for p, n in walk(schema) if p and not n.get("description") and not p.endswith(".metadata")]
    assert undocumented == []


def test_schema_is_valid_draft4(schema: dict[str, Any]) -> None:
    # The CRD schema is OpenAPI 3.0 (draft-4 semantics: exclusiveMinimum is a boolean).
    jsonschema.Draft4Validator.check_schema(schema)


def test_every_cel_rule_compiles(validator: CRDValidator, schema: dict[str, Any]) -> None:
    rules = [r for _, n in walk(schema) for r in n.get("x-kubernetes-validations", [])]
    assert len(rules) >= 15
    for rule in rules:
        validator._program(rule["rule"])
        assert rule.get("message") or rule.get("messageExpression")


# --- examples -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid(validator: CRDValidator, path: Path) -> None:
    job = yaml.safe_load(path.read_text())
    assert job["apiVersion"] == "finetune.dev/v1alpha1" and job["kind"] == "FineTuneJob"
    assert errors_for(validator, job) == []
    # An unchanged re-apply passes every transition rule.
    assert errors_for(validator, job, old=job) == []


def test_examples_cover_the_documented_set() -> None:
    assert {p.name for p in EXAMPLES} >= {"tiny-cpu.yaml", "lora-7b-2x8gpu.yaml", "kueue.yaml", "spot.yaml"}


def test_defaults_are_filled_in(validator: CRDValidator) -> None:
    job = validator.apply_defaults({"spec": {"training": {}, "distributed": {"deepspeed": {}}}})
    assert job["spec"]["training"]["method"] == "full"
    assert job["spec"]["training"]["scheduler"] == "cosine"
    assert job["spec"]["distributed"]["deepspeed"]["zeroStage"] == 2
    assert job["spec"]["backoffLimit"] == 3
    assert job["spec"]["cleanPodPolicy"] == "All"


# --- bad jobs -------------------------------------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def setter(path: str, value: Any) -> Mutation:
    """A mutation that sets spec.<path> (dots; created as needed) to value."""

    def mutate(job: dict[str, Any]) -> None:
        node = job["spec"]
        *parents, last = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    return mutate


def deleter(path: str) -> Mutation:
    def mutate(job: dict[str, Any]) -> None:
        node = job["spec"]
        *parents, last = path.split(".")
        for key in parents:
            node = node[key]
        del node[last]

    return mutate


def both(*mutations: Mutation) -> Mutation:
    def mutate(job: dict[str, Any]) -> None:
        for m in mutations:
            m(job)

    return mutate


LORA = {"method": "lora", "lora": {"r": 8}}

# (case id, mutation, field the error must name, words the message must contain)
BAD_JOBS: list[tuple[str, Mutation, str, str]] = [
    ("no model", deleter("model"), "spec.model", "Required value"),
    ("no model uri", deleter("model.uri"), "spec.model.uri", "Required value"),
    ("http model uri", setter("model.uri", "http://example.com/model"), "spec.model.uri", "should match"),
    ("s3 uri without bucket", setter("model.uri", "s3://"), "spec.model.uri", "should match"),
    ("s3 bucket with capitals", setter("dataset.uri", "s3://My_Bucket/x"), "spec.dataset.uri", "should match"),
    ("relative file uri", setter("output.uri", "file://relative/path"), "spec.output.uri", "should match"),
    ("bad sha256", setter("model.sha256", "xyz"), "spec.model.sha256", "should match"),
    ("unknown dataset format", setter("dataset.format", "csv"), "spec.dataset.format", "Unsupported value"),
    ("evalSplit of 0", setter("dataset.evalSplit", 0), "spec.dataset.evalSplit", "greater than 0"),
    ("evalSplit over half", setter("dataset.evalSplit", 0.9), "spec.dataset.evalSplit", "less than or equal"),
    ("evalSplit and evalUri", setter("dataset.evalUri", "s3://data/eval.jsonl"), "spec.dataset", "not both"),
    ("learning rate as string", setter("training.learningRate", "fast"), "spec.training.learningRate", "number"),
    ("zero learning rate", setter("training.learningRate", 0), "spec.training.learningRate", "greater than 0"),
    ("negative learning rate", setter("training.learningRate", -1e-4), "spec.training.learningRate", "greater"),
    ("unknown method", setter("training.method", "qlora"), "spec.training.method", "Unsupported value"),
    ("lora with full", setter("training.lora", {"r": 8}), "spec.training.lora", "method 'lora'"),
    ("epochs and maxSteps", setter("training.epochs", 2), "spec.training", "exactly one of"),
    ("neither epochs nor maxSteps", deleter("training.maxSteps"), "spec.training", "exactly one of"),
    ("maxSteps as float", setter("training.maxSteps", 10.5), "spec.training.maxSteps", "integer"),
    ("batch size 0", setter("training.batchSize", 0), "spec.training.batchSize", "greater than or equal to 1"),
    ("lora rank 0", setter("training", {**LORA, "lora": {"r": 0}, "maxSteps": 5}), "spec.training.lora.r", "1"),
    ("unknown scheduler", setter("training.scheduler", "exp"), "spec.training.scheduler", "Unsupported value"),
    ("unknown precision", setter("training.precision", "int8"), "spec.training.precision", "Unsupported value"),
    (
        "early stopping without eval",
        both(deleter("training.evalEvery"), setter("training.earlyStopping", {"patience": 2})),
        "spec.training.earlyStopping",
        "evalEvery",
    ),
    ("zeroStage 5", setter("distributed.deepspeed.zeroStage", 5), "spec.distributed.deepspeed.zeroStage", "less"),
    (
        "offload optimizer with stage 0",
        setter("distributed.deepspeed", {"zeroStage": 0, "offloadOptimizer": True}),
        "spec.distributed.deepspeed.offloadOptimizer",
        "zeroStage 2 or 3",
    ),
    (
        "offload params with stage 2",
        setter("distributed.deepspeed", {"zeroStage": 2, "offloadParams": True}),
        "spec.distributed.deepspeed.offloadParams",
        "zeroStage 3",
    ),
    ("nodes 0", setter("distributed.nodes", 0), "spec.distributed.nodes", "greater than or equal to 1"),
    ("nodes as string", setter("distributed.nodes", "two"), "spec.distributed.nodes", "integer"),
    ("gpus not an integer", setter("resources.gpus", 1.5), "spec.resources.gpus", "integer"),
    ("gpus negative", setter("resources.gpus", -1), "spec.resources.gpus", "greater than or equal to 0"),
    (
        "procs exceed gpus",
        both(setter("resources.gpus", 2), setter("distributed.procsPerNode", 4)),
        "spec.distributed.procsPerNode",
        "cannot exceed resources.gpus",
    ),
    ("memory not a quantity", setter("resources.memory", "lots"), "spec.resources.memory", "should match"),
    ("cpu not a quantity", setter("resources.cpu", "2 cores"), "spec.resources.cpu", "should match"),
    (
        "reserved env PET_NODE_RANK",
        setter("env", [{"name": "PET_NODE_RANK", "value": "1"}]),
        "spec.env[0].name",
        "PET_NODE_RANK is reserved",
    ),
    (
        "reserved env MASTER_ADDR",
        setter("env", [{"name": "MASTER_ADDR", "value": "x"}]),
        "spec.env[0].name",
        "MASTER_ADDR is reserved",
    ),
    (
        "reserved env WORLD_SIZE",
        setter("env", [{"name": "X", "value": "1"}, {"name": "WORLD_SIZE", "value": "4"}]),
        "spec.env[1].name",
        "WORLD_SIZE is reserved",
    ),
    ("env name with a dash", setter("env", [{"name": "MY-VAR", "value": "1"}]), "spec.env[0].name", "should match"),
    (
        "env value and valueFrom",
        setter("env", [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]),
        "spec.env[0]",
        "not both",
    ),
    (
        "unknown toleration operator",
        setter("tolerations", [{"key": "a", "operator": "Maybe"}]),
        "spec.tolerations[0].operator",
        "Unsupported value",
    ),
    ("checkpoint every 0 steps", setter("checkpoint.everySteps", 0), "spec.checkpoint.everySteps", "greater"),
    ("checkpoint keep 0", setter("checkpoint.keep", 0), "spec.checkpoint.keep", "greater than or equal to 1"),
    ("metrics port 80", setter("metrics.port", 80), "spec.metrics.port", "greater than or equal to 1024"),
    (
        "pushgateway not a url",
        setter("metrics.pushgateway", "pushgateway:9091"),
        "spec.metrics.pushgateway",
        "should match",
    ),
    ("storage endpoint not a url", setter("storage.endpoint", "minio:9000"), "spec.storage.endpoint", "should match"),
    (
        "secret name with capitals",
        setter("storage.credentialsSecret", "S3Creds"),
        "spec.storage.credentialsSecret",
        "should match",
    ),
    ("negative backoffLimit", setter("backoffLimit", -1), "spec.backoffLimit", "greater than or equal to 0"),
    ("retryable exit code 0", setter("retryableExitCodes", [0]), "spec.retryableExitCodes[0]", "greater"),
    ("unknown cleanPodPolicy", setter("cleanPodPolicy", "Some"), "spec.cleanPodPolicy", "Unsupported value"),
    ("suspend as string", setter("suspend", "yes"), "spec.suspend", "boolean"),
    (
        "backoff initial above max",
        setter("restartBackoff", {"initialSeconds": 600, "maxSeconds": 60}),
        "spec.restartBackoff",
        "cannot exceed",
    ),
    ("adapter export with full", setter("output.export", "adapter"), "spec.output.export", "need training.method"),
    ("unknown spec field", setter("learningRate", 0.1), "spec.learningRate", "unknown field"),
    ("unknown nested field", setter("training.lr", 0.1), "spec.training.lr", "unknown field"),
]


def test_bad_job_table_is_large_enough() -> None:
    assert len(BAD_JOBS) >= 30
    assert len({case for case, *_ in BAD_JOBS}) == len(BAD_JOBS)


@pytest.mark.parametrize(("case", "mutate", "field", "words"), BAD_JOBS, ids=[c[0] for c in BAD_JOBS])
def test_bad_job_is_rejected_naming_the_field(
    validator: CRDValidator, case: str, mutate: Mutation, field: str, words: str
) -> None:
    job = tiny_job()
    mutate(job)
    errors = errors_for(validator, job)
    assert errors, f"{case}: accepted"
    matching = [e for e in errors if e.field == field]
    assert matching, f"{case}: no error names {field}: {errors}"
    assert any(words in e.message for e in matching), f"{case}: {matching}"


# --- updates (transition rules) ---------------------------------------------------------------------

UPDATES: list[tuple[str, Mutation, str | None]] = [
    ("training changed", setter("training.learningRate", 0.5), "spec.training"),
    ("model changed", setter("model.uri", "s3://models/other"), "spec.model"),
    ("dataset changed", setter("dataset.format", "text"), "spec.dataset"),
    ("output changed", setter("output.uri", "s3://finetune-output/elsewhere"), "spec.output"),
    ("resources changed while running", setter("resources.cpu", "4"), "spec.resources"),
    ("nodes changed while running", setter("distributed.nodes", 2), "spec.distributed"),
    ("nodeSelector added while running", setter("nodeSelector", {"pool": "a"}), "spec.nodeSelector"),
    ("tolerations changed while running", setter("tolerations", [{"operator": "Exists"}]), "spec.tolerations"),
    ("suspend toggled", setter("suspend", True), None),
    ("resources changed while suspending", both(setter("suspend", True), setter("resources.cpu", "4")), None),
    ("backoffLimit raised", setter("backoffLimit", 9), None),
    ("ttl set", setter("ttlSecondsAfterFinished", 60), None),
]


@pytest.mark.parametrize(("case", "mutate", "field"), UPDATES, ids=[c[0] for c in UPDATES])
def test_update_rules(validator: CRDValidator, case: str, mutate: Mutation, field: str | None) -> None:
    old = tiny_job()
    new = copy.deepcopy(old)
    mutate(new)
    errors = errors_for(validator, new, old=old)
    if field is None:
        assert errors == [], case
    else:
        assert [e.field for e in errors] == [field], errors
        assert re.search(r"immutable|only change while the job is suspended", errors[0].message)


def test_scheduling_fields_may_change_while_suspended(validator: CRDValidator) -> None:
    # Kueue rewrites node selectors and tolerations of suspended jobs when it admits them.
    old = tiny_job()
    old["spec"]["suspend"] = True
    new = copy.deepcopy(old)
    new["spec"]["nodeSelector"] = {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    new["spec"]["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    new["spec"]["suspend"] = False
    assert errors_for(validator, new, old=old) == []


def test_unknown_fields_can_be_pruned_instead(validator: CRDValidator) -> None:
    job = tiny_job()
    job["spec"]["surprise"] = {"a": 1}
    job["spec"]["training"]["typo"] = 1
    assert sorted(validator.unknown_fields(job)) == ["spec.surprise", "spec.training.typo"]
    pruned = validator.prune(job)
    assert "surprise" not in pruned["spec"] and "typo" not in pruned["spec"]["training"]
    assert pruned["metadata"] == job["metadata"]

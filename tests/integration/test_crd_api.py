"""The FineTuneJob CRD on the real API server: apiextensions accepts it (every CEL rule compiled within its cost
budget), defaults and prunes as a cluster does, admits every example and documented job, and rejects bad jobs and
bad updates naming the offending field. Each check is a server-side dry-run (milliseconds), so nothing is stored
but the few objects the update rules need."""

from __future__ import annotations

import copy
import json
import re
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from localcluster.controlplane import ControlPlane

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "finetune.dev_finetunejobs.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
JOBS = "/apis/finetune.dev/v1alpha1/namespaces/default/finetunejobs"


@dataclass(frozen=True)
class FieldError:
    """One cause of a refusal, as the API server names it."""

    field: str
    message: str


class JobsApi:
    """FineTuneJobs on the real API server as its admin: creates and updates, dry-run unless asked otherwise."""

    def __init__(self, plane: ControlPlane) -> None:
        self.url = plane.url
        self.tls = plane.admin_tls

    def call(self, method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.tls) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def create(self, job: dict[str, Any], *, dry_run: bool = True) -> tuple[int, dict[str, Any]]:
        query = "?fieldValidation=Strict" + ("&dryRun=All" if dry_run else "")
        return self.call("POST", JOBS + query, job)

    def update(self, job: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return self.call("PUT", f"{JOBS}/{job['metadata']['name']}?fieldValidation=Strict&dryRun=All", job)


def errors_of(status: int, answer: dict[str, Any]) -> list[FieldError]:
    """The refusal's causes (field and message each); none when the server accepted the object."""
    if status < 300:
        return []
    causes = (answer.get("details") or {}).get("causes") or []
    if causes:
        return [FieldError(str(c.get("field", "")), str(c.get("message", ""))) for c in causes]
    # Strict field validation answers 400 with the unknown fields named in the message only.
    message = str(answer.get("message"))
    unknown = re.findall(r'unknown field "([^"]+)"', message)
    return [FieldError(field, f'unknown field "{field}"') for field in unknown] or [FieldError("", message)]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobsApi]:
    with ControlPlane(tmp_path_factory.mktemp("crd") / "control-plane", scheduler=False) as plane:
        plane.kubectl("apply", "--server-side", "-f", str(CRD_PATH))
        plane.wait_for_crds("finetunejobs.finetune.dev")
        yield JobsApi(plane)


def tiny_job(name: str = "tiny") -> dict[str, Any]:
    job: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "tiny-cpu.yaml").read_text())
    job["metadata"] = {"name": name}
    return job


def yaml_blocks(path: Path) -> Iterator[dict[str, Any]]:
    for block in re.findall(r"```yaml\n(.*?)```", path.read_text(), flags=re.S):
        for doc in yaml.safe_load_all(block):
            if isinstance(doc, dict):
                yield doc


# --- the CRD itself, examples and documented jobs -----------------------------------------------------------


def test_the_crd_is_established_with_its_short_name_and_columns(api: JobsApi) -> None:
    status, job = api.create(tiny_job())
    assert status == 201, job
    assert job["kind"] == "FineTuneJob"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_accepted(api: JobsApi, path: Path) -> None:
    job = next(doc for doc in yaml.safe_load_all(path.read_text()) if doc["kind"] == "FineTuneJob")
    job["metadata"].pop("namespace", None)
    assert errors_of(*api.create(job)) == []


def test_every_finetunejob_in_the_docs_is_accepted(api: JobsApi) -> None:
    checked = 0
    for path in DOCS:
        for doc in yaml_blocks(path):
            if doc.get("kind") == "FineTuneJob":
                doc["metadata"].pop("namespace", None)
                assert errors_of(*api.create(doc)) == [], path.name
                checked += 1
    assert checked >= 1


def test_defaults_are_filled_in(api: JobsApi) -> None:
    job = tiny_job()
    job["spec"]["distributed"] = {"deepspeed": {}}
    for key in ("method", "scheduler"):
        job["spec"]["training"].pop(key, None)
    job["spec"].pop("backoffLimit", None)
    job["spec"].pop("cleanPodPolicy", None)
    status, created = api.create(job)
    assert status == 201, created
    spec = created["spec"]
    assert spec["training"]["method"] == "full"
    assert spec["training"]["scheduler"] == "cosine"
    assert spec["distributed"]["deepspeed"]["zeroStage"] == 2
    assert spec["backoffLimit"] == 3
    assert spec["cleanPodPolicy"] == "All"
    assert (spec["evaluation"]["sampling"], spec["evaluation"]["temperature"], spec["evaluation"]["topP"]) == (
        False, 0.7, 1)


def test_unknown_fields_are_pruned_when_validation_is_not_strict(api: JobsApi) -> None:
    job = tiny_job()
    job["spec"]["surprise"] = {"a": 1}
    job["spec"]["training"]["typo"] = 1
    status, created = api.call("POST", JOBS + "?dryRun=All&fieldValidation=Ignore", job)
    assert status == 201, created
    assert "surprise" not in created["spec"] and "typo" not in created["spec"]["training"]


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
    ("empty evaluation prompt list", setter("evaluation.prompts", []), "spec.evaluation.prompts", "at least 1 items"),
    ("empty evaluation prompt", setter("evaluation.prompts", ["ok", ""]), "spec.evaluation.prompts[1]",
     "at least 1 chars long"),
    ("evaluation maxNewTokens over 2048", setter("evaluation.maxNewTokens", 4096), "spec.evaluation.maxNewTokens",
     "less than or equal to 2048"),
    ("evaluation maxNewTokens 0", setter("evaluation.maxNewTokens", 0), "spec.evaluation.maxNewTokens",
     "greater than or equal to 1"),
    ("evaluation prompts and promptsUri", setter("evaluation.promptsUri", "s3://prompts/eval.jsonl"),
     "spec.evaluation.promptsUri", "set either evaluation.prompts or evaluation.promptsUri, not both"),
    ("evaluation promptsUri over http", both(deleter("evaluation.prompts"), setter("evaluation.promptsUri", "http://x/p")),
     "spec.evaluation.promptsUri", "should match"),
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
    (
        "toleration Exists with a value",
        setter("tolerations", [{"key": "a", "operator": "Exists", "value": "x"}]),
        "spec.tolerations[0].value",
        "must be empty when operator is Exists",
    ),
    (
        "toleration without key or Exists",
        setter("tolerations", [{"operator": "Equal", "value": "x"}]),
        "spec.tolerations[0].key",
        "needs operator Exists",
    ),
    (
        "tolerationSeconds without NoExecute",
        setter("tolerations", [{"key": "a", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 30}]),
        "spec.tolerations[0].tolerationSeconds",
        "needs effect NoExecute",
    ),
    (
        "toleration key with a space",
        setter("tolerations", [{"key": "bad key", "operator": "Exists"}]),
        "spec.tolerations[0].key",
        "should match",
    ),
    (
        "toleration value too long",
        setter("tolerations", [{"key": "a", "operator": "Equal", "value": "v" * 64}]),
        "spec.tolerations[0].value",
        "may not be more than 63",
    ),
    ("nodeSelector value with a space", setter("nodeSelector", {"pool": "gpu pool"}), "spec.nodeSelector.pool",
     "should match"),
    ("nodeSelector key with a space", setter("nodeSelector", {"gpu pool": "a"}), "spec.nodeSelector",
     "must be label keys"),
    (
        "secret key with a slash",
        setter("env", [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "a/b"}}}]),
        "spec.env[0].valueFrom.secretKeyRef.key",
        "should match",
    ),
    (
        "secret key too long",
        setter("env", [{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k" * 254}}}]),
        "spec.env[0].valueFrom.secretKeyRef.key",
        "may not be more than 253",
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
    (
        "gang minMember above the gang size",
        both(setter("distributed.nodes", 2), setter("gang", {"scheduler": "volcano", "minMember": 3})),
        "spec.gang.minMember",
        "gang.minMember cannot exceed distributed.nodes",
    ),
    ("gang minMember above one node", setter("gang", {"scheduler": "coscheduling", "minMember": 2}),
     "spec.gang.minMember", "cannot exceed"),
    ("unknown gang scheduler", setter("gang", {"scheduler": "yunikorn"}), "spec.gang.scheduler",
     "Unsupported value"),
    ("gang without scheduler", setter("gang", {"minMember": 1}), "spec.gang.scheduler", "Required value"),
    ("gang queue with coscheduling", setter("gang", {"scheduler": "coscheduling", "queue": "research"}),
     "spec.gang.queue", "only with gang.scheduler volcano"),
    ("gang schedule timeout 0", setter("gang", {"scheduler": "coscheduling", "scheduleTimeoutSeconds": 0}),
     "spec.gang.scheduleTimeoutSeconds", "greater than or equal to 1"),
    ("topology with both levels",
     setter("topology", {"required": "topology.kubernetes.io/zone", "preferred": "topology.kubernetes.io/zone"}),
     "spec.topology", "exactly one of topology.required and topology.preferred"),
    ("topology level not a label key", setter("topology", {"required": "rack name"}), "spec.topology.required",
     "should match"),
    (
        "tracking uri not http",
        setter("tracking.mlflow", {"trackingUri": "mlflow.internal:5000", "experiment": "support"}),
        "spec.tracking.mlflow.trackingUri",
        "must be an http:// or https:// URL",
    ),
    (
        "tracking experiment empty",
        setter("tracking.mlflow", {"trackingUri": "http://mlflow:5000", "experiment": ""}),
        "spec.tracking.mlflow.experiment",
        "at least 1 chars long",
    ),
    (
        "tracking without experiment",
        setter("tracking.mlflow", {"trackingUri": "http://mlflow:5000"}),
        "spec.tracking.mlflow.experiment",
        "Required value",
    ),
    (
        "registered model name with a slash",
        setter("tracking.mlflow", {"trackingUri": "http://mlflow:5000", "experiment": "e", "registerModelAs": "a/b"}),
        "spec.tracking.mlflow.registerModelAs",
        "should match",
    ),
    ("unknown spec field", setter("learningRate", 0.1), "spec.learningRate", "unknown field"),
    ("unknown nested field", setter("training.lr", 0.1), "spec.training.lr", "unknown field"),
]

@pytest.mark.parametrize(
    ("name", "nodes", "accepted"),
    [
        pytest.param("a" * 60, None, True, id="60-characters-one-node"),
        pytest.param("a" * 61, None, False, id="61-characters-one-node"),
        pytest.param("a" * 60, 10, True, id="60-characters-10-nodes"),
        pytest.param("a" * 60, 11, False, id="60-characters-11-nodes"),
        pytest.param("a" * 59, 100, True, id="59-characters-100-nodes"),
        pytest.param("a" * 59, 101, False, id="59-characters-101-nodes"),
        pytest.param("a" * 57, 1024, True, id="57-characters-1024-nodes"),
        pytest.param("9lives", None, False, id="starts-with-a-digit"),
        pytest.param("dotted.name", None, False, id="has-a-dot"),
    ],
)
def test_the_name_must_make_valid_hostnames(api: JobsApi, name: str, nodes: int | None, accepted: bool) -> None:
    job = tiny_job(name)
    if nodes is not None:
        job["spec"]["distributed"] = {"nodes": nodes}
    errors = errors_of(*api.create(job))
    if accepted:
        assert errors == []
    else:
        assert [e.field for e in errors] == ["metadata.name"], errors
        assert "metadata.name" in errors[0].message


def test_bad_job_table_is_large_enough() -> None:
    assert len(BAD_JOBS) >= 30
    assert len({case for case, *_ in BAD_JOBS}) == len(BAD_JOBS)


@pytest.mark.parametrize(("case", "mutate", "field", "words"), BAD_JOBS, ids=[c[0] for c in BAD_JOBS])
def test_bad_job_is_rejected_naming_the_field(
    api: JobsApi, case: str, mutate: Mutation, field: str, words: str
) -> None:
    job = tiny_job()
    mutate(job)
    errors = errors_of(*api.create(job))
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
    ("gang added while running", setter("gang", {"scheduler": "volcano"}), "spec.gang"),
    ("topology added while running", setter("topology", {"preferred": "topology.kubernetes.io/zone"}),
     "spec.topology"),
    ("gang added while suspending", both(setter("suspend", True), setter("gang", {"scheduler": "volcano"})), None),
    ("suspend toggled", setter("suspend", True), None),
    ("resources changed while suspending", both(setter("suspend", True), setter("resources.cpu", "4")), None),
    ("backoffLimit raised", setter("backoffLimit", 9), None),
    ("ttl set", setter("ttlSecondsAfterFinished", 60), None),
    ("tracking added", setter("tracking.mlflow", {"trackingUri": "http://mlflow:5000", "experiment": "e"}), None),
]

@pytest.fixture
def stored(api: JobsApi) -> dict[str, Any]:
    """A job really stored (a transition rule needs the old object), under a fresh name."""
    status, job = api.create(tiny_job(f"old-{uuid.uuid4().hex[:8]}"), dry_run=False)
    assert status == 201, job
    return job


@pytest.mark.parametrize(("case", "mutate", "field"), UPDATES, ids=[c[0] for c in UPDATES])
def test_update_rules(api: JobsApi, stored: dict[str, Any], case: str, mutate: Mutation, field: str | None) -> None:
    new = copy.deepcopy(stored)
    mutate(new)
    errors = errors_of(*api.update(new))
    if field is None:
        assert errors == [], case
    else:
        assert [e.field for e in errors] == [field], errors
        assert re.search(r"immutable|only change while the job is suspended", errors[0].message)


def test_scheduling_fields_may_change_while_suspended(api: JobsApi) -> None:
    # Kueue rewrites node selectors and tolerations of suspended jobs when it admits them.
    job = tiny_job(f"queued-{uuid.uuid4().hex[:8]}")
    job["spec"]["suspend"] = True
    status, old = api.create(job, dry_run=False)
    assert status == 201, old
    new = copy.deepcopy(old)
    new["spec"]["nodeSelector"] = {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    new["spec"]["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    new["spec"]["suspend"] = False
    assert errors_of(*api.update(new)) == []


def test_tracking_cannot_move_to_another_run_while_the_job_exists(api: JobsApi) -> None:
    job = tiny_job(f"tracked-{uuid.uuid4().hex[:8]}")
    job["spec"]["tracking"] = {"mlflow": {"trackingUri": "http://mlflow:5000", "experiment": "support"}}
    status, old = api.create(job, dry_run=False)
    assert status == 201, old
    new = copy.deepcopy(old)
    new["spec"]["tracking"]["mlflow"]["experiment"] = "elsewhere"
    errors = errors_of(*api.update(new))
    assert [e.field for e in errors] == ["spec.tracking.mlflow"], errors
    assert "immutable" in errors[0].message

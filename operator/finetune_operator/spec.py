"""A FineTuneJob parsed into frozen, typed dataclasses, with the CRD's defaults and the checks a schema cannot make.

The API server validates the CRD schema and its CEL rules and applies defaults; this module re-applies the
defaults (so objects stored without a defaulting server still work), type-checks what it reads (a malformed object
must fail its job, not crash the operator) and adds the cross-field checks of ``spec_checks.CHECKS``. Each scalar
field carries its one default and its CRD rule (``spec_field``); a section is read by ``read_fields``. Every
problem raises ``InvalidSpecError`` whose message starts with the field path, e.g.
``spec.distributed: nodes x procsPerNode = 2048 processes exceeds the supported 1024``.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from finetune_operator import constants as c
from finetune_operator.spec_checks import CHECKS, check_name, check_spec, uris_overlap
from finetune_operator.spec_reader import (
    DNS_LABEL,
    DNS_SUBDOMAIN,
    HTTP_URL,
    LABEL_KEY,
    SHA256,
    URI,
    InvalidSpecError,
    Reader,
    kind_of,
    parse_quantity,
    read_fields,
    spec_field,
)

__all__ = [
    "CHECKS",
    "FineTuneJob",
    "InvalidSpecError",
    "JobMeta",
    "JobSpec",
    "check_name",
    "format_time",
    "parse_job",
    "parse_meta",
    "parse_quantity",
    "parse_spec",
    "parse_time",
    "uris_overlap",
]

_MODULE_NAME = re.compile(r"^[A-Za-z0-9_.]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# MLflow refuses '/', ':' and '%' in registered model names (they would break its model URIs).
_REGISTERED_MODEL = re.compile(r"^[^/:%]+$")


# ---- the typed spec: each scalar's one default and its CRD rule -----------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    uri: str = spec_field(pattern=URI, max_length=2048)
    revision: str | None = spec_field(None, max_length=256)
    sha256: str | None = spec_field(None, pattern=SHA256)


@dataclass(frozen=True)
class DatasetSpec:
    uri: str = spec_field(pattern=URI, max_length=2048)
    format: str = spec_field("chat", enum=("text", "promptCompletion", "chat"))
    eval_split: float | None = spec_field(None, minimum=0, maximum=0.5, exclusive_minimum=True)
    eval_uri: str | None = spec_field(None, pattern=URI, max_length=2048)
    text_field: str = spec_field("text", max_length=128)
    prompt_field: str = spec_field("prompt", max_length=128)
    completion_field: str = spec_field("completion", max_length=128)
    messages_field: str = spec_field("messages", max_length=128)
    max_malformed_rows: int = spec_field(0, minimum=0, maximum=1_000_000)
    cache: str | None = spec_field(None, pattern=URI, max_length=2048)


@dataclass(frozen=True)
class OutputSpec:
    uri: str = spec_field(pattern=URI, max_length=2048)
    export: str | None = spec_field(None, enum=("adapter", "merged", "full"))


@dataclass(frozen=True)
class LoraSpec:
    r: int = spec_field(16, minimum=1, maximum=1024)
    alpha: int = spec_field(32, minimum=1, maximum=4096)
    dropout: float = spec_field(0.05, minimum=0, maximum=0.9)
    target_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class EarlyStoppingSpec:
    patience: int = spec_field(minimum=1, maximum=1000)
    metric: str = spec_field("evalLoss", enum=("evalLoss",))
    min_delta: float = spec_field(0.0, minimum=0)


@dataclass(frozen=True)
class TrainingSpec:
    method: str = spec_field("full", enum=("full", "lora"))
    lora: LoraSpec | None = None
    learning_rate: float = spec_field(2e-4, minimum=0, maximum=1, exclusive_minimum=True)
    weight_decay: float = spec_field(0.0, minimum=0, maximum=1)
    epochs: float | None = spec_field(None, minimum=0, maximum=1000, exclusive_minimum=True)
    max_steps: int | None = spec_field(None, minimum=1, maximum=100_000_000)
    batch_size: int = spec_field(1, minimum=1, maximum=4096)
    gradient_accumulation_steps: int = spec_field(1, minimum=1, maximum=4096)
    # 65536: the trainer has no sequence parallelism, so one sequence must fit one device.
    max_seq_length: int = spec_field(1024, minimum=8, maximum=65536)
    packing: bool = spec_field(False)
    warmup_ratio: float = spec_field(0.0, minimum=0, maximum=0.5)
    scheduler: str = spec_field("cosine", enum=("linear", "cosine", "constant", "constant_with_warmup"))
    precision: str = spec_field("auto", enum=("auto", "bf16", "fp16", "fp32"))
    gradient_checkpointing: bool = spec_field(False)
    seed: int = spec_field(42, minimum=0, maximum=4_294_967_295)
    eval_every: int | None = spec_field(None, minimum=1, maximum=100_000_000)
    log_every: int = spec_field(10, minimum=1, maximum=1_000_000)
    early_stopping: EarlyStoppingSpec | None = None


@dataclass(frozen=True)
class DeepSpeedSpec:
    zero_stage: int = spec_field(2, minimum=0, maximum=3)
    offload_optimizer: bool = spec_field(False)
    offload_params: bool = spec_field(False)


@dataclass(frozen=True)
class DistributedSpec:
    nodes: int = spec_field(1, minimum=1, maximum=1024)
    procs_per_node: int = spec_field(1, minimum=1, maximum=64)
    master_port: int = spec_field(29500, minimum=1024, maximum=65535)
    deepspeed: DeepSpeedSpec = field(default_factory=DeepSpeedSpec)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


@dataclass(frozen=True)
class CheckpointSpec:
    every_steps: int | None = spec_field(None, minimum=1, maximum=100_000_000)
    every_minutes: float | None = spec_field(None, minimum=0, maximum=10080, exclusive_minimum=True)
    keep: int = spec_field(3, minimum=1, maximum=1000)
    grace_period_seconds: int = spec_field(120, minimum=10, maximum=3600)


@dataclass(frozen=True)
class MetricsSpec:
    port: int = spec_field(9400, minimum=1024, maximum=65535)
    pushgateway: str | None = spec_field(None, pattern=HTTP_URL, max_length=2048)


# The CRD's bounds on evaluation prompts (the trainer applies the same to a promptsUri file).
MAX_PROMPTS = 64
MAX_PROMPT_LENGTH = 4096


@dataclass(frozen=True)
class EvaluationSpec:
    """Prompts answered at each evaluation and the check of the exported model."""

    prompts: tuple[str, ...] = ()
    prompts_uri: str | None = spec_field(None, pattern=URI, max_length=2048)
    max_new_tokens: int = spec_field(64, minimum=1, maximum=2048)
    sampling: bool = spec_field(False)
    temperature: float = spec_field(0.7, minimum=0, maximum=2, exclusive_minimum=True)
    top_p: float = spec_field(1.0, minimum=0, maximum=1, exclusive_minimum=True)
    generation_timeout_seconds: int = spec_field(120, minimum=1, maximum=3600)
    verify_export: bool = spec_field(True)


@dataclass(frozen=True)
class ResourcesSpec:
    """Quantities kept as the user wrote them (Kubernetes normalises them itself) plus their parsed values."""

    gpus: int = spec_field(0, minimum=0, maximum=64)
    cpu: str | None = None
    memory: str | None = None
    ephemeral_storage: str | None = None
    shared_memory: str | None = None
    cpu_cores: Decimal | None = None


@dataclass(frozen=True)
class StorageSpec:
    endpoint: str | None = spec_field(None, pattern=HTTP_URL, max_length=2048)
    region: str | None = spec_field(None, max_length=64)
    force_path_style: bool = spec_field(False)
    credentials_secret: str | None = spec_field(None, max_length=253)


@dataclass(frozen=True)
class MlflowSpec:
    tracking_uri: str = spec_field(pattern=HTTP_URL, max_length=2048)
    experiment: str = spec_field(min_length=1, max_length=500)
    run_name: str | None = spec_field(None, min_length=1, max_length=250)
    register_model_as: str | None = spec_field(None, pattern=_REGISTERED_MODEL, min_length=1, max_length=256)
    credentials_secret: str | None = spec_field(None, max_length=253)


@dataclass(frozen=True)
class TrackingSpec:
    mlflow: MlflowSpec | None = None


@dataclass(frozen=True)
class RestartBackoffSpec:
    initial_seconds: int = spec_field(10, minimum=0, maximum=3600)
    max_seconds: int = spec_field(300, minimum=0, maximum=86400)

    def delay(self, failures_before: int) -> int:
        """Seconds before the next attempt: initial, doubling per earlier restart, capped at max."""
        if self.initial_seconds == 0:
            return 0
        # Bounding the exponent keeps the arithmetic small for jobs with thousands of restarts.
        return int(min(self.max_seconds, self.initial_seconds * 2 ** min(failures_before, 32)))


@dataclass(frozen=True)
class GangSpec:
    """A PodGroup per attempt for a gang scheduler: no pod of the gang binds until ``min_member`` of them can."""

    scheduler: str = spec_field(enum=("volcano", "coscheduling"))
    # None: the whole gang (distributed.nodes), the only size torchrun's fixed world can start with.
    min_member: int | None = spec_field(None, minimum=1, maximum=1024)
    schedule_timeout_seconds: int = spec_field(300, minimum=1, maximum=86400)
    queue: str | None = spec_field(None, pattern=DNS_SUBDOMAIN, max_length=253)


@dataclass(frozen=True)
class TopologySpec:
    """The node label key (a topology level) whose one domain the gang must (required) or should (preferred)
    share."""

    required: str | None = spec_field(None, pattern=LABEL_KEY, max_length=63)
    preferred: str | None = spec_field(None, pattern=LABEL_KEY, max_length=63)

    @property
    def level(self) -> str:
        return self.required or self.preferred or ""


@dataclass(frozen=True)
class JobSpec:
    model: ModelSpec
    dataset: DatasetSpec
    output: OutputSpec
    training: TrainingSpec = field(default_factory=TrainingSpec)
    distributed: DistributedSpec = field(default_factory=DistributedSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    metrics: MetricsSpec = field(default_factory=MetricsSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] | None = None
    priority_class_name: str | None = spec_field(None, max_length=253)
    scheduler_name: str | None = spec_field(None, max_length=253)
    image: str | None = spec_field(None, max_length=1024)
    image_pull_policy: str = spec_field("IfNotPresent", enum=("Always", "IfNotPresent", "Never"))
    image_pull_secrets: tuple[str, ...] = ()
    service_account_name: str | None = spec_field(None, max_length=253)
    env: tuple[Mapping[str, Any], ...] = ()
    storage: StorageSpec = field(default_factory=StorageSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    suspend: bool = spec_field(False)
    # Kueue: the LocalQueue the job waits in for admission of its whole gang, and the priority it waits with.
    queue_name: str | None = spec_field(None, pattern=DNS_LABEL, max_length=63)
    workload_priority_class: str | None = spec_field(None, pattern=DNS_SUBDOMAIN, max_length=253)
    # Gang scheduling by Volcano or scheduler-plugins' coscheduling, and where in the network the gang lands.
    gang: GangSpec | None = None
    topology: TopologySpec | None = None
    backoff_limit: int = spec_field(3, minimum=0, maximum=1000)
    retryable_exit_codes: frozenset[int] = frozenset()
    restart_backoff: RestartBackoffSpec = field(default_factory=RestartBackoffSpec)
    active_deadline_seconds: int | None = spec_field(None, minimum=1)
    startup_deadline_seconds: int = spec_field(600, minimum=1, maximum=86400)
    capacity_timeout_seconds: int = spec_field(1800, minimum=1, maximum=604800)
    ttl_seconds_after_finished: int | None = spec_field(None, minimum=0)
    clean_pod_policy: str = spec_field("All", enum=("All", "Running", "None"))

    @property
    def gang_min_member(self) -> int:
        """The PodGroup's minMember: spec.gang.minMember, else the whole gang."""
        if self.gang is not None and self.gang.min_member is not None:
            return self.gang.min_member
        return self.distributed.nodes

    @property
    def export(self) -> str:
        """What model/ holds. The trainer resolves the same default for configs written by hand; the operator
        renders the resolved value, so status.model.export and the trainer never disagree."""
        if self.output.export:
            return self.output.export
        return "adapter" if self.training.method == "lora" else "full"


@dataclass(frozen=True)
class JobMeta:
    """The parts of a FineTuneJob's metadata the operator uses."""

    name: str
    namespace: str
    uid: str
    generation: int = 0
    creation_timestamp: datetime.datetime | None = None
    deleting: bool = False


@dataclass(frozen=True)
class FineTuneJob:
    """A parsed job: its metadata, its spec and the attempt (gang incarnation) the children belong to."""

    meta: JobMeta
    spec: JobSpec
    attempt: int = 0

    @property
    def name(self) -> str:
        return self.meta.name

    @property
    def namespace(self) -> str:
        return self.meta.namespace


# ---- parsing the sections that are more than scalars ---------------------------------------------------------


def _parse_lora(r: Reader) -> LoraSpec:
    modules = r.items("targetModules", 64)
    for i, module in enumerate(modules):
        if not isinstance(module, str) or not _MODULE_NAME.match(module):
            raise InvalidSpecError(f"{r.at('targetModules')}[{i}]", f"{module!r} is not a module name")
    return read_fields(LoraSpec, r, target_modules=tuple(modules))


def _parse_training(r: Reader) -> TrainingSpec:
    lora = r.optional_obj("lora")
    early_stopping = r.optional_obj("earlyStopping")
    return read_fields(
        TrainingSpec,
        r,
        lora=None if lora is None else _parse_lora(lora),
        early_stopping=None if early_stopping is None else read_fields(EarlyStoppingSpec, early_stopping),
    )


def _parse_evaluation(r: Reader) -> EvaluationSpec:
    prompts = r.items("prompts", MAX_PROMPTS)
    if r.has("prompts") and not prompts:
        raise InvalidSpecError(r.at("prompts"), "must hold at least one prompt (or leave it out)")
    for i, prompt in enumerate(prompts):
        where = f"{r.at('prompts')}[{i}]"
        if not isinstance(prompt, str) or not prompt:
            raise InvalidSpecError(where, "must be a non-empty string")
        if len(prompt) > MAX_PROMPT_LENGTH:
            raise InvalidSpecError(where, f"longer than {MAX_PROMPT_LENGTH} characters")
    if prompts and r.has("promptsUri"):
        raise InvalidSpecError(r.at("promptsUri"), "set either evaluation.prompts or evaluation.promptsUri, not both")
    return read_fields(EvaluationSpec, r, prompts=tuple(prompts))


def _quantity(reader: Reader, key: str) -> tuple[str | None, Decimal | None]:
    value = reader.data.get(key)
    if value is None:
        return None, None
    return str(value), parse_quantity(value, reader.at(key))


def _parse_resources(r: Reader) -> ResourcesSpec:
    cpu, cpu_cores = _quantity(r, "cpu")
    memory, memory_bytes = _quantity(r, "memory")
    ephemeral, _ = _quantity(r, "ephemeralStorage")
    shm, shm_bytes = _quantity(r, "sharedMemory")
    if cpu_cores is not None and cpu_cores <= 0:
        raise InvalidSpecError(r.at("cpu"), f"{cpu} must be more than 0")
    if memory_bytes is not None and memory_bytes <= 0:
        raise InvalidSpecError(r.at("memory"), f"{memory} must be more than 0")
    if shm_bytes is not None and memory_bytes is not None and shm_bytes > memory_bytes:
        raise InvalidSpecError(
            r.at("sharedMemory"),
            f"{shm} exceeds spec.resources.memory {memory}: a memory-backed /dev/shm counts against the memory limit",
        )
    return read_fields(
        ResourcesSpec, r, cpu=cpu, memory=memory, ephemeral_storage=ephemeral, shared_memory=shm, cpu_cores=cpu_cores
    )


def _parse_tolerations(r: Reader) -> tuple[Mapping[str, Any], ...]:
    tolerations = r.items("tolerations", 64)
    for i, toleration in enumerate(tolerations):
        where = f"{r.at('tolerations')}[{i}]"
        if not isinstance(toleration, Mapping):
            raise InvalidSpecError(where, f"must be an object, got {kind_of(toleration)}")
        if toleration.get("operator") == "Exists" and toleration.get("value"):
            raise InvalidSpecError(f"{where}.value", "must be empty when operator is Exists")
    return tuple(tolerations)


def _parse_env(r: Reader) -> tuple[Mapping[str, Any], ...]:
    env = r.items("env", 128)
    seen: set[str] = set()
    for i, item in enumerate(env):
        where = f"{r.at('env')}[{i}]"
        if not isinstance(item, Mapping):
            raise InvalidSpecError(where, f"must be an object, got {kind_of(item)}")
        name = item.get("name")
        if not isinstance(name, str) or not _ENV_NAME.match(name):
            raise InvalidSpecError(f"{where}.name", f"{name!r} is not a valid environment variable name")
        if name in c.RESERVED_ENV_NAMES or name.startswith(c.RESERVED_ENV_PREFIXES):
            raise InvalidSpecError(f"{where}.name", f"env {name} is reserved: the operator sets it for every pod")
        if name in seen:
            raise InvalidSpecError(f"{where}.name", f"env {name} is listed twice")
        seen.add(name)
        if "value" in item and "valueFrom" in item:
            raise InvalidSpecError(where, "set either value or valueFrom, not both")
        if "value" in item and not isinstance(item["value"], str):
            raise InvalidSpecError(f"{where}.value", f"must be a string, got {kind_of(item['value'])}")
    return tuple(env)


def _parse_exit_codes(r: Reader) -> frozenset[int]:
    codes = r.items("retryableExitCodes", 32)
    for i, code in enumerate(codes):
        if isinstance(code, bool) or not isinstance(code, int) or not 1 <= code <= 255:
            raise InvalidSpecError(f"{r.at('retryableExitCodes')}[{i}]", f"{code!r} is not an exit code (1-255)")
    return frozenset(codes)


def _parse_node_selector(r: Reader) -> dict[str, Any]:
    node_selector = r.mapping("nodeSelector")
    for key, value in node_selector.items():
        if not isinstance(value, str):
            raise InvalidSpecError(f"{r.at('nodeSelector')}.{key}", f"must be a string, got {kind_of(value)}")
    return node_selector


def _parse_pull_secrets(r: Reader) -> tuple[str, ...]:
    names = []
    for i, secret in enumerate(r.items("imagePullSecrets", 16)):
        name = secret.get("name") if isinstance(secret, Mapping) else None
        if not isinstance(name, str) or not name:
            raise InvalidSpecError(f"{r.at('imagePullSecrets')}[{i}].name", "required")
        names.append(name)
    return tuple(names)


def _parse_tracking(r: Reader) -> TrackingSpec:
    mlflow = r.optional_obj("mlflow")
    return TrackingSpec(mlflow=None if mlflow is None else read_fields(MlflowSpec, mlflow))


def parse_spec(data: Any) -> JobSpec:
    """The typed spec with the CRD's defaults applied, or InvalidSpecError naming the first bad field."""
    r = Reader(data, "spec")
    distributed = r.obj("distributed")
    gang, topology = r.optional_obj("gang"), r.optional_obj("topology")
    spec = read_fields(
        JobSpec,
        r,
        model=read_fields(ModelSpec, r.obj("model")),
        dataset=read_fields(DatasetSpec, r.obj("dataset")),
        output=read_fields(OutputSpec, r.obj("output")),
        training=_parse_training(r.obj("training")),
        distributed=read_fields(
            DistributedSpec, distributed, deepspeed=read_fields(DeepSpeedSpec, distributed.obj("deepspeed"))
        ),
        checkpoint=read_fields(CheckpointSpec, r.obj("checkpoint")),
        metrics=read_fields(MetricsSpec, r.obj("metrics")),
        evaluation=_parse_evaluation(r.obj("evaluation")),
        resources=_parse_resources(r.obj("resources")),
        node_selector=_parse_node_selector(r),
        tolerations=_parse_tolerations(r),
        affinity=r.mapping("affinity") if r.has("affinity") else None,
        image_pull_secrets=_parse_pull_secrets(r),
        env=_parse_env(r),
        storage=read_fields(StorageSpec, r.obj("storage")),
        tracking=_parse_tracking(r.obj("tracking")),
        retryable_exit_codes=_parse_exit_codes(r),
        restart_backoff=read_fields(RestartBackoffSpec, r.obj("restartBackoff")),
        gang=None if gang is None else read_fields(GangSpec, gang),
        topology=None if topology is None else read_fields(TopologySpec, topology),
    )
    check_spec(spec)
    return spec


def parse_time(value: Any) -> datetime.datetime | None:
    """An RFC 3339 timestamp as an aware datetime; None for absent or unparseable values."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def format_time(value: datetime.datetime) -> str:
    """RFC 3339 in UTC with second precision, as Kubernetes writes metav1.Time."""
    return value.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_meta(body: Mapping[str, Any]) -> JobMeta:
    metadata = body.get("metadata") or {}
    generation = metadata.get("generation")
    return JobMeta(
        name=str(metadata.get("name", "")),
        namespace=str(metadata.get("namespace") or "default"),
        uid=str(metadata.get("uid", "")),
        generation=generation if isinstance(generation, int) else 0,
        creation_timestamp=parse_time(metadata.get("creationTimestamp")),
        deleting=bool(metadata.get("deletionTimestamp")),
    )


def parse_job(body: Mapping[str, Any]) -> FineTuneJob:
    """A whole FineTuneJob object (metadata, spec, status.attempt) parsed and checked."""
    meta = parse_meta(body)
    spec = parse_spec(body.get("spec"))
    check_name(meta.name, spec.distributed.nodes)
    status = body.get("status") or {}
    attempt = status.get("attempt") if isinstance(status, Mapping) else None
    return FineTuneJob(meta=meta, spec=spec, attempt=attempt if isinstance(attempt, int) and attempt >= 0 else 0)

"""A FineTuneJob parsed into frozen, typed dataclasses, with the CRD's defaults and the checks a schema cannot make.

The API server validates the CRD schema and its CEL rules and applies defaults; this module re-applies the
defaults (so objects stored without a defaulting server still work), type-checks what it reads (a malformed object
must fail its job, not crash the operator) and adds the cross-field checks listed in ``CHECKS``. Every problem
raises ``InvalidSpecError`` whose message starts with the field path, e.g.
``spec.distributed: nodes x procsPerNode = 2048 processes exceeds the supported 1024``.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from finetune_operator import constants as c

# The checks beyond the CRD schema, one line each, kept beside the code that makes them.
CHECKS: Final = (
    "metadata.name is a DNS-1035 label (it names the headless Service) short enough for '<name>-n<rank>'",
    "spec.distributed: nodes x procsPerNode <= 1024 processes",
    "spec.training.maxSeqLength <= 65536 (no sequence parallelism) and batchSize x maxSeqLength <= 1048576",
    "spec.resources.*: valid Kubernetes quantities; cpu and memory > 0; sharedMemory <= memory",
    "spec.checkpoint.gracePeriodSeconds < spec.activeDeadlineSeconds",
    "spec.dataset.evalUri differs from spec.dataset.uri",
    "spec.output.uri does not overlap spec.model.uri, spec.dataset.uri or spec.dataset.evalUri",
    "spec.model.uri and spec.output.uri are not file:// when nodes > 1 (a local path is not shared by nodes)",
    "spec.metrics.port..port+procsPerNode-1 (one endpoint per local rank) does not include distributed.masterPort",
    "spec.retryableExitCodes does not contain 64, the trainer's permanent-error code",
    "spec.env: no reserved name, no duplicate name, not both value and valueFrom",
    "spec.tolerations[i]: operator Exists takes no value",
    "the CEL rules again (epochs xor maxSteps, lora only with method lora, export vs method, offload vs zeroStage,"
    " earlyStopping needs evalEvery, evalSplit xor evalUri, procsPerNode <= gpus, backoff initial <= max)",
)

MAX_WORLD_SIZE: Final = 1024
MAX_SEQ_LENGTH: Final = 65536
MAX_TOKENS_PER_MICRO_BATCH: Final = 1 << 20
MAX_HOSTNAME_LENGTH: Final = 63

_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_URI = re.compile(r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/\S*)?|file:///\S*)$")
_HTTP_URL = re.compile(r"^https?://[^\s/]+(/\S*)?$")
_PATTERN_NAMES: Final = {
    _URI.pattern: "s3://bucket/key or file:///absolute/path",
    _HTTP_URL.pattern: "an http:// or https:// URL",
}
_QUANTITY = re.compile(r"^\+?(?P<number>[0-9]+(\.[0-9]*)?|\.[0-9]+)(?P<suffix>[eE][+-]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$")
_SUFFIX_FACTORS: Final = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}


class InvalidSpecError(ValueError):
    """The job's spec cannot run; ``str()`` starts with the field path (``spec.training.maxSeqLength: ...``)."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}")
        self.field_path = field_path
        self.message = message


def parse_quantity(value: Any, where: str) -> Decimal:
    """A Kubernetes resource quantity (``8``, ``7500m``, ``64Gi``, ``1e3``) as a Decimal."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidSpecError(where, f"{value!r} is not a valid quantity (e.g. 8, 7500m, 64Gi)")
    text = str(value).strip()
    match = _QUANTITY.match(text)
    if match is None:
        raise InvalidSpecError(where, f"{text!r} is not a valid quantity (e.g. 8, 7500m, 64Gi)")
    suffix = match.group("suffix") or ""
    try:
        number = Decimal(match.group("number"))
        if suffix[:1] in ("e", "E"):
            return number * Decimal(10) ** int(suffix[1:])
        return number * _SUFFIX_FACTORS[suffix]
    except (InvalidOperation, KeyError) as exc:
        raise InvalidSpecError(where, f"{text!r} is not a valid quantity (e.g. 8, 7500m, 64Gi)") from exc


# ---- the typed spec --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    uri: str
    revision: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class DatasetSpec:
    uri: str
    format: str = "chat"
    eval_split: float | None = None
    eval_uri: str | None = None
    text_field: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    max_malformed_rows: int = 0


@dataclass(frozen=True)
class OutputSpec:
    uri: str
    export: str | None = None


@dataclass(frozen=True)
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class EarlyStoppingSpec:
    patience: int
    metric: str = "evalLoss"
    min_delta: float = 0.0


@dataclass(frozen=True)
class TrainingSpec:
    method: str = "full"
    lora: LoraSpec | None = None
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_seq_length: int = 1024
    packing: bool = False
    warmup_ratio: float = 0.0
    scheduler: str = "cosine"
    precision: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 42
    eval_every: int | None = None
    log_every: int = 10
    early_stopping: EarlyStoppingSpec | None = None


@dataclass(frozen=True)
class DeepSpeedSpec:
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass(frozen=True)
class DistributedSpec:
    nodes: int = 1
    procs_per_node: int = 1
    master_port: int = 29500
    deepspeed: DeepSpeedSpec = field(default_factory=DeepSpeedSpec)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


@dataclass(frozen=True)
class CheckpointSpec:
    every_steps: int | None = None
    every_minutes: float | None = None
    keep: int = 3
    grace_period_seconds: int = 120


@dataclass(frozen=True)
class MetricsSpec:
    port: int = 9400
    pushgateway: str | None = None


@dataclass(frozen=True)
class ResourcesSpec:
    """Quantities kept as the user wrote them (Kubernetes normalises them itself) plus their parsed values."""

    gpus: int = 0
    cpu: str | None = None
    memory: str | None = None
    ephemeral_storage: str | None = None
    shared_memory: str | None = None
    cpu_cores: Decimal | None = None


@dataclass(frozen=True)
class StorageSpec:
    endpoint: str | None = None
    region: str | None = None
    force_path_style: bool = False
    credentials_secret: str | None = None


@dataclass(frozen=True)
class RestartBackoffSpec:
    initial_seconds: int = 10
    max_seconds: int = 300

    def delay(self, failures_before: int) -> int:
        """Seconds before the next attempt: initial, doubling per earlier restart, capped at max."""
        if self.initial_seconds == 0:
            return 0
        # Bounding the exponent keeps the arithmetic small for jobs with thousands of restarts.
        return int(min(self.max_seconds, self.initial_seconds * 2 ** min(failures_before, 32)))


@dataclass(frozen=True)
class JobSpec:
    model: ModelSpec
    dataset: DatasetSpec
    output: OutputSpec
    training: TrainingSpec = field(default_factory=TrainingSpec)
    distributed: DistributedSpec = field(default_factory=DistributedSpec)
    checkpoint: CheckpointSpec = field(default_factory=CheckpointSpec)
    metrics: MetricsSpec = field(default_factory=MetricsSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] | None = None
    priority_class_name: str | None = None
    scheduler_name: str | None = None
    image: str | None = None
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    service_account_name: str | None = None
    env: tuple[Mapping[str, Any], ...] = ()
    storage: StorageSpec = field(default_factory=StorageSpec)
    suspend: bool = False
    backoff_limit: int = 3
    retryable_exit_codes: frozenset[int] = frozenset()
    restart_backoff: RestartBackoffSpec = field(default_factory=RestartBackoffSpec)
    active_deadline_seconds: int | None = None
    startup_deadline_seconds: int = 600
    capacity_timeout_seconds: int = 1800
    ttl_seconds_after_finished: int | None = None
    clean_pod_policy: str = "All"

    @property
    def export(self) -> str:
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


# ---- reading plain data with field paths ----------------------------------------------------------------


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}
    return names.get(type(value), "a number" if isinstance(value, float) else type(value).__name__)


class _Reader:
    """Typed access to one object of the spec; every error names ``path.key``."""

    def __init__(self, data: Any, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise InvalidSpecError(path, f"must be an object, got {_kind(data)}")
        self.data: Mapping[str, Any] = data
        self.path = path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}"

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def obj(self, key: str) -> _Reader:
        return _Reader(self.data.get(key), self.at(key))

    def optional_obj(self, key: str) -> _Reader | None:
        return self.obj(key) if self.has(key) else None

    def text_or_none(self, key: str, *, pattern: re.Pattern[str] | None = None, max_length: int | None = None,
                    choices: tuple[str, ...] | None = None) -> str | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise InvalidSpecError(self.at(key), f"must be a string, got {_kind(value)}")
        if choices is not None and value not in choices:
            raise InvalidSpecError(self.at(key), f"{value!r} is not one of {', '.join(choices)}")
        if max_length is not None and len(value) > max_length:
            raise InvalidSpecError(self.at(key), f"longer than {max_length} characters")
        if pattern is not None and not pattern.match(value):
            expected = _PATTERN_NAMES.get(pattern.pattern, f"match {pattern.pattern}")
            raise InvalidSpecError(self.at(key), f"{value!r} must be {expected}")
        return value

    def text(self, key: str, default: str | None = None, **kwargs: Any) -> str:
        value = self.text_or_none(key, **kwargs)
        if value is None:
            if default is None:
                raise InvalidSpecError(self.at(key), "required")
            return default
        return value

    def integer_or_none(self, key: str, low: int | None = None, high: int | None = None) -> int | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidSpecError(self.at(key), f"must be an integer, got {_kind(value)}")
        self._check_range(key, value, low, high)
        return value

    def integer(self, key: str, default: int, low: int | None = None, high: int | None = None) -> int:
        value = self.integer_or_none(key, low, high)
        return default if value is None else value

    def number_or_none(self, key: str, low: float | None = None, high: float | None = None,
                    *, low_exclusive: bool = False) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidSpecError(self.at(key), f"must be a number, got {_kind(value)}")
        if low is not None and low_exclusive and value <= low:
            raise InvalidSpecError(self.at(key), f"must be > {low:g}, got {value:g}")
        self._check_range(key, value, low, high)
        return float(value)

    def number(self, key: str, default: float, low: float | None = None, high: float | None = None,
            *, low_exclusive: bool = False) -> float:
        value = self.number_or_none(key, low, high, low_exclusive=low_exclusive)
        return default if value is None else value

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise InvalidSpecError(self.at(key), f"must be a boolean, got {_kind(value)}")
        return value

    def items(self, key: str, max_items: int | None = None) -> list[Any]:
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise InvalidSpecError(self.at(key), f"must be a list, got {_kind(value)}")
        if max_items is not None and len(value) > max_items:
            raise InvalidSpecError(self.at(key), f"has {len(value)} items, more than {max_items}")
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.data.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise InvalidSpecError(self.at(key), f"must be an object, got {_kind(value)}")
        return dict(value)

    def _check_range(self, key: str, value: float, low: float | None, high: float | None) -> None:
        if low is not None and value < low:
            raise InvalidSpecError(self.at(key), f"must be >= {low:g}, got {value:g}")
        if high is not None and value > high:
            raise InvalidSpecError(self.at(key), f"must be <= {high:g}, got {value:g}")


def _quantity(reader: _Reader, key: str) -> tuple[str | None, Decimal | None]:
    value = reader.data.get(key)
    if value is None:
        return None, None
    amount = parse_quantity(value, reader.at(key))
    return str(value), amount


# ---- parsing the sections ------------------------------------------------------------------------------


def _parse_model(r: _Reader) -> ModelSpec:
    return ModelSpec(
        uri=r.text("uri", pattern=_URI, max_length=2048),
        revision=r.text_or_none("revision", max_length=256),
        sha256=r.text_or_none("sha256", pattern=re.compile(r"^[a-f0-9]{64}$")),
    )


def _parse_dataset(r: _Reader) -> DatasetSpec:
    return DatasetSpec(
        uri=r.text("uri", pattern=_URI, max_length=2048),
        format=r.text("format", "chat", choices=("text", "promptCompletion", "chat")),
        eval_split=r.number_or_none("evalSplit", 0, 0.5, low_exclusive=True),
        eval_uri=r.text_or_none("evalUri", pattern=_URI, max_length=2048),
        text_field=r.text("textField", "text", max_length=128),
        prompt_field=r.text("promptField", "prompt", max_length=128),
        completion_field=r.text("completionField", "completion", max_length=128),
        messages_field=r.text("messagesField", "messages", max_length=128),
        max_malformed_rows=r.integer("maxMalformedRows", 0, 0, 1_000_000),
    )


def _parse_training(r: _Reader) -> TrainingSpec:
    lora_reader = r.optional_obj("lora")
    lora = None
    if lora_reader is not None:
        modules = lora_reader.items("targetModules", 64)
        for i, module in enumerate(modules):
            if not isinstance(module, str) or not re.match(r"^[A-Za-z0-9_.]+$", module):
                raise InvalidSpecError(f"{lora_reader.at('targetModules')}[{i}]", f"{module!r} is not a module name")
        lora = LoraSpec(
            r=lora_reader.integer("r", 16, 1, 1024),
            alpha=lora_reader.integer("alpha", 32, 1, 4096),
            dropout=lora_reader.number("dropout", 0.05, 0, 0.9),
            target_modules=tuple(modules),
        )
    es_reader = r.optional_obj("earlyStopping")
    early_stopping = None
    if es_reader is not None:
        patience = es_reader.integer_or_none("patience", 1, 1000)
        if patience is None:
            raise InvalidSpecError(es_reader.at("patience"), "required")
        early_stopping = EarlyStoppingSpec(
            patience=patience,
            metric=es_reader.text("metric", "evalLoss", choices=("evalLoss",)),
            min_delta=es_reader.number("minDelta", 0.0, 0),
        )
    return TrainingSpec(
        method=r.text("method", "full", choices=("full", "lora")),
        lora=lora,
        learning_rate=r.number("learningRate", 2e-4, 0, 1, low_exclusive=True),
        weight_decay=r.number("weightDecay", 0.0, 0, 1),
        epochs=r.number_or_none("epochs", 0, 1000, low_exclusive=True),
        max_steps=r.integer_or_none("maxSteps", 1, 100_000_000),
        batch_size=r.integer("batchSize", 1, 1, 4096),
        gradient_accumulation_steps=r.integer("gradientAccumulationSteps", 1, 1, 4096),
        max_seq_length=r.integer("maxSeqLength", 1024, 8, 1_048_576),
        packing=r.flag("packing", False),
        warmup_ratio=r.number("warmupRatio", 0.0, 0, 0.5),
        scheduler=r.text("scheduler", "cosine", choices=("linear", "cosine", "constant", "constant_with_warmup")),
        precision=r.text("precision", "auto", choices=("auto", "bf16", "fp16", "fp32")),
        gradient_checkpointing=r.flag("gradientCheckpointing", False),
        seed=r.integer("seed", 42, 0, 4_294_967_295),
        eval_every=r.integer_or_none("evalEvery", 1, 100_000_000),
        log_every=r.integer("logEvery", 10, 1, 1_000_000),
        early_stopping=early_stopping,
    )


def _parse_distributed(r: _Reader) -> DistributedSpec:
    ds = r.obj("deepspeed")
    return DistributedSpec(
        nodes=r.integer("nodes", 1, 1, 1024),
        procs_per_node=r.integer("procsPerNode", 1, 1, 64),
        master_port=r.integer("masterPort", 29500, 1024, 65535),
        deepspeed=DeepSpeedSpec(
            zero_stage=ds.integer("zeroStage", 2, 0, 3),
            offload_optimizer=ds.flag("offloadOptimizer", False),
            offload_params=ds.flag("offloadParams", False),
        ),
    )


def _parse_resources(r: _Reader) -> ResourcesSpec:
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
    return ResourcesSpec(
        gpus=r.integer("gpus", 0, 0, 64),
        cpu=cpu,
        memory=memory,
        ephemeral_storage=ephemeral,
        shared_memory=shm,
        cpu_cores=cpu_cores,
    )


def _parse_tolerations(r: _Reader) -> tuple[Mapping[str, Any], ...]:
    tolerations = r.items("tolerations", 64)
    for i, toleration in enumerate(tolerations):
        where = f"{r.at('tolerations')}[{i}]"
        if not isinstance(toleration, Mapping):
            raise InvalidSpecError(where, f"must be an object, got {_kind(toleration)}")
        if toleration.get("operator") == "Exists" and toleration.get("value"):
            raise InvalidSpecError(f"{where}.value", "must be empty when operator is Exists")
    return tuple(tolerations)


def _parse_env(r: _Reader) -> tuple[Mapping[str, Any], ...]:
    env = r.items("env", 128)
    seen: set[str] = set()
    for i, item in enumerate(env):
        where = f"{r.at('env')}[{i}]"
        if not isinstance(item, Mapping):
            raise InvalidSpecError(where, f"must be an object, got {_kind(item)}")
        name = item.get("name")
        if not isinstance(name, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise InvalidSpecError(f"{where}.name", f"{name!r} is not a valid environment variable name")
        if name in c.RESERVED_ENV_NAMES or name.startswith(c.RESERVED_ENV_PREFIXES):
            raise InvalidSpecError(f"{where}.name", f"env {name} is reserved: the operator sets it for every pod")
        if name in seen:
            raise InvalidSpecError(f"{where}.name", f"env {name} is listed twice")
        seen.add(name)
        if "value" in item and "valueFrom" in item:
            raise InvalidSpecError(where, "set either value or valueFrom, not both")
        if "value" in item and not isinstance(item["value"], str):
            raise InvalidSpecError(f"{where}.value", f"must be a string, got {_kind(item['value'])}")
    return tuple(env)


def parse_spec(data: Any) -> JobSpec:
    """The typed spec with the CRD's defaults applied, or InvalidSpecError naming the first bad field."""
    r = _Reader(data, "spec")
    storage = r.obj("storage")
    backoff = r.obj("restartBackoff")
    metrics = r.obj("metrics")
    checkpoint = r.obj("checkpoint")
    exit_codes = r.items("retryableExitCodes", 32)
    for i, code in enumerate(exit_codes):
        if isinstance(code, bool) or not isinstance(code, int) or not 1 <= code <= 255:
            raise InvalidSpecError(f"spec.retryableExitCodes[{i}]", f"{code!r} is not an exit code (1-255)")
    node_selector = r.mapping("nodeSelector")
    for key, value in node_selector.items():
        if not isinstance(value, str):
            raise InvalidSpecError(f"spec.nodeSelector.{key}", f"must be a string, got {_kind(value)}")
    pull_secrets = []
    for i, secret in enumerate(r.items("imagePullSecrets", 16)):
        name = secret.get("name") if isinstance(secret, Mapping) else None
        if not isinstance(name, str) or not name:
            raise InvalidSpecError(f"spec.imagePullSecrets[{i}].name", "required")
        pull_secrets.append(name)
    affinity = r.mapping("affinity") if r.has("affinity") else None
    spec = JobSpec(
        model=_parse_model(r.obj("model")),
        dataset=_parse_dataset(r.obj("dataset")),
        output=OutputSpec(
            uri=r.obj("output").text("uri", pattern=_URI, max_length=2048),
            export=r.obj("output").text_or_none("export", choices=("adapter", "merged", "full")),
        ),
        training=_parse_training(r.obj("training")),
        distributed=_parse_distributed(r.obj("distributed")),
        checkpoint=CheckpointSpec(
            every_steps=checkpoint.integer_or_none("everySteps", 1, 100_000_000),
            every_minutes=checkpoint.number_or_none("everyMinutes", 0, 10080, low_exclusive=True),
            keep=checkpoint.integer("keep", 3, 1, 1000),
            grace_period_seconds=checkpoint.integer("gracePeriodSeconds", 120, 10, 3600),
        ),
        metrics=MetricsSpec(
            port=metrics.integer("port", 9400, 1024, 65535),
            pushgateway=metrics.text_or_none("pushgateway", pattern=_HTTP_URL, max_length=2048),
        ),
        resources=_parse_resources(r.obj("resources")),
        node_selector=node_selector,
        tolerations=_parse_tolerations(r),
        affinity=affinity,
        priority_class_name=r.text_or_none("priorityClassName", max_length=253),
        scheduler_name=r.text_or_none("schedulerName", max_length=253),
        image=r.text_or_none("image", max_length=1024) or None,
        image_pull_policy=r.text("imagePullPolicy", "IfNotPresent", choices=("Always", "IfNotPresent", "Never")),
        image_pull_secrets=tuple(pull_secrets),
        service_account_name=r.text_or_none("serviceAccountName", max_length=253),
        env=_parse_env(r),
        storage=StorageSpec(
            endpoint=storage.text_or_none("endpoint", pattern=_HTTP_URL, max_length=2048),
            region=storage.text_or_none("region", max_length=64),
            force_path_style=storage.flag("forcePathStyle", False),
            credentials_secret=storage.text_or_none("credentialsSecret", max_length=253),
        ),
        suspend=r.flag("suspend", False),
        backoff_limit=r.integer("backoffLimit", 3, 0, 1000),
        retryable_exit_codes=frozenset(exit_codes),
        restart_backoff=RestartBackoffSpec(
            initial_seconds=backoff.integer("initialSeconds", 10, 0, 3600),
            max_seconds=backoff.integer("maxSeconds", 300, 0, 86400),
        ),
        active_deadline_seconds=r.integer_or_none("activeDeadlineSeconds", 1),
        startup_deadline_seconds=r.integer("startupDeadlineSeconds", 600, 1, 86400),
        capacity_timeout_seconds=r.integer("capacityTimeoutSeconds", 1800, 1, 604800),
        ttl_seconds_after_finished=r.integer_or_none("ttlSecondsAfterFinished", 0),
        clean_pod_policy=r.text("cleanPodPolicy", "All", choices=("All", "Running", "None")),
    )
    check_spec(spec)
    return spec


# ---- the cross-field checks ------------------------------------------------------------------------------


def _path_of(uri: str) -> str:
    return uri.rstrip("/")


def uris_overlap(a: str, b: str) -> bool:
    """True when one URI is the other or a folder above it (``s3://b/x`` and ``s3://b/x/y``, not ``s3://b/xy``)."""
    pa, pb = _path_of(a), _path_of(b)
    return pa == pb or pa.startswith(pb + "/") or pb.startswith(pa + "/")


def check_spec(spec: JobSpec) -> None:
    """The checks a schema cannot express (and the CEL rules again, for servers that skip them)."""
    t, d, ds = spec.training, spec.distributed, spec.dataset
    # CEL rules, repeated: without them the trainer would exit 64 minutes later with the same news.
    if (t.epochs is None) == (t.max_steps is None):
        raise InvalidSpecError("spec.training", "set exactly one of training.epochs and training.maxSteps")
    if t.lora is not None and t.method != "lora":
        raise InvalidSpecError("spec.training.lora", "only allowed with training.method 'lora'")
    if t.early_stopping is not None and t.eval_every is None:
        raise InvalidSpecError("spec.training.earlyStopping", "needs training.evalEvery: it stops on evaluations")
    if spec.output.export in ("adapter", "merged") and t.method != "lora":
        raise InvalidSpecError("spec.output.export", f"{spec.output.export!r} needs training.method 'lora'")
    if ds.eval_split is not None and ds.eval_uri is not None:
        raise InvalidSpecError("spec.dataset", "set either dataset.evalSplit or dataset.evalUri, not both")
    if d.deepspeed.offload_optimizer and d.deepspeed.zero_stage < 2:
        raise InvalidSpecError("spec.distributed.deepspeed.offloadOptimizer", "needs zeroStage 2 or 3")
    if d.deepspeed.offload_params and d.deepspeed.zero_stage != 3:
        raise InvalidSpecError("spec.distributed.deepspeed.offloadParams", "needs zeroStage 3")
    if spec.resources.gpus > 0 and d.procs_per_node > spec.resources.gpus:
        raise InvalidSpecError(
            "spec.distributed.procsPerNode",
            f"{d.procs_per_node} exceeds resources.gpus {spec.resources.gpus}: each process drives one GPU",
        )
    if spec.restart_backoff.initial_seconds > spec.restart_backoff.max_seconds:
        raise InvalidSpecError("spec.restartBackoff.initialSeconds", "cannot exceed restartBackoff.maxSeconds")

    # Beyond the schema.
    if d.world_size > MAX_WORLD_SIZE:
        raise InvalidSpecError(
            "spec.distributed",
            f"nodes x procsPerNode = {d.world_size} processes exceeds the supported {MAX_WORLD_SIZE}",
        )
    if t.max_seq_length > MAX_SEQ_LENGTH:
        raise InvalidSpecError(
            "spec.training.maxSeqLength",
            f"{t.max_seq_length} exceeds {MAX_SEQ_LENGTH}: the trainer has no sequence parallelism, so one "
            "sequence must fit one device",
        )
    tokens = t.batch_size * t.max_seq_length
    if tokens > MAX_TOKENS_PER_MICRO_BATCH:
        raise InvalidSpecError(
            "spec.training.batchSize",
            f"batchSize x maxSeqLength = {tokens} tokens per device micro-step exceeds {MAX_TOKENS_PER_MICRO_BATCH}; "
            "use gradientAccumulationSteps for a larger global batch",
        )
    if spec.active_deadline_seconds is not None and (
        spec.checkpoint.grace_period_seconds >= spec.active_deadline_seconds
    ):
        raise InvalidSpecError(
            "spec.checkpoint.gracePeriodSeconds",
            f"{spec.checkpoint.grace_period_seconds} must be less than activeDeadlineSeconds "
            f"{spec.active_deadline_seconds}",
        )
    if ds.eval_uri is not None and _path_of(ds.eval_uri) == _path_of(ds.uri):
        raise InvalidSpecError("spec.dataset.evalUri", "equals spec.dataset.uri: evaluating on the training data")
    for other_path, other in (
        ("spec.model.uri", spec.model.uri),
        ("spec.dataset.uri", ds.uri),
        ("spec.dataset.evalUri", ds.eval_uri),
    ):
        if other is not None and uris_overlap(spec.output.uri, other):
            raise InvalidSpecError(
                "spec.output.uri",
                f"{spec.output.uri} overlaps {other_path} {other}: checkpoints and the model would be written "
                "among the inputs",
            )
    if d.nodes > 1:
        for where, uri in (("spec.model.uri", spec.model.uri), ("spec.output.uri", spec.output.uri)):
            if uri.startswith("file://"):
                raise InvalidSpecError(
                    where,
                    f"{uri} is a node-local path but distributed.nodes is {d.nodes}: every node must see the same "
                    "files, use s3://",
                )
    metrics_ports = range(spec.metrics.port, spec.metrics.port + d.procs_per_node)
    if d.master_port in metrics_ports:
        raise InvalidSpecError(
            "spec.metrics.port",
            f"ports {metrics_ports.start}-{metrics_ports.stop - 1} (one per local rank) include "
            f"distributed.masterPort {d.master_port}",
        )
    if c.EXIT_INVALID in spec.retryable_exit_codes:
        raise InvalidSpecError(
            "spec.retryableExitCodes",
            f"{c.EXIT_INVALID} is the trainer's permanent-error exit code (bad config or data); retrying cannot help",
        )


def check_name(name: str, nodes: int) -> None:
    """The job's name becomes a Service name (a DNS-1035 label) and the pods' hostnames ``<name>-n<rank>``."""
    if not _DNS_1035_LABEL.match(name):
        raise InvalidSpecError(
            "metadata.name",
            f"{name!r} must be a DNS-1035 label (lowercase letters, digits and '-', starting with a letter): "
            "it names the job's headless Service",
        )
    longest = f"{name}-n{nodes - 1}"
    if len(longest) > MAX_HOSTNAME_LENGTH:
        raise InvalidSpecError(
            "metadata.name",
            f"too long: pod hostname {longest!r} exceeds {MAX_HOSTNAME_LENGTH} characters",
        )


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

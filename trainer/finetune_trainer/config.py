"""The trainer's configuration contract: typed, documented, loadable from JSON or YAML, importable without torch.

The operator renders this configuration from a FineTuneJob into the job's ConfigMap (``config.json``); a person
can write one by hand and run ``python -m finetune_trainer --config FILE``. Keys are camelCase, exactly as in the
FineTuneJob spec, so a job's fields and the trainer's settings read the same. Every setting has a default where
a sensible one exists; unknown keys, wrong types and out-of-range values are errors whose message names the
field (``training.learningRate: must be > 0, got -1``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

URI_PATTERN = re.compile(r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/\S*)?|file:///\S*)$")


class ConfigError(ValueError):
    """A configuration value is missing, mistyped or out of range; the message starts with the field path."""

    def __init__(self, field_path: str, problem: str) -> None:
        super().__init__(f"{field_path}: {problem}")
        self.field_path = field_path
        self.problem = problem


def _help(
    text: str,
    default: Any = dataclasses.MISSING,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    **kwargs: Any,
) -> Any:
    """A documented setting; its range is the FineTuneJob CRD's (the contract test compares the two)."""
    metadata = {"help": text, "minimum": minimum, "maximum": maximum, "exclusive_minimum": exclusive_minimum}
    if default is dataclasses.MISSING:
        return field(metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass(frozen=True)
class JobConfig:
    """Who this run belongs to (labels on metrics, Pushgateway grouping)."""

    name: str = _help("FineTuneJob name.", "local")
    namespace: str = _help("FineTuneJob namespace.", "default")
    attempt: int = _help("Attempt (gang incarnation) this run is part of.", 0)
    uid: str | None = _help("FineTuneJob uid: finds the job's tracking run when no checkpoint names it yet.", None)


@dataclass(frozen=True)
class ModelConfig:
    uri: str = _help("Base model folder in Hugging Face layout: s3://bucket/prefix or file:///path.")
    revision: str | None = _help("Free-form revision label, recorded in result.json.", None)
    sha256: str | None = _help("Expected SHA-256 of the weights file; a mismatch fails the download.", None)


@dataclass(frozen=True)
class DatasetConfig:
    uri: str = _help("A .jsonl/.json/.parquet file or a prefix of them.")
    format: Literal["text", "promptCompletion", "chat"] = _help("Row layout.", "chat")
    evalSplit: float | None = _help(
        "Fraction of rows held out for evaluation (0.1 when evalUri is absent).",
        None,
        minimum=0,
        maximum=0.5,
        exclusive_minimum=True,
    )
    evalUri: str | None = _help("Separate evaluation data.", None)
    textField: str = _help("Column of format 'text'.", "text")
    promptField: str = _help("Prompt column of format 'promptCompletion'.", "prompt")
    completionField: str = _help("Completion column of format 'promptCompletion'.", "completion")
    messagesField: str = _help("Messages column of format 'chat'.", "messages")
    maxMalformedRows: int = _help(
        "Malformed rows that may be skipped (counted, logged); 0 fails on the first.",
        0,
        minimum=0,
        maximum=1_000_000,
    )
    cache: str | None = _help(
        "Where prepared (tokenized) data is shared by nodes, later attempts and later jobs: s3://bucket/prefix or "
        "file:///path; each node's local.cacheDir keeps a copy either way.",
        None,
    )

    @property
    def effective_eval_split(self) -> float:
        if self.evalUri:
            return 0.0
        return 0.1 if self.evalSplit is None else self.evalSplit


@dataclass(frozen=True)
class OutputConfig:
    uri: str = _help("Prefix for checkpoints/, model/ and result.json.")
    export: Literal["adapter", "merged", "full"] | None = _help(
        "What model/ holds; default 'adapter' for LoRA and 'full' otherwise.", None
    )


@dataclass(frozen=True)
class LoraConfig:
    r: int = _help("Adapter rank.", 16, minimum=1, maximum=1024)
    alpha: int = _help("Scaling numerator (update scaled by alpha / r).", 32, minimum=1, maximum=4096)
    dropout: float = _help("Dropout on the adapter input.", 0.05, minimum=0, maximum=0.9)
    targetModules: list[str] = _help(
        "Modules to adapt; empty means the model type's attention projections.", default_factory=list
    )


@dataclass(frozen=True)
class EarlyStoppingConfig:
    patience: int = _help("Evaluations without improvement before stopping.", minimum=1, maximum=1000)
    metric: Literal["evalLoss"] = _help("Watched metric (lower is better).", "evalLoss")
    minDelta: float = _help("Smallest decrease that counts as an improvement.", 0.0, minimum=0)


@dataclass(frozen=True)
class TrainingConfig:
    method: Literal["full", "lora"] = _help("'full' or 'lora'.", "full")
    lora: LoraConfig | None = _help("LoRA settings (method 'lora' only).", None)
    learningRate: float = _help("Peak learning rate.", 2e-4, minimum=0, maximum=1, exclusive_minimum=True)
    weightDecay: float = _help("AdamW weight decay.", 0.0, minimum=0, maximum=1)
    epochs: float | None = _help(
        "Passes over the data; exactly one of epochs and maxSteps.",
        None,
        minimum=0,
        maximum=1000,
        exclusive_minimum=True,
    )
    maxSteps: int | None = _help(
        "Optimizer steps; exactly one of epochs and maxSteps.", None, minimum=1, maximum=100_000_000
    )
    batchSize: int = _help("Sequences per device per micro-step.", 1, minimum=1, maximum=4096)
    gradientAccumulationSteps: int = _help("Micro-steps per optimizer step.", 1, minimum=1, maximum=4096)
    maxSeqLength: int = _help("Truncation length in tokens.", 1024, minimum=8, maximum=65536)
    packing: bool = _help("Pack several examples per sequence.", False)
    warmupRatio: float = _help("Fraction of steps warming the learning rate up.", 0.0, minimum=0, maximum=0.5)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = _help(
        "LR schedule.", "cosine"
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _help(
        "'auto': bf16 on capable GPUs, fp32 on CPU.", "auto"
    )
    gradientCheckpointing: bool = _help("Recompute activations to save memory.", False)
    seed: int = _help("Seed for data order, dropout and new weights.", 42, minimum=0, maximum=4_294_967_295)
    evalEvery: int | None = _help(
        "Evaluate every N steps (and at the end).", None, minimum=1, maximum=100_000_000
    )
    logEvery: int = _help("Log metrics every N steps.", 10, minimum=1, maximum=1_000_000)
    earlyStopping: EarlyStoppingConfig | None = _help("Stop when eval loss stops improving.", None)

    @property
    def effective_lora(self) -> LoraConfig:
        return self.lora or LoraConfig()


@dataclass(frozen=True)
class DeepSpeedConfig:
    zeroStage: int = _help("ZeRO stage 0-3.", 2, minimum=0, maximum=3)
    offloadOptimizer: bool = _help("Optimizer states in CPU memory (stage >= 2).", False)
    offloadParams: bool = _help("Parameters in CPU memory (stage 3).", False)


@dataclass(frozen=True)
class CheckpointConfig:
    everySteps: int | None = _help("Checkpoint every N optimizer steps.", None, minimum=1, maximum=100_000_000)
    everyMinutes: float | None = _help(
        "Checkpoint when this many minutes passed (30 when neither is set).",
        None,
        minimum=0,
        maximum=10080,
        exclusive_minimum=True,
    )
    keep: int = _help("Newest complete checkpoints kept, plus the best.", 3, minimum=1, maximum=1000)
    gracePeriodSeconds: int = _help(
        "Budget after SIGTERM for the emergency checkpoint and its upload.", 120, minimum=10, maximum=3600
    )

    @property
    def effective_every_minutes(self) -> float | None:
        if self.everySteps is None and self.everyMinutes is None:
            return 30.0
        return self.everyMinutes


@dataclass(frozen=True)
class MetricsConfig:
    port: int = _help(
        "Metrics port of local rank 0; local rank N listens on port + N.", 9400, minimum=1024, maximum=65535
    )
    pushgateway: str | None = _help("Pushgateway URL rank 0 pushes to at each log and at exit.", None)


# At most this many evaluation prompts of at most this many characters (the CRD's bounds; promptsUri files too).
MAX_PROMPTS = 64
MAX_PROMPT_LENGTH = 4096


@dataclass(frozen=True)
class EvaluationConfig:
    prompts: list[str] = _help("Prompts answered at each evaluation and at the end.", default_factory=list)
    promptsUri: str | None = _help(
        "A JSON Lines (string or {\"prompt\": ...} per line) or text file (one per line) of prompts.", None
    )
    maxNewTokens: int = _help("Tokens generated per answer at most.", 64, minimum=1, maximum=2048)
    sampling: bool = _help("Sample with temperature/topP instead of greedy decoding.", False)
    temperature: float = _help(
        "Sampling temperature (sampling only).", 0.7, minimum=0, maximum=2, exclusive_minimum=True
    )
    topP: float = _help("Nucleus sampling mass (sampling only).", 1.0, minimum=0, maximum=1, exclusive_minimum=True)
    generationTimeoutSeconds: int = _help(
        "Wall time for all answers of one evaluation; a cut answer is marked truncated.", 120, minimum=1, maximum=3600
    )
    verifyExport: bool = _help(
        "Load the exported model back from storage in a fresh process and check it before succeeding.", True
    )


@dataclass(frozen=True)
class StorageConfig:
    endpoint: str | None = _help(
        "S3-compatible endpoint; default from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL.", None
    )
    region: str | None = _help("Region; default from AWS_REGION / AWS_DEFAULT_REGION.", None)
    forcePathStyle: bool = _help("Path-style addressing.", False)


@dataclass(frozen=True)
class MlflowConfig:
    trackingUri: str = _help("MLflow tracking server URL (http(s)://); credentials come from MLFLOW_TRACKING_*.")
    experiment: str = _help("Experiment of the run; created when absent.")
    runName: str | None = _help("The run's display name (default: the job's name).", None)
    registerModelAs: str | None = _help("Registered model that gets a version for the exported model.", None)


@dataclass(frozen=True)
class TrackingConfig:
    mlflow: MlflowConfig | None = _help("Log params, metrics and artifacts to MLflow from rank 0.", None)


@dataclass(frozen=True)
class LocalPathsConfig:
    cacheDir: str = _help("Node-local model and data cache (shared by the ranks of a pod).", "/scratch/cache")
    workDir: str = _help("Node-local folder for checkpoints before upload and the export.", "/scratch/work")
    preparedDataLimitGB: float = _help(
        "Prepared datasets kept in cacheDir/prepared; the least recently used go beyond this size.", 100.0,
        minimum=0, exclusive_minimum=True,
    )

    @property
    def result_summary_file(self) -> Path:
        """Where rank 0 leaves the final numbers for the launcher's termination message."""
        return Path(self.workDir) / "result-summary.json"


@dataclass(frozen=True)
class TrainerConfig:
    """Everything one run of the trainer needs; the gang's shape comes from torchrun's environment."""

    model: ModelConfig = _help("Base model.")
    dataset: DatasetConfig = _help("Training data.")
    output: OutputConfig = _help("Where results go.")
    training: TrainingConfig = _help("Optimisation recipe.", default_factory=TrainingConfig)
    deepspeed: DeepSpeedConfig = _help("DeepSpeed ZeRO settings.", default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = _help(
        "Checkpoint cadence and retention.", default_factory=CheckpointConfig
    )
    metrics: MetricsConfig = _help("Prometheus endpoint.", default_factory=MetricsConfig)
    evaluation: EvaluationConfig = _help(
        "Sample answers at each evaluation and the exported model's check.", default_factory=EvaluationConfig
    )
    storage: StorageConfig = _help(
        "Object storage access (credentials come from the default chain).", default_factory=StorageConfig
    )
    tracking: TrackingConfig = _help("Experiment tracking (rank 0 only).", default_factory=TrackingConfig)
    local: LocalPathsConfig = _help("Node-local paths.", default_factory=LocalPathsConfig)
    job: JobConfig = _help("Owning FineTuneJob.", default_factory=JobConfig)

    @property
    def export(self) -> str:
        if self.output.export:
            return self.output.export
        return "adapter" if self.training.method == "lora" else "full"

    def to_dict(self) -> dict[str, Any]:
        return typing.cast(dict[str, Any], _to_dict(self))

    def config_hash(self) -> str:
        """Hash of what must not change across a resume (the recipe, the data, the model)."""
        import hashlib

        recipe = {k: self.to_dict()[k] for k in ("model", "dataset", "training", "deepspeed")}
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


T = TypeVar("T")


def _to_dict(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _to_dict(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if getattr(value, f.name) is not None
        }
    if isinstance(value, list):
        return [_to_dict(v) for v in value]
    return value


def _describe(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(options[0], value, path)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(path, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"must be a list, got {_describe(value)}")
        (item_type,) = get_args(tp)
        return [_convert(item_type, item, f"{path}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _from_dict(typing.cast(type[Any], tp), value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"must be a boolean, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(path, f"must be an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"must be a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")


def _from_dict(cls: type[T], data: Any, path: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(path or "<root>", f"must be an object, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(_join(path, key), f"unknown field (known: {known})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        where = _join(path, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], where)
            _check_range(where, kwargs[name], f.metadata.get("minimum"), f.metadata.get("maximum"),
                         low_exclusive=f.metadata.get("exclusive_minimum", False))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(where, "required")
    return cls(**kwargs)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def uris_overlap(a: str, b: str) -> bool:
    """True when one URI is the other or a folder above it (``s3://b/x`` and ``s3://b/x/y``, not ``s3://b/xy``)."""
    pa, pb = a.rstrip("/"), b.rstrip("/")
    return pa == pb or pa.startswith(pb + "/") or pb.startswith(pa + "/")


def _check_range(
    path: str,
    value: float | None,
    low: float | None = None,
    high: float | None = None,
    *,
    low_exclusive: bool = False,
) -> None:
    if value is None:
        return
    if low is not None and (value <= low if low_exclusive else value < low):
        raise ConfigError(path, f"must be {'>' if low_exclusive else '>='} {low:g}, got {value:g}")
    if high is not None and value > high:
        raise ConfigError(path, f"must be <= {high:g}, got {value:g}")


def validate(config: TrainerConfig) -> TrainerConfig:
    """The checks types and ranges cannot express; returns ``config`` unchanged or raises ConfigError.

    These repeat the FineTuneJob CRD's patterns and CEL rules on purpose: a trainer run by hand
    (``--config FILE``) has no API server in front of it.
    """
    for where, uri in (
        ("model.uri", config.model.uri),
        ("dataset.uri", config.dataset.uri),
        ("dataset.evalUri", config.dataset.evalUri),
        ("output.uri", config.output.uri),
        ("dataset.cache", config.dataset.cache),
        ("evaluation.promptsUri", config.evaluation.promptsUri),
    ):
        if uri is not None and not URI_PATTERN.match(uri):
            raise ConfigError(where, f"must be s3://bucket/key or file:///absolute/path, got {uri!r}")
    if config.model.sha256 is not None and not re.fullmatch(r"[a-f0-9]{64}", config.model.sha256):
        raise ConfigError("model.sha256", "must be 64 lowercase hex digits")
    d = config.dataset
    for where, uri in (("dataset.uri", d.uri), ("dataset.evalUri", d.evalUri)):
        if d.cache and uri and uris_overlap(d.cache, uri):
            raise ConfigError("dataset.cache", f"{d.cache} overlaps {where} {uri}: prepared files would be data")
    if d.evalSplit is not None and d.evalUri is not None:
        raise ConfigError("dataset.evalSplit", "set either dataset.evalSplit or dataset.evalUri, not both")
    t = config.training
    if (t.epochs is None) == (t.maxSteps is None):
        raise ConfigError("training.epochs", "set exactly one of training.epochs and training.maxSteps")
    if t.lora is not None and t.method != "lora":
        raise ConfigError("training.lora", "only allowed with training.method 'lora'")
    if t.earlyStopping is not None and t.evalEvery is None:
        raise ConfigError("training.earlyStopping", "needs training.evalEvery")
    if config.output.export in ("adapter", "merged") and t.method != "lora":
        raise ConfigError("output.export", f"{config.output.export!r} needs training.method 'lora'")
    ds = config.deepspeed
    if ds.offloadOptimizer and ds.zeroStage < 2:
        raise ConfigError("deepspeed.offloadOptimizer", "needs zeroStage 2 or 3")
    if ds.offloadParams and ds.zeroStage != 3:
        raise ConfigError("deepspeed.offloadParams", "needs zeroStage 3")
    check_prompts(config.evaluation.prompts, "evaluation.prompts")
    if config.evaluation.prompts and config.evaluation.promptsUri is not None:
        raise ConfigError("evaluation.promptsUri", "set either evaluation.prompts or evaluation.promptsUri, not both")
    if config.metrics.pushgateway is not None and not re.match(r"^https?://\S+$", config.metrics.pushgateway):
        raise ConfigError("metrics.pushgateway", "must be an http(s) URL")
    if config.storage.endpoint is not None and not re.match(r"^https?://\S+$", config.storage.endpoint):
        raise ConfigError("storage.endpoint", "must be an http(s) URL")
    mlflow = config.tracking.mlflow
    if mlflow is not None and not re.match(r"^https?://[^\s/]+(/\S*)?$", mlflow.trackingUri):
        raise ConfigError("tracking.mlflow.trackingUri", "must be an http:// or https:// URL")
    if mlflow is not None and not mlflow.experiment:
        raise ConfigError("tracking.mlflow.experiment", "must not be empty")
    return config


def check_prompts(prompts: list[str], where: str) -> None:
    """The CRD's bounds on evaluation prompts: 1 to MAX_PROMPTS non-empty strings of at most MAX_PROMPT_LENGTH."""
    if len(prompts) > MAX_PROMPTS:
        raise ConfigError(where, f"has {len(prompts)} prompts, more than {MAX_PROMPTS}")
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise ConfigError(f"{where}[{i}]", "must be a non-empty string")
        if len(prompt) > MAX_PROMPT_LENGTH:
            raise ConfigError(f"{where}[{i}]", f"longer than {MAX_PROMPT_LENGTH} characters")


def config_from_dict(data: Any) -> TrainerConfig:
    """A validated TrainerConfig from plain data (parsed JSON or YAML)."""
    return validate(_from_dict(TrainerConfig, data, ""))


def load_config(path: str | Path) -> TrainerConfig:
    """A validated TrainerConfig from a .json, .yaml or .yml file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the config file: {exc.strerror}") from exc
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise ConfigError(where, f"not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}", f"not valid JSON: {exc.msg}") from exc
    return config_from_dict(data)


def describe_fields(cls: type[Any] = TrainerConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(path, default, help) for every setting, for ``--help-config`` and the docs."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = _join(prefix, f.name)
        tp = hints[f.name]
        inner = [a for a in get_args(tp) if dataclasses.is_dataclass(a)] or (
            [tp] if dataclasses.is_dataclass(tp) else []
        )
        if inner:
            rows.append((path, "", f.metadata.get("help", "")))
            rows += describe_fields(typing.cast(type[Any], inner[0]), path)
            continue
        if f.default is not dataclasses.MISSING:
            default = json.dumps(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = json.dumps(_to_dict(f.default_factory()))
        else:
            default = "(required)"
        rows.append((path, default, f.metadata.get("help", "")))
    return rows

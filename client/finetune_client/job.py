"""A typed builder of FineTuneJob manifests, one dataclass per CRD section, checked against the CRD before submit.

    job = FineTuneJob(
        "support-bot",
        model=Model("s3://models/tiny-gpt2"),
        dataset=Dataset("s3://datasets/support.jsonl", format="chat", eval_split=0.1),
        output=Output("s3://finetune-output/support-bot"),
        training=Training(max_steps=200, learning_rate=3e-3, method="lora", lora=Lora(r=8, alpha=16)),
    )
    client.create(job)

Field names are the CRD's in snake case (``learning_rate`` is ``spec.training.learningRate``); a field left None
is left out, so the CRD's default applies. Sections and fields the builder does not name go in ``extra_spec``
(e.g. ``{"tolerations": [...], "env": [...]}``). The CRD's descriptions are the documentation of each field:
``kubectl explain ftj.spec.training``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from finetune_client.schema import API_VERSION, KIND, validate_manifest


def camel_case(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


def section_dict(section: Any) -> dict[str, Any]:
    """A section as the CRD spells it: camelCase keys, None left out, nested sections converted."""
    result: dict[str, Any] = {}
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        if value is None:
            continue
        result[camel_case(item.name)] = section_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return result


@dataclass
class Model:
    uri: str
    revision: str | None = None
    sha256: str | None = None


@dataclass
class Dataset:
    uri: str
    format: str | None = None
    eval_split: float | None = None
    eval_uri: str | None = None
    text_field: str | None = None
    prompt_field: str | None = None
    completion_field: str | None = None
    messages_field: str | None = None
    max_malformed_rows: int | None = None
    cache: str | None = None


@dataclass
class Output:
    uri: str
    export: str | None = None


@dataclass
class Lora:
    r: int | None = None
    alpha: int | None = None
    dropout: float | None = None
    target_modules: list[str] | None = None


@dataclass
class EarlyStopping:
    patience: int
    metric: str | None = None
    min_delta: float | None = None


@dataclass
class Training:
    method: str | None = None
    lora: Lora | None = None
    learning_rate: float | None = None
    weight_decay: float | None = None
    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    gradient_accumulation_steps: int | None = None
    max_seq_length: int | None = None
    packing: bool | None = None
    warmup_ratio: float | None = None
    scheduler: str | None = None
    precision: str | None = None
    gradient_checkpointing: bool | None = None
    seed: int | None = None
    eval_every: int | None = None
    log_every: int | None = None
    early_stopping: EarlyStopping | None = None


@dataclass
class DeepSpeed:
    zero_stage: int | None = None
    offload_optimizer: bool | None = None
    offload_params: bool | None = None


@dataclass
class Distributed:
    nodes: int | None = None
    procs_per_node: int | None = None
    master_port: int | None = None
    deepspeed: DeepSpeed | None = None


@dataclass
class Checkpoint:
    every_steps: int | None = None
    every_minutes: float | None = None
    keep: int | None = None
    grace_period_seconds: int | None = None


@dataclass
class Metrics:
    port: int | None = None
    pushgateway: str | None = None


@dataclass
class Evaluation:
    """Prompts answered at every evaluation (``samples.jsonl``) and the export loaded back before success."""

    prompts: list[str] | None = None
    prompts_uri: str | None = None
    max_new_tokens: int | None = None
    sampling: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    generation_timeout_seconds: int | None = None
    verify_export: bool | None = None


@dataclass
class Gang:
    """A PodGroup for a gang scheduler: ``scheduler`` is "volcano" or "coscheduling"."""

    scheduler: str
    min_member: int | None = None
    schedule_timeout_seconds: int | None = None
    queue: str | None = None


@dataclass
class Topology:
    """Keep the gang inside one domain of a node label (rack, NVLink domain): one of the two."""

    required: str | None = None
    preferred: str | None = None


@dataclass
class Mlflow:
    """An MLflow run for the job; ``credentials_secret`` names a Secret with MLFLOW_TRACKING_* keys."""

    tracking_uri: str
    experiment: str
    run_name: str | None = None
    register_model_as: str | None = None
    credentials_secret: str | None = None


@dataclass
class Tracking:
    mlflow: Mlflow | None = None


@dataclass
class RestartBackoff:
    initial_seconds: int | None = None
    max_seconds: int | None = None


@dataclass
class Resources:
    gpus: int | None = None
    cpu: str | None = None
    memory: str | None = None
    ephemeral_storage: str | None = None
    shared_memory: str | None = None


@dataclass
class Storage:
    endpoint: str | None = None
    region: str | None = None
    force_path_style: bool | None = None
    credentials_secret: str | None = None


@dataclass
class FineTuneJob:
    """One FineTuneJob; ``to_manifest()`` is the object the API server receives."""

    name: str
    model: Model
    dataset: Dataset
    output: Output
    training: Training = field(default_factory=Training)
    distributed: Distributed | None = None
    checkpoint: Checkpoint | None = None
    resources: Resources | None = None
    storage: Storage | None = None
    metrics: Metrics | None = None
    evaluation: Evaluation | None = None
    tracking: Tracking | None = None
    gang: Gang | None = None
    topology: Topology | None = None
    restart_backoff: RestartBackoff | None = None
    suspend: bool | None = None
    backoff_limit: int | None = None
    queue_name: str | None = None
    workload_priority_class: str | None = None
    namespace: str | None = None
    labels: dict[str, str] | None = None
    extra_spec: dict[str, Any] = field(default_factory=dict)

    SECTIONS = ("model", "dataset", "output", "training", "distributed", "checkpoint", "resources", "storage",
                "metrics", "evaluation", "tracking", "gang", "topology", "restart_backoff", "suspend", "backoff_limit",
                "queue_name", "workload_priority_class")

    def to_manifest(self) -> dict[str, Any]:
        spec: dict[str, Any] = {}
        for name in self.SECTIONS:
            value = getattr(self, name)
            if value is not None:
                spec[camel_case(name)] = section_dict(value) if dataclasses.is_dataclass(value) else value
        spec.update(copy.deepcopy(self.extra_spec))
        metadata: dict[str, Any] = {"name": self.name}
        if self.namespace:
            metadata["namespace"] = self.namespace
        if self.labels:
            metadata["labels"] = dict(self.labels)
        return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}

    def validate(self) -> None:
        """Raise ``InvalidJob`` naming the first field the CRD's schema rejects."""
        validate_manifest(self.to_manifest())

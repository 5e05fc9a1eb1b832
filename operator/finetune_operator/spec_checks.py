"""The checks a FineTuneJob's schema cannot make, each raising InvalidSpecError that names its field."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

from finetune_operator import constants as c
from finetune_operator.spec_reader import InvalidSpecError

if TYPE_CHECKING:
    from finetune_operator.spec import JobSpec

# The checks beyond the CRD schema, one line each, kept beside the code that makes them.
CHECKS: Final = (
    "metadata.name is a DNS-1035 label (it names the headless Service) short enough for '<name>-n<rank>'",
    "spec.distributed: nodes x procsPerNode <= 1024 processes",
    "spec.training: batchSize x maxSeqLength <= 1048576 tokens per device micro-step",
    "spec.resources.*: valid Kubernetes quantities; cpu and memory > 0; sharedMemory <= memory",
    "spec.checkpoint.gracePeriodSeconds < spec.activeDeadlineSeconds",
    "spec.dataset.evalUri differs from spec.dataset.uri",
    "spec.output.uri does not overlap spec.model.uri, spec.dataset.uri or spec.dataset.evalUri",
    "spec.dataset.cache does not overlap spec.dataset.uri or spec.dataset.evalUri (prepared files would be data)",
    "spec.model.uri and spec.output.uri are not file:// when nodes > 1 (a local path is not shared by nodes)",
    "spec.metrics.port..port+procsPerNode-1 (one endpoint per local rank) does not include distributed.masterPort",
    "spec.retryableExitCodes does not contain 64, the trainer's permanent-error code",
    "spec.env: no reserved name, no duplicate name, not both value and valueFrom",
    "spec.env: no MLFLOW_TRACKING_* credential name when spec.tracking.mlflow.credentialsSecret provides them",
    "spec.tolerations[i]: operator Exists takes no value",
    "the CEL rules again (epochs xor maxSteps, lora only with method lora, export vs method, offload vs zeroStage,"
    " earlyStopping needs evalEvery, evalSplit xor evalUri, procsPerNode <= gpus, backoff initial <= max,"
    " workloadPriorityClass needs queueName, gang.minMember <= distributed.nodes, gang.queue only with volcano,"
    " topology names exactly one of required and preferred)",
)

MAX_WORLD_SIZE: Final = 1024
MAX_TOKENS_PER_MICRO_BATCH: Final = 1 << 20
MAX_HOSTNAME_LENGTH: Final = 63

_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _path_of(uri: str) -> str:
    return uri.rstrip("/")


def uris_overlap(a: str, b: str) -> bool:
    """True when one URI is the other or a folder above it (``s3://b/x`` and ``s3://b/x/y``, not ``s3://b/xy``)."""
    pa, pb = _path_of(a), _path_of(b)
    return pa == pb or pa.startswith(pb + "/") or pb.startswith(pa + "/")


def check_spec(spec: JobSpec) -> None:
    """The checks a schema cannot express, and the CEL rules again."""
    check_cel_rules(spec)
    check_sizes(spec)
    check_uris(spec)
    check_ports_and_codes(spec)
    check_tracking(spec)


def check_cel_rules(spec: JobSpec) -> None:
    """The CRD's CEL rules, repeated: an object stored before a rule existed (the API server ratchets unchanged
    fields) would otherwise reach the trainer, which says the same with exit code 64 after the gang has started."""
    t, d, ds = spec.training, spec.distributed, spec.dataset
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
    if spec.workload_priority_class is not None and spec.queue_name is None:
        raise InvalidSpecError("spec.workloadPriorityClass", "needs queueName: it orders the job in a Kueue queue")
    check_gang_rules(spec)


def check_gang_rules(spec: JobSpec) -> None:
    """spec.gang and spec.topology: the CEL rules again."""
    gang, topology, nodes = spec.gang, spec.topology, spec.distributed.nodes
    if gang is not None and gang.min_member is not None and gang.min_member > nodes:
        raise InvalidSpecError("spec.gang.minMember", f"{gang.min_member} exceeds distributed.nodes {nodes}: the "
                               "gang has no more pods than nodes")
    if gang is not None and gang.queue is not None and gang.scheduler != "volcano":
        raise InvalidSpecError("spec.gang.queue", "is a Volcano queue: only with gang.scheduler volcano")
    if topology is not None and (topology.required is None) == (topology.preferred is None):
        raise InvalidSpecError("spec.topology", "set exactly one of topology.required and topology.preferred")


def check_sizes(spec: JobSpec) -> None:
    """Limits across fields: the gang's size, one device's micro-batch, the deadline against the grace period."""
    t, d = spec.training, spec.distributed
    if d.world_size > MAX_WORLD_SIZE:
        raise InvalidSpecError(
            "spec.distributed",
            f"nodes x procsPerNode = {d.world_size} processes exceeds the supported {MAX_WORLD_SIZE}",
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


def check_uris(spec: JobSpec) -> None:
    """Inputs and output apart, and shared by every node."""
    ds, d = spec.dataset, spec.distributed
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
    for other_path, other in (("spec.dataset.uri", ds.uri), ("spec.dataset.evalUri", ds.eval_uri)):
        if ds.cache is not None and other is not None and uris_overlap(ds.cache, other):
            raise InvalidSpecError(
                "spec.dataset.cache",
                f"{ds.cache} overlaps {other_path} {other}: the prepared files would be read as training data",
            )
    if d.nodes > 1:
        for where, uri in (("spec.model.uri", spec.model.uri), ("spec.output.uri", spec.output.uri)):
            if uri.startswith("file://"):
                raise InvalidSpecError(
                    where,
                    f"{uri} is a node-local path but distributed.nodes is {d.nodes}: every node must see the same "
                    "files, use s3://",
                )


def check_ports_and_codes(spec: JobSpec) -> None:
    """Metrics ports clear of the rendezvous port; no retrying of the trainer's permanent-error code."""
    d = spec.distributed
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


def check_tracking(spec: JobSpec) -> None:
    """The credentials Secret's keys become pod env: the user's env may not set them a second time."""
    mlflow = spec.tracking.mlflow
    if mlflow is None or mlflow.credentials_secret is None:
        return
    for i, item in enumerate(spec.env):
        if item.get("name") in c.ENV_MLFLOW_CREDENTIALS:
            raise InvalidSpecError(
                f"spec.env[{i}].name",
                f"env {item['name']} comes from tracking.mlflow.credentialsSecret {mlflow.credentials_secret}",
            )


def check_name(name: str, nodes: int) -> None:
    """The job's name becomes a Service name (a DNS-1035 label) and the pods' hostnames ``<name>-n<rank>``.

    The CRD's CEL rules on metadata.name say the same at apply time; repeated for objects stored before them."""
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

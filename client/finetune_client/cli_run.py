"""``ftj run``: a job from a YAML file and/or flags, local model and data uploaded, applied, then the live view.

Order matters to the user: the manifest is built and checked against the CRD, then every row of a local data file
is checked, and only then is anything uploaded or created, so a bad input leaves nothing behind.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from finetune_client import datasets
from finetune_client.client import HISTORY_NAME, Client, parse_history
from finetune_client.errors import ClientError, InvalidJob
from finetune_client.job_view import Job
from finetune_client.live_view import LiveView
from finetune_client.schema import API_VERSION, KIND, validate_manifest
from finetune_client.storage import ObjectStorage, join_uri, split_s3_uri

# flag (argparse dest) -> the spec field it sets
FLAG_FIELDS: dict[str, tuple[str, ...]] = {
    "format": ("dataset", "format"),
    "eval_split": ("dataset", "evalSplit"),
    "export": ("output", "export"),
    "learning_rate": ("training", "learningRate"),
    "max_steps": ("training", "maxSteps"),
    "epochs": ("training", "epochs"),
    "batch_size": ("training", "batchSize"),
    "max_seq_length": ("training", "maxSeqLength"),
    "eval_every": ("training", "evalEvery"),
    "log_every": ("training", "logEvery"),
    "lora_r": ("training", "lora", "r"),
    "lora_alpha": ("training", "lora", "alpha"),
    "nodes": ("distributed", "nodes"),
    "procs_per_node": ("distributed", "procsPerNode"),
    "zero_stage": ("distributed", "deepspeed", "zeroStage"),
    "checkpoint_every": ("checkpoint", "everySteps"),
    "cpu": ("resources", "cpu"),
    "memory": ("resources", "memory"),
    "gpus": ("resources", "gpus"),
    "credentials_secret": ("storage", "credentialsSecret"),
    "s3_endpoint": ("storage", "endpoint"),
}
OUTPUT_PREFIX_ENV = "FTJ_OUTPUT_PREFIX"
EVENT_SECONDS = 3.0
# history.jsonl changes only with each checkpoint: a read every 20 s keeps the curve current at little cost.
HISTORY_SECONDS = 20.0


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="the job's name (default: the file's metadata.name)")
    parser.add_argument("-f", "--file", type=Path, help="a FineTuneJob YAML to start from; flags override it")
    parser.add_argument("--model", help="base model: an s3:// or file:// URI, or a local folder (uploaded)")
    parser.add_argument("--data", help="training data: an s3:// or file:// URI, or a local file (checked, uploaded)")
    parser.add_argument("--format", choices=datasets.FORMATS, help="dataset format (default chat)")
    parser.add_argument("--output-uri", help=f"where checkpoints and the model go (default ${OUTPUT_PREFIX_ENV}/NAME, "
                                             "or next to the file's output.uri)")
    parser.add_argument("--upload-to",
                        help="s3:// prefix for a local model and data (default <output bucket>/uploads/NAME)")
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter (training.method lora)")
    for flag, kind in (("--lora-r", int), ("--lora-alpha", int), ("--eval-split", float), ("--learning-rate", float),
                       ("--max-steps", int), ("--epochs", float), ("--batch-size", int), ("--max-seq-length", int),
                       ("--eval-every", int), ("--log-every", int), ("--nodes", int), ("--procs-per-node", int),
                       ("--zero-stage", int), ("--checkpoint-every", int), ("--gpus", int)):
        parser.add_argument(flag, type=kind, help=f"spec.{'.'.join(FLAG_FIELDS[flag[2:].replace('-', '_')])}")
    parser.add_argument("--export", choices=("adapter", "merged", "full"), help="spec.output.export")
    for flag in ("--cpu", "--memory", "--credentials-secret", "--s3-endpoint"):
        parser.add_argument(flag, help=f"spec.{'.'.join(FLAG_FIELDS[flag[2:].replace('-', '_')])}")
    parser.add_argument("--force-path-style", action="store_true", help="spec.storage.forcePathStyle: true")
    parser.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                        help="any spec field, e.g. --set training.warmupRatio=0.1 (VALUE is YAML)")
    parser.add_argument("--detach", action="store_true", help="apply and return without the live view")


def load_manifest_file(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise InvalidJob(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InvalidJob(f"{where}: not valid YAML: {problem}") from None
    if not isinstance(loaded, dict):
        raise InvalidJob(f"{path}: expected one FineTuneJob object, got {type(loaded).__name__}")
    return loaded


def _set(spec: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = spec
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value


def manifest_from_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The manifest: the file's (or an empty one), the flags set over it, the output URI defaulted."""
    empty = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {}, "spec": {}}
    base: dict[str, Any] = load_manifest_file(args.file) if args.file else empty
    manifest: dict[str, Any] = copy.deepcopy(base)
    metadata: dict[str, Any] = manifest.setdefault("metadata", {})
    spec: dict[str, Any] = manifest.setdefault("spec", {})
    if args.name:
        metadata["name"] = args.name
    name = metadata.get("name")
    if not name:
        raise InvalidJob("the job has no name: give NAME or metadata.name in the file")
    for dest, path in FLAG_FIELDS.items():
        value = getattr(args, dest)
        if value is not None:
            _set(spec, path, value)
    training = spec.setdefault("training", {})
    # Exactly one of the two is allowed: a flag for one replaces the file's other.
    if args.max_steps is not None:
        training.pop("epochs", None)
    if args.epochs is not None:
        training.pop("maxSteps", None)
    if args.lora or args.lora_r is not None or args.lora_alpha is not None:
        training["method"] = "lora"
    if args.force_path_style:
        _set(spec, ("storage", "forcePathStyle"), True)
    spec.setdefault("dataset", {}).setdefault("format", "chat")
    for assignment in args.set:
        path, sep, text = assignment.partition("=")
        if not sep or not path:
            raise InvalidJob(f"--set {assignment!r}: expected PATH=VALUE")
        _set(spec, tuple(path.removeprefix("spec.").split(".")), yaml.safe_load(text))
    output = spec.setdefault("output", {})
    if args.output_uri:
        output["uri"] = args.output_uri
    elif os.environ.get(OUTPUT_PREFIX_ENV):
        output["uri"] = join_uri(os.environ[OUTPUT_PREFIX_ENV], name)
    elif output.get("uri") and args.name and base.get("metadata", {}).get("name") != name:
        output["uri"] = join_uri(output["uri"].rstrip("/").rsplit("/", 1)[0], name)
    if args.model:
        spec.setdefault("model", {})["uri"] = args.model
    if args.data:
        spec["dataset"]["uri"] = args.data
    return manifest


def is_local(value: str | None) -> bool:
    return bool(value) and not str(value).startswith(("s3://", "file://"))


def upload_prefix(args: argparse.Namespace, manifest: dict[str, Any]) -> str:
    if args.upload_to:
        return str(args.upload_to)
    output = manifest["spec"].get("output", {}).get("uri")
    if not output or not output.startswith("s3://"):
        raise InvalidJob("local files need an s3:// place to go: give --upload-to or an s3:// --output-uri")
    bucket, _ = split_s3_uri(output)
    return f"s3://{bucket}/uploads/{manifest['metadata']['name']}"


def dataset_fields(dataset: dict[str, Any]) -> dict[str, str]:
    """The dataset section's field names, keyed as ``check_row`` names them."""
    names = {"text": "textField", "prompt": "promptField", "completion": "completionField", "messages": "messagesField"}
    return {key: str(dataset[field]) for key, field in names.items() if dataset.get(field)}


def prepare_and_apply(client: Client, args: argparse.Namespace, say: Any) -> Job:
    """Build and check the job, check the data, upload what is local, apply; ``say`` reports each step."""
    manifest = manifest_from_arguments(args)
    spec = manifest["spec"]
    name = manifest["metadata"]["name"]
    model = spec.get("model", {}).get("uri")
    data = spec.get("dataset", {}).get("uri")
    local_model = Path(model) if is_local(model) else None
    local_data = Path(data) if is_local(data) else None
    if local_model is not None or local_data is not None:
        prefix = upload_prefix(args, manifest)
        if local_model is not None:
            if not local_model.is_dir():
                raise InvalidJob(f"--model {local_model}: no such folder (expected a model folder or a URI)")
            spec["model"]["uri"] = join_uri(prefix, "model")
        if local_data is not None:
            spec["dataset"]["uri"] = join_uri(prefix, "data", local_data.name)
    validate_manifest(manifest)
    if local_data is not None:
        rows = datasets.check_file(local_data, spec["dataset"]["format"], dataset_fields(spec["dataset"]))
        say(f"checked {rows} rows of {local_data} ({spec['dataset']['format']})")
    client.list()  # the cluster answers before anything is uploaded
    storage = ObjectStorage.for_job(spec)
    if local_model is not None:
        count = storage.upload_folder(local_model, spec["model"]["uri"])
        say(f"uploaded {count} files of {local_model} to {spec['model']['uri']}")
    if local_data is not None:
        storage.upload_file(local_data, spec["dataset"]["uri"])
        say(f"uploaded {local_data} to {spec['dataset']['uri']}")
    job = client.apply(manifest)
    say(f"finetunejob.finetune.dev/{name} applied in namespace {client.namespace}")
    return job


def history_due(last_read: float | None, now: float, finished: bool, every: float = HISTORY_SECONDS) -> bool:
    """Whether the live view reads history.jsonl now: at once, then every ``every`` seconds and when it ends."""
    return last_read is None or finished or now - last_read >= every


class HistoryFeed:
    """The job's history.jsonl for the live view, read when ``history_due`` says; unreadable is not an error
    (the view then draws from the status alone)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.read_at: float | None = None
        self.read: bytes | None = None

    def poll(self, job: Job) -> list[dict[str, Any]] | None:
        """The entries when they were read now and changed, else None."""
        now = time.monotonic()
        if not history_due(self.read_at, now, job.finished):
            return None
        self.read_at = now
        try:
            data = self.client.storage_for(job).read(join_uri(job.output_uri, HISTORY_NAME))
        except ClientError:
            return None
        if data is None or data == self.read:
            return None
        self.read = data
        return parse_history(data)


def follow(client: Client, name: str, poll_seconds: float = 1.0) -> Job:
    """Draw the live view until the job finishes; Ctrl-C (KeyboardInterrupt) is the caller's to catch."""
    view = LiveView(sys.stdout, interactive=sys.stdout.isatty())
    history = HistoryFeed(client) if view.interactive else None
    event: dict[str, Any] | None = None
    events_read = 0.0
    while True:
        job = client.get(name)
        if time.monotonic() - events_read > EVENT_SECONDS or job.finished:
            events = client.events(name)
            event = events[-1] if events else None
            events_read = time.monotonic()
        entries = history.poll(job) if history is not None else None
        if entries is not None:
            view.series.seed(entries)
        view.update(job, event)
        if job.finished:
            return job
        time.sleep(poll_seconds)

"""The trainer's config.json rendered from a FineTuneJob (camelCase, exactly the trainer's contract; no secrets).

Rendering is a key map, not a second copy of the rules: each trainer section is a spec section whose fields keep
their CRD names, so a field added to both sides is rendered without touching this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final

from finetune_operator import constants as c
from finetune_operator.spec import FineTuneJob
from finetune_operator.spec_reader import camel_case

# Each section of the trainer's config and the spec section it comes from.
TRAINER_SECTIONS: Final = {
    "model": "model",
    "dataset": "dataset",
    "output": "output",
    "training": "training",
    "deepspeed": "distributed.deepspeed",
    "checkpoint": "checkpoint",
    "metrics": "metrics",
    "storage": "storage",
    "evaluation": "evaluation",
    "tracking": "tracking",
}
# Spec fields inside those sections that the trainer never takes, and why.
NOT_RENDERED: Final = {
    "storage.credentialsSecret": "pods read the keys through secretKeyRef; the trainer needs no Secret's name",
    "tracking.mlflow.credentialsSecret": "pods read the keys through secretKeyRef; the trainer needs no Secret's name",
}


def _section(value: Any, path: str) -> dict[str, Any]:
    """A spec dataclass as the trainer's camelCase object: absent (None) fields left out, tuples as lists."""
    rendered: dict[str, Any] = {}
    for f in dataclasses.fields(value):
        key = camel_case(f.name)
        item = getattr(value, f.name)
        if item is None or f"{path}.{key}" in NOT_RENDERED:
            continue
        if dataclasses.is_dataclass(item):
            item = _section(item, f"{path}.{key}")
        elif isinstance(item, tuple):
            item = list(item)
        rendered[key] = item
    return rendered


def render_trainer_config(job: FineTuneJob) -> dict[str, Any]:
    """The JSON document for the job's ConfigMap; credentials never appear here (pods get them by secretKeyRef)."""
    config: dict[str, Any] = {}
    for section, spec_path in TRAINER_SECTIONS.items():
        value: Any = job.spec
        for name in spec_path.split("."):
            value = getattr(value, name)
        config[section] = _section(value, spec_path)
    # The export is resolved here so the trainer and status.model.export can never disagree.
    config["output"]["export"] = job.spec.export
    config["local"] = {"cacheDir": c.CACHE_DIR, "workDir": c.WORK_DIR}
    config["job"] = {"name": job.name, "namespace": job.namespace, "attempt": job.attempt}
    if job.spec.tracking.mlflow is not None:
        # The tracking run is found again by the job's uid when no checkpoint names it yet.
        config["job"]["uid"] = job.meta.uid
    return config

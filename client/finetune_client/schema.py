"""The FineTuneJob CRD's schema, read from the CRD file shipped with the package, and local validation against it.

The package's ``crd/finetune.dev_finetunejobs.yaml`` is a symbolic link to the repository's
``crds/finetune.dev_finetunejobs.yaml``, so there is one CRD file; building a wheel stores the linked file's
content, so an installed client validates against the CRD of its own release. The OpenAPI schema is checked with
draft-4 semantics (what the API server's structural schemas use); the CEL rules (``x-kubernetes-validations``)
need a CEL evaluator and stay with the API server, which reports them at create time. Unknown fields are refused
(the client also creates with the API server's strict field validation), so a misspelt field is an error rather
than silently dropped.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import jsonschema
import yaml

from finetune_client.errors import InvalidJob

GROUP = "finetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
CRD_FILE = "finetune.dev_finetunejobs.yaml"
# Kubernetes object names (DNS-1123 subdomain); pods add "-a<attempt>-n<rank>" and the API server checks the rest.
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


@functools.cache
def crd() -> dict[str, Any]:
    """The CRD as shipped with this package."""
    text = resources.files("finetune_client").joinpath("crd", CRD_FILE).read_text(encoding="utf-8")
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


def spec_schema() -> dict[str, Any]:
    """The OpenAPI schema of ``spec``."""
    version = next(v for v in crd()["spec"]["versions"] if v["name"] == VERSION)
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown fields refused, as the API server's strict field validation refuses them (a
    structural schema alone would drop a misspelt field without a word)."""
    result = {key: value for key, value in schema.items() if key != "x-kubernetes-validations"}
    if "properties" in schema:
        result["properties"] = {name: strict(child) for name, child in schema["properties"].items()}
        result.setdefault("additionalProperties", False)
    if isinstance(schema.get("items"), dict):
        result["items"] = strict(schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        result["additionalProperties"] = strict(schema["additionalProperties"])
    return result


@functools.cache
def _validator() -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(strict(spec_schema()))


def _path(error: jsonschema.ValidationError) -> str:
    path = "spec"
    for part in error.absolute_path:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Raise ``InvalidJob`` naming the first field (the shallowest) that the CRD's schema rejects."""
    if manifest.get("apiVersion") != API_VERSION or manifest.get("kind") != KIND:
        raise InvalidJob(f"not a FineTuneJob: expected apiVersion {API_VERSION} and kind {KIND}, got "
                         f"{manifest.get('apiVersion')!r} and {manifest.get('kind')!r}")
    name = (manifest.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not jsonschema.Draft4Validator({"pattern": NAME_PATTERN}).is_valid(name):
        raise InvalidJob(f"metadata.name: {name!r} is not a valid name (lower-case letters, digits and '-')")
    spec = manifest.get("spec")
    if not isinstance(spec, dict):
        raise InvalidJob("spec: missing (a FineTuneJob needs model, dataset, output and training)")
    errors = sorted(_validator().iter_errors(spec),
                    key=lambda e: (len(e.absolute_path), _path(e)))
    if errors:
        first = errors[0]
        raise InvalidJob(f"{_path(first)}: {first.message}")

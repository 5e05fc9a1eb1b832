"""The FineTuneJob CRD's shape: names, printer columns, a structural, documented, draft-4 schema.

What it accepts and rejects is checked against the real API server (tests/integration/test_crd_api.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "finetune.dev_finetunejobs.yaml"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="module")
def schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


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
    default = [c["name"].upper() for c in columns if not c.get("priority")]
    assert default == ["PHASE", "PROGRESS", "LOSS", "ETA", "RESTARTS", "AGE"]
    # Only `kubectl get -o wide` shows the rest.
    assert [(c["name"].upper(), c["jsonPath"]) for c in columns if c.get("priority")] == [
        ("RUN", ".status.tracking.runId")
    ]


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


def test_every_cel_rule_explains_itself(schema: dict[str, Any]) -> None:
    # The real apiextensions server compiles them and checks their cost (test_crd_api.py).
    rules = [r for _, n in walk(schema) for r in n.get("x-kubernetes-validations", [])]
    assert len(rules) >= 15
    for rule in rules:
        assert rule.get("message") or rule.get("messageExpression")


def test_examples_cover_the_documented_set() -> None:
    assert {p.name for p in EXAMPLES} >= {"tiny-cpu.yaml", "lora-7b-2x8gpu.yaml", "kueue.yaml", "spot.yaml"}

"""The spec contract: every default, minimum, maximum and enum of the CRD holds in the operator and the trainer.

The CRD is the source. The operator's parsed spec keeps each default and range once (``spec_field``); the trainer's
config keeps them once more for runs by hand. This test walks the CRD's schema and, for each rule, feeds both sides
the default (absent), the bounds and the values just past them, and each enum value and a stranger; a copy changed
alone fails here. Arrays of objects (tolerations, affinity, env) are passed through to the pod API, which checks them.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import typing
from typing import Any

import pytest
import yaml
from operator_factories import DELETE, make_job, set_path

from finetune_operator.render import NOT_RENDERED, TRAINER_SECTIONS, render_trainer_config
from finetune_operator.spec import InvalidSpecError, JobSpec, parse_job
from finetune_operator.spec_reader import camel_case
from finetune_trainer.config import ConfigError, TrainerConfig, config_from_dict

ROOT = pathlib.Path(__file__).parents[2]
CRD = yaml.safe_load((ROOT / "crds" / "finetune.dev_finetunejobs.yaml").read_text())
SPEC_SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
RULES = ("default", "minimum", "maximum", "enum")

# A spec in which every optional section with rules is present, so each of their fields is read.
BASE = {
    "spec.training": {"method": "lora", "maxSteps": 10, "lora": {}, "evalEvery": 5, "earlyStopping": {"patience": 2}},
    "spec.gang": {"scheduler": "coscheduling"},
}
# Other fields a value at a bound needs to stay valid (the CEL rules and cross-field checks tie them).
COMPANIONS: dict[str, dict[str, Any]] = {
    "spec.training.method": {"spec.training.lora": DELETE},
    "spec.training.epochs": {"spec.training.maxSteps": DELETE},
    "spec.training.batchSize": {"spec.training.maxSeqLength": 8},
    "spec.restartBackoff.initialSeconds": {"spec.restartBackoff.maxSeconds": 86400},
    "spec.restartBackoff.maxSeconds": {"spec.restartBackoff.initialSeconds": 0},
    "spec.checkpoint.gracePeriodSeconds": {"spec.activeDeadlineSeconds": DELETE},
    "spec.gang.minMember": {"spec.distributed.nodes": 1024},
}
# Bounds no whole spec can sit on, and why.
UNREACHABLE = {
    ("spec.activeDeadlineSeconds", "minimum"): "it must exceed checkpoint.gracePeriodSeconds, itself at least 10",
}


def crd_rules(schema: dict[str, Any], path: str = "spec") -> list[tuple[str, dict[str, Any]]]:
    """(path, rules) for every scalar of the spec with a default, bound or enum; scalar list items as ``path[]``."""
    found = []
    if any(rule in schema for rule in RULES) and schema.get("type") in ("integer", "number", "string", "boolean"):
        found.append((path, {rule: schema[rule] for rule in (*RULES, "exclusiveMinimum", "type") if rule in schema}))
    for key, sub in (schema.get("properties") or {}).items():
        found += crd_rules(sub, f"{path}.{key}")
    items = schema.get("items") or {}
    if items.get("type") in ("integer", "number", "string"):
        found += crd_rules(items, f"{path}[]")
    return found


CRD_RULES = crd_rules(SPEC_SCHEMA)


def trainer_path(path: str) -> str | None:
    """Where the trainer's config holds a spec field (the operator's render map), or None if it takes none."""
    for section, spec_path in TRAINER_SECTIONS.items():
        prefix = f"spec.{spec_path}."
        if path.startswith(prefix):
            rest = path[len(prefix):]
            if f"{spec_path}.{rest}" not in NOT_RENDERED:
                return f"{section}.{rest}"
    return None


def operator_body(path: str, value: Any) -> dict[str, Any]:
    paths = {**BASE, **COMPANIONS.get(path, {})}
    body = make_job(paths)
    if path.endswith("[]"):
        set_path(body, path[:-2], [value])
    else:
        set_path(body, path, value)
    return body


def operator_value(spec: JobSpec, path: str) -> Any:
    value: Any = spec
    for key in path.split(".")[1:]:
        value = getattr(value, next(f.name for f in dataclasses.fields(value) if camel_case(f.name) == key))
    return value


def operator_verdict(path: str, value: Any) -> str | None:
    """None when the operator accepts ``value`` at ``path``, else the field path its error names."""
    try:
        parse_job(operator_body(path, value))
    except InvalidSpecError as exc:
        return exc.field_path
    return None


def trainer_document(path: str, where: str, value: Any, rules: dict[str, Any]) -> dict[str, Any]:
    """The config the operator renders for a valid spec around ``path``, with ``value`` at the trainer's
    ``where`` (DELETE leaves the setting out)."""
    valid = next(probe for _, probe, accepted in probes(rules) if accepted) if "default" not in rules else DELETE
    document = json.loads(json.dumps(render_trainer_config(parse_job(operator_body(path, valid)))))
    set_path(document, where, value)
    return document


def trainer_verdict(path: str, where: str, value: Any, rules: dict[str, Any]) -> str | None:
    """None when the trainer accepts ``value`` at ``where``, else the field path its error names."""
    try:
        config_from_dict(trainer_document(path, where, value, rules))
    except ConfigError as exc:
        return exc.field_path
    return None


def trainer_value(config: TrainerConfig, path: str) -> Any:
    value: Any = config
    for key in path.split("."):
        value = getattr(value, key)
    return value


def probes(rules: dict[str, Any]) -> list[tuple[str, Any, bool]]:
    """(what, value, accepted) around each bound and enum of one field."""
    result: list[tuple[str, Any, bool]] = []
    step = 1 if rules.get("type") == "integer" else 1e-6
    if "minimum" in rules:
        low = rules["minimum"]
        if rules.get("exclusiveMinimum"):
            result += [("minimum", low + step, True), ("minimum", low, False)]
        else:
            result += [("minimum", low, True), ("minimum", low - step, False)]
    if "maximum" in rules:
        result += [("maximum", rules["maximum"], True), ("maximum", rules["maximum"] + step, False)]
    for choice in rules.get("enum", []):
        result.append(("enum", choice, True))
    if "enum" in rules:
        result.append(("enum", "notAChoice", False))
    return result


def test_the_walk_finds_the_rules() -> None:
    paths = {path for path, _ in CRD_RULES}
    assert {"spec.training.maxSeqLength", "spec.checkpoint.gracePeriodSeconds", "spec.distributed.deepspeed.zeroStage",
            "spec.training.lora.r", "spec.retryableExitCodes[]"} <= paths
    assert len(CRD_RULES) > 50


@pytest.mark.parametrize(("path", "rules"), [p for p in CRD_RULES if "default" in p[1]], ids=lambda v: str(v))
def test_defaults_agree(path: str, rules: dict[str, Any]) -> None:
    spec = parse_job(operator_body(path, DELETE)).spec
    assert operator_value(spec, path) == rules["default"], f"operator default of {path}"
    where = trainer_path(path)
    if where is not None:
        config = config_from_dict(trainer_document(path, where, DELETE, rules))
        assert trainer_value(config, where) == rules["default"], f"trainer default of {where}"


@pytest.mark.parametrize(("path", "rules"), [p for p in CRD_RULES if set(p[1]) - {"default"}], ids=lambda v: str(v))
def test_bounds_and_enums_agree(path: str, rules: dict[str, Any]) -> None:
    named = path.replace("[]", "[0]")
    where = trainer_path(path)
    for what, value, accepted in probes(rules):
        if (path, what) in UNREACHABLE and accepted:
            continue
        expected = None if accepted else named
        assert operator_verdict(path, value) == expected, f"operator, {path} = {value!r} ({what})"
        if where is not None:
            expected = None if accepted else where
            assert trainer_verdict(path, where, value, rules) == expected, f"trainer, {where} = {value!r} ({what})"


def test_every_trainer_setting_of_a_rendered_section_is_a_spec_field() -> None:
    """A setting only the trainer knows would have no CRD rule to agree with."""
    schema_paths = set(all_paths(SPEC_SCHEMA))
    hints = typing.get_type_hints(TrainerConfig)
    for section, spec_path in TRAINER_SECTIONS.items():
        for name in setting_names(hints[section]):
            assert f"spec.{spec_path}.{name}" in schema_paths, f"trainer setting {section}.{name} has no CRD field"


def all_paths(schema: dict[str, Any], path: str = "spec") -> list[str]:
    found = [path]
    for key, sub in (schema.get("properties") or {}).items():
        found += all_paths(sub, f"{path}.{key}")
    return found


def setting_names(cls: Any, prefix: str = "") -> list[str]:
    """Every setting of a trainer config section, nested ones as ``lora.r``."""
    names = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        names.append(prefix + f.name)
        nested = [arg for arg in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(arg)]
        if nested:
            names += setting_names(nested[0], f"{prefix}{f.name}.")
    return names

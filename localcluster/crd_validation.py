"""Validates custom objects against a CRD version's schema the way kube-apiserver does.

Order, as in the real server: defaults from the schema are applied, unknown fields are found (rejected or
pruned), the OpenAPI v3 schema is checked (JSON Schema draft 4 semantics, so ``exclusiveMinimum: true`` is a
boolean), then every ``x-kubernetes-validations`` CEL rule is evaluated with cel-python. Rules that mention
``oldSelf`` are transition rules: they run only on updates, and only where the old object has a value at the
same path. Error messages follow the API server's ``<field>: <Type>: <detail>`` shape.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import celpy
import jsonschema
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

Json = Any


@dataclass(frozen=True)
class FieldError:
    """One rejected field, as in a Status ``details.causes`` entry."""

    field: str
    message: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _value_repr(value: Json) -> str:
    if isinstance(value, dict):
        return '"object"'
    if isinstance(value, list):
        return '"array"'
    return json.dumps(value)


def _strip_extensions(schema: Json) -> Json:
    """The schema as plain draft-4 JSON Schema: Kubernetes' x- keys dropped, int-or-string made explicit."""
    if isinstance(schema, list):
        return [_strip_extensions(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {
        key: _strip_extensions(value) for key, value in schema.items() if not key.startswith("x-kubernetes")
    }
    # Defaults are applied before validation, and 'format' values such as int64 are not draft-4 formats.
    out.pop("default", None)
    return out


class CRDValidator:
    """Defaulting, pruning and validation for one CRD version (its ``schema.openAPIV3Schema``)."""

    def __init__(self, schema: Json, kind: str = "", group: str = "") -> None:
        self.schema = schema
        self.kind = kind
        self.group = group
        self._validator = jsonschema.Draft4Validator(_strip_extensions(schema))
        self._env = celpy.Environment()
        self._programs: dict[str, Any] = {}

    @classmethod
    def from_crd(cls, crd: Json, version: str | None = None) -> CRDValidator:
        """The validator of ``version`` (default: the storage version) of a CustomResourceDefinition."""
        versions = crd["spec"]["versions"]
        chosen = next(
            (v for v in versions if (v["name"] == version if version else v.get("storage"))), versions[0]
        )
        return cls(chosen["schema"]["openAPIV3Schema"], crd["spec"]["names"]["kind"], crd["spec"]["group"])

    # --- defaulting and pruning -------------------------------------------------------------------

    def apply_defaults(self, obj: Json) -> Json:
        """A copy of ``obj`` with every schema default filled in where the field is absent."""
        result = copy.deepcopy(obj)
        _default(self.schema, result)
        return result

    def unknown_fields(self, obj: Json) -> list[str]:
        """Paths of fields the schema does not declare (the real server prunes or rejects them)."""
        return list(_unknown(self.schema, obj, ""))

    def prune(self, obj: Json) -> Json:
        """A copy of ``obj`` without the fields the schema does not declare."""
        result = copy.deepcopy(obj)
        _prune(self.schema, result)
        return result

    # --- validation -------------------------------------------------------------------------------

    def validate(
        self, obj: Json, old: Json | None = None, *, reject_unknown: bool = True
    ) -> list[FieldError]:
        """Every error in ``obj`` (already defaulted), or ``[]``; ``old`` enables transition rules."""
        errors: list[FieldError] = []
        if reject_unknown:
            errors += [
                FieldError(path, f'unknown field "{path}"', "FieldValueInvalid")
                for path in self.unknown_fields(obj)
            ]
        for error in sorted(self._validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
            errors.append(_schema_error(error))
        if errors:
            # The real server skips CEL rules when the schema already failed, since rules assume valid types.
            return errors
        errors += self._cel(self.schema, obj, old, "", has_old=old is not None)
        return errors

    def _program(self, source: str) -> Any:
        program = self._programs.get(source)
        if program is None:
            program = self._env.program(self._env.compile(source))
            self._programs[source] = program
        return program

    def _cel(self, schema: Json, value: Json, old: Json, path: str, *, has_old: bool) -> list[FieldError]:
        errors: list[FieldError] = []
        for rule in schema.get("x-kubernetes-validations", []):
            source = rule["rule"]
            is_transition = re.search(r"\boldSelf\b", source) is not None
            if is_transition and not has_old:
                continue
            activation = {"self": json_to_cel(value)}
            if is_transition:
                activation["oldSelf"] = json_to_cel(old)
            try:
                passed = self._program(source).evaluate(activation)
            except CELEvalError as exc:
                errors.append(
                    FieldError(
                        path or "<root>", f"Invalid value: rule evaluation failed: {exc}", "FieldValueInvalid"
                    )
                )
                continue
            if isinstance(passed, CELEvalError):
                errors.append(
                    FieldError(
                        path or "<root>",
                        f"Invalid value: rule evaluation failed: {passed}",
                        "FieldValueInvalid",
                    )
                )
                continue
            if bool(passed):
                continue
            field = path + rule.get("fieldPath", "") if rule.get("fieldPath") else path
            message = rule.get("message") or f"failed rule: {source}"
            if "messageExpression" in rule:
                try:
                    message = str(self._program(rule["messageExpression"]).evaluate(activation))
                except CELEvalError:
                    pass
            reason = rule.get("reason", "FieldValueInvalid")
            errors.append(
                FieldError(field or "<root>", f"Invalid value: {_value_repr(value)}: {message}", reason)
            )
        errors += self._cel_children(schema, value, old, path, has_old=has_old)
        return errors

    def _cel_children(
        self, schema: Json, value: Json, old: Json, path: str, *, has_old: bool
    ) -> list[FieldError]:
        errors: list[FieldError] = []
        if isinstance(value, dict):
            properties = schema.get("properties") or {}
            extra = schema.get("additionalProperties")
            for key, child in value.items():
                child_schema = properties.get(key) or (extra if isinstance(extra, dict) else None)
                if child_schema is None:
                    continue
                child_has_old = has_old and isinstance(old, dict) and key in old
                errors += self._cel(
                    child_schema,
                    child,
                    old[key] if child_has_old else None,
                    _join(path, key),
                    has_old=child_has_old,
                )
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            item_schema = schema["items"]
            keys = (
                schema.get("x-kubernetes-list-map-keys")
                if schema.get("x-kubernetes-list-type") == "map"
                else None
            )
            old_items: dict[tuple[Any, ...], Json] = {}
            if keys and has_old and isinstance(old, list):
                old_items = {tuple(item.get(k) for k in keys): item for item in old if isinstance(item, dict)}
            for index, item in enumerate(value):
                key = tuple(item.get(k) for k in keys) if keys and isinstance(item, dict) else None
                item_has_old = key is not None and key in old_items
                errors += self._cel(
                    item_schema,
                    item,
                    old_items.get(key) if key else None,
                    _join(path, index),
                    has_old=item_has_old,
                )
        return errors


def _default(schema: Json, value: Json) -> None:
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for key, child_schema in properties.items():
            if key not in value and "default" in child_schema:
                value[key] = copy.deepcopy(child_schema["default"])
        for key, child in value.items():
            child_schema = properties.get(key)
            if child_schema is None and isinstance(schema.get("additionalProperties"), dict):
                child_schema = schema["additionalProperties"]
            if child_schema is not None:
                _default(child_schema, child)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default(schema["items"], item)


def _known_fields(schema: Json, path: str) -> tuple[dict[str, Json], Json] | None:
    """(properties, additionalProperties) of an object node, or None where any field is allowed."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or path == "metadata":
        # ObjectMeta is checked by the server itself, never by the CRD's schema.
        return None
    return schema.get("properties") or {}, schema.get("additionalProperties")


def _unknown(schema: Json, value: Json, path: str) -> Iterator[str]:
    if isinstance(value, dict):
        known = _known_fields(schema, path)
        if known is None:
            return
        properties, extra = known
        for key, child in value.items():
            if key in properties:
                yield from _unknown(properties[key], child, _join(path, key))
            elif isinstance(extra, dict):
                yield from _unknown(extra, child, _join(path, key))
            elif extra is not True:
                yield _join(path, key)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            yield from _unknown(schema["items"], item, _join(path, index))


def _prune(schema: Json, value: Json, path: str = "") -> None:
    if isinstance(value, dict):
        known = _known_fields(schema, path)
        if known is None:
            return
        properties, extra = known
        for key in list(value):
            if key in properties:
                _prune(properties[key], value[key], _join(path, key))
            elif isinstance(extra, dict):
                _prune(extra, value[key], _join(path, key))
            elif extra is not True:
                del value[key]
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            _prune(schema["items"], item, _join(path, index))


def _schema_error(error: jsonschema.ValidationError) -> FieldError:
    field = ""
    for part in error.absolute_path:
        field = _join(field, part)
    value = error.instance
    validator = error.validator
    if validator == "required":
        missing = re.search(r"'([^']+)' is a required property", error.message)
        name = missing.group(1) if missing else "?"
        return FieldError(_join(field, name), "Required value", "FieldValueRequired")
    where = field or "<root>"
    if validator == "enum":
        supported = ", ".join(json.dumps(v) for v in error.validator_value)
        return FieldError(
            where,
            f"Unsupported value: {json.dumps(value)}: supported values: {supported}",
            "FieldValueNotSupported",
        )
    if validator == "type":
        detail = f"{where} in body must be of type {error.validator_value}: {_value_repr(value)}"
        return FieldError(where, f"Invalid value: {_value_repr(value)}: {detail}", "FieldValueTypeInvalid")
    if validator in ("minimum", "maximum"):
        exclusive = error.schema.get(
            "exclusiveMinimum" if validator == "minimum" else "exclusiveMaximum", False
        )
        relation = ("greater than" if validator == "minimum" else "less than") + (
            "" if exclusive else " or equal to"
        )
        detail = f"{where} in body should be {relation} {error.validator_value}"
        return FieldError(where, f"Invalid value: {_value_repr(value)}: {detail}", "FieldValueInvalid")
    if validator == "pattern":
        detail = f"{where} in body should match '{error.validator_value}'"
        return FieldError(where, f"Invalid value: {_value_repr(value)}: {detail}", "FieldValueInvalid")
    if validator in ("maxLength", "minLength", "maxItems", "minItems"):
        unit = "characters" if "Length" in validator else "items"
        bound = "at most" if validator.startswith("max") else "at least"
        return FieldError(
            where,
            f"Too {'long' if validator.startswith('max') else 'short'}: "
            f"may have {bound} {error.validator_value} {unit}",
            "FieldValueInvalid",
        )
    if validator == "anyOf":
        detail = f"{where} in body must be of type integer or string: {_value_repr(value)}"
        return FieldError(where, f"Invalid value: {_value_repr(value)}: {detail}", "FieldValueTypeInvalid")
    return FieldError(where, f"Invalid value: {_value_repr(value)}: {error.message}", "FieldValueInvalid")


def format_invalid(kind: str, group: str, name: str, errors: list[FieldError]) -> str:
    """The API server's one-line message for a rejected object."""
    details = ", ".join(str(e) for e in errors)
    if len(errors) > 1:
        details = f"[{details}]"
    return f'{kind}.{group} "{name}" is invalid: {details}'

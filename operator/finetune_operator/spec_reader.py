"""Reading a FineTuneJob's spec from plain data: typed access whose every error names the field path.

Each scalar field of the spec's dataclasses carries its CRD rule (``spec_field``: default, minimum, maximum, enum,
length, pattern) beside its one default, and ``read_fields`` reads a whole section by those rules. The rules are
the CRD's, copied once; ``tests/unit/test_spec_contract.py`` walks the CRD and fails when a copy drifts.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Final, TypeVar

T = TypeVar("T")

URI: Final = re.compile(r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/\S*)?|file:///\S*)$")
HTTP_URL: Final = re.compile(r"^https?://[^\s/]+(/\S*)?$")
SHA256: Final = re.compile(r"^[a-f0-9]{64}$")
# Kubernetes object names: a LocalQueue's (DNS-1123 label), a cluster-scoped class's (DNS-1123 subdomain).
DNS_LABEL: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN: Final = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# A node label key (an optional DNS-subdomain prefix and '/', then a name), as topology levels are named.
LABEL_KEY: Final = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_PATTERN_NAMES: Final = {
    URI.pattern: "s3://bucket/key or file:///absolute/path",
    HTTP_URL.pattern: "an http:// or https:// URL",
    DNS_LABEL.pattern: "a DNS label (lowercase letters, digits and '-')",
    DNS_SUBDOMAIN.pattern: "a DNS subdomain (lowercase letters, digits, '-' and '.')",
    LABEL_KEY.pattern: "a node label key such as topology.kubernetes.io/zone",
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
_RULE: Final = "crd"


class InvalidSpecError(ValueError):
    """The job's spec cannot run; ``str()`` starts with the field path (``spec.training.maxSeqLength: ...``)."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}")
        self.field_path = field_path
        self.message = message


@dataclass(frozen=True)
class FieldRule:
    """One scalar field's rule in the CRD's openAPIV3Schema terms."""

    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    enum: tuple[str, ...] | None = None
    max_length: int | None = None
    pattern: re.Pattern[str] | None = None
    min_length: int | None = None


def spec_field(default: Any = dataclasses.MISSING, **rule: Any) -> Any:
    """A dataclass field read from the spec under its camelCase name, with its one default and its CRD rule."""
    metadata = {_RULE: FieldRule(**rule)}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_rule(f: dataclasses.Field[Any]) -> FieldRule | None:
    """The CRD rule of a field made by ``spec_field``; None for fields the caller parses itself."""
    rule = f.metadata.get(_RULE)
    return rule if isinstance(rule, FieldRule) else None


def camel_case(name: str) -> str:
    """The spec's key of a dataclass field: ``procs_per_node`` → ``procsPerNode``."""
    first, *rest = name.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


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


def kind_of(value: Any) -> str:
    """How an error names a value's JSON type: ``an object``, ``a list``, ``a string``..."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}
    return names.get(type(value), "a number" if isinstance(value, float) else type(value).__name__)


class Reader:
    """Typed access to one object of the spec; every error names ``path.key``."""

    def __init__(self, data: Any, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise InvalidSpecError(path, f"must be an object, got {kind_of(data)}")
        self.data: Mapping[str, Any] = data
        self.path = path

    def at(self, key: str) -> str:
        return f"{self.path}.{key}"

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def obj(self, key: str) -> Reader:
        return Reader(self.data.get(key), self.at(key))

    def optional_obj(self, key: str) -> Reader | None:
        return self.obj(key) if self.has(key) else None

    def text_or_none(self, key: str, *, pattern: re.Pattern[str] | None = None, max_length: int | None = None,
                    choices: tuple[str, ...] | None = None, min_length: int | None = None) -> str | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise InvalidSpecError(self.at(key), f"must be a string, got {kind_of(value)}")
        if choices is not None and value not in choices:
            raise InvalidSpecError(self.at(key), f"{value!r} is not one of {', '.join(choices)}")
        if max_length is not None and len(value) > max_length:
            raise InvalidSpecError(self.at(key), f"longer than {max_length} characters")
        if min_length is not None and len(value) < min_length:
            raise InvalidSpecError(self.at(key), "must not be empty" if min_length == 1 else
                                   f"shorter than {min_length} characters")
        if pattern is not None and not pattern.match(value):
            expected = _PATTERN_NAMES.get(pattern.pattern, f"match {pattern.pattern}")
            raise InvalidSpecError(self.at(key), f"{value!r} must be {expected}")
        return value

    def integer_or_none(self, key: str, low: float | None = None, high: float | None = None) -> int | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidSpecError(self.at(key), f"must be an integer, got {kind_of(value)}")
        self._check_range(key, value, low, high)
        return value

    def number_or_none(self, key: str, low: float | None = None, high: float | None = None,
                    *, low_exclusive: bool = False) -> float | None:
        value = self.data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidSpecError(self.at(key), f"must be a number, got {kind_of(value)}")
        if low is not None and low_exclusive and value <= low:
            raise InvalidSpecError(self.at(key), f"must be > {low:g}, got {value:g}")
        self._check_range(key, value, low, high)
        return float(value)

    def flag_or_none(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise InvalidSpecError(self.at(key), f"must be a boolean, got {kind_of(value)}")
        return value

    def items(self, key: str, max_items: int | None = None) -> list[Any]:
        value = self.data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise InvalidSpecError(self.at(key), f"must be a list, got {kind_of(value)}")
        if max_items is not None and len(value) > max_items:
            raise InvalidSpecError(self.at(key), f"has {len(value)} items, more than {max_items}")
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        value = self.data.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise InvalidSpecError(self.at(key), f"must be an object, got {kind_of(value)}")
        return dict(value)

    def by_rule(self, key: str, kind: type, rule: FieldRule) -> Any:
        """The value under ``key`` checked against ``rule``; None when absent."""
        if kind is bool:
            return self.flag_or_none(key)
        if kind is int:
            return self.integer_or_none(key, rule.minimum, rule.maximum)
        if kind is float:
            return self.number_or_none(key, rule.minimum, rule.maximum, low_exclusive=rule.exclusive_minimum)
        if kind is str:
            return self.text_or_none(key, pattern=rule.pattern, max_length=rule.max_length, choices=rule.enum,
                                     min_length=rule.min_length)
        raise TypeError(f"{self.at(key)}: no reader for {kind!r}")

    def _check_range(self, key: str, value: float, low: float | None, high: float | None) -> None:
        if low is not None and value < low:
            raise InvalidSpecError(self.at(key), f"must be >= {low:g}, got {value:g}")
        if high is not None and value > high:
            raise InvalidSpecError(self.at(key), f"must be <= {high:g}, got {value:g}")


def _scalar_type(hint: Any) -> type:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (kind,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return typing.cast(type, kind)
    return typing.cast(type, hint)


# Each spec class's resolved annotations: get_type_hints compiles every string annotation anew, which on every
# reconcile of every job was most of the operator's allocations (memray).
_TYPE_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    hints = _TYPE_HINTS.get(cls)
    if hints is None:
        hints = _TYPE_HINTS[cls] = typing.get_type_hints(cls)
    return hints


def read_fields(cls: type[T], reader: Reader, **parsed: Any) -> T:
    """``cls`` with every ``spec_field`` read from ``reader`` by its rule, absent ones left at their default;
    ``parsed`` holds the fields the caller read itself (sections, lists, quantities)."""
    hints = _type_hints(cls)
    values = dict(parsed)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        rule = field_rule(f)
        if rule is None or f.name in values:
            continue
        key = camel_case(f.name)
        value = reader.by_rule(key, _scalar_type(hints[f.name]), rule)
        if value is not None:
            values[f.name] = value
        elif f.default is dataclasses.MISSING:
            raise InvalidSpecError(reader.at(key), "required")
    return cls(**values)

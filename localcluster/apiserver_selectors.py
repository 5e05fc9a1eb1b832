"""Label and field selectors of the Kubernetes list/watch API, parsed once and matched against plain dicts."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Obj = Mapping[str, Any]


class SelectorError(ValueError):
    """A selector string the real API server would answer with 400 BadRequest."""


@dataclass(frozen=True)
class _Requirement:
    key: str
    operator: str  # "=", "!=", "in", "notin", "exists", "!exists", "gt", "lt"
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        match self.operator:
            case "=" | "in":
                return present and value in self.values
            case "!=" | "notin":
                return not present or value not in self.values
            case "exists":
                return present
            case "!exists":
                return not present
            case "gt" | "lt":
                if not present or value is None:
                    return False
                try:
                    number = int(value)
                except ValueError:
                    return False
                (bound,) = self.values
                return number > int(bound) if self.operator == "gt" else number < int(bound)
        raise AssertionError(self.operator)


_LABEL_TOKEN = re.compile(
    r"\s*(?:(?P<op>==|!=|=|>|<|\(|\)|,|!)|(?P<word>[A-Za-z0-9_./-]+))"
)


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    position = 0
    text = text.rstrip()
    while position < len(text):
        match = _LABEL_TOKEN.match(text, position)
        if match is None:
            raise SelectorError(f"unable to parse requirement: invalid character in {text!r}")
        tokens.append(match.group("op") or match.group("word"))
        position = match.end()
    return tokens


class LabelSelector:
    """A parsed `labelSelector` (=, ==, !=, in, notin, exists, !exists, >, <)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.requirements = self._parse(_tokenize(text))

    @staticmethod
    def _parse(tokens: list[str]) -> list[_Requirement]:
        requirements: list[_Requirement] = []
        index = 0

        def take() -> str:
            nonlocal index
            if index >= len(tokens):
                raise SelectorError("unable to parse requirement: unexpected end of selector")
            index += 1
            return tokens[index - 1]

        while index < len(tokens):
            token = take()
            if token == "!":
                requirements.append(_Requirement(take(), "!exists", frozenset()))
            else:
                key = token
                if index >= len(tokens) or tokens[index] == ",":
                    requirements.append(_Requirement(key, "exists", frozenset()))
                else:
                    operator = take()
                    if operator in ("=", "=="):
                        value = "" if index >= len(tokens) or tokens[index] == "," else take()
                        requirements.append(_Requirement(key, "=", frozenset({value})))
                    elif operator == "!=":
                        value = "" if index >= len(tokens) or tokens[index] == "," else take()
                        requirements.append(_Requirement(key, "!=", frozenset({value})))
                    elif operator in (">", "<"):
                        value = take()
                        if not value.lstrip("-").isdigit():
                            raise SelectorError(f"for 'Gt', 'Lt' operators, the value must be an integer: {value}")
                        requirements.append(_Requirement(key, "gt" if operator == ">" else "lt", frozenset({value})))
                    elif operator in ("in", "notin"):
                        if take() != "(":
                            raise SelectorError(f"found '{tokens[index - 1]}', expected: '('")
                        values: set[str] = set()
                        while True:
                            item = take()
                            if item == ")":
                                break
                            if item == ",":
                                continue
                            values.add(item)
                        requirements.append(_Requirement(key, operator, frozenset(values)))
                    else:
                        raise SelectorError(f"found '{operator}', expected: in, notin, =, ==, !=, gt, lt")
            if index < len(tokens):
                if tokens[index] != ",":
                    raise SelectorError(f"found '{tokens[index]}', expected: ','")
                index += 1
        return requirements

    def matches(self, obj: Obj) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(requirement.matches(labels) for requirement in self.requirements)


def _split_unescaped(text: str, separator: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def field_value(obj: Obj, path: str) -> str:
    """The string form of a dotted field path, as the API server compares it ("" when absent)."""
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return ""
        value = value.get(part)
        if value is None:
            return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


class FieldSelector:
    """A parsed `fieldSelector`: dotted paths (metadata.name, spec.nodeName, involvedObject.uid, ...)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.terms: list[tuple[str, bool, str]] = []  # (path, equal, value)
        for term in _split_unescaped(text, ","):
            term = term.strip()
            if not term:
                continue
            for operator, equal in (("!=", False), ("==", True), ("=", True)):
                if operator in term:
                    path, value = term.split(operator, 1)
                    self.terms.append((path.strip(), equal, value.strip()))
                    break
            else:
                raise SelectorError(f"invalid selector: '{text}'; can't understand '{term}'")

    def matches(self, obj: Obj) -> bool:
        return all((field_value(obj, path) == value) == equal for path, equal, value in self.terms)

    def required_name(self) -> str | None:
        """metadata.name=X narrows a list to one object: lets the store skip the scan."""
        for path, equal, value in self.terms:
            if path == "metadata.name" and equal:
                return value
        return None


def build_filter(label_selector: str | None, field_selector: str | None) -> Callable[[Obj], bool] | None:
    """One predicate for both selectors, or None when nothing is selected (the fast path)."""
    labels = LabelSelector(label_selector) if label_selector else None
    fields = FieldSelector(field_selector) if field_selector else None
    if labels is not None and not labels.requirements:
        labels = None
    if fields is not None and not fields.terms:
        fields = None
    if labels is None and fields is None:
        return None
    if fields is None:
        assert labels is not None
        return labels.matches
    if labels is None:
        return fields.matches
    label_matches, field_matches = labels.matches, fields.matches
    return lambda obj: label_matches(obj) and field_matches(obj)

"""Rows of training data as files hold them, and the checks of each format's fields; no torch, no tokenizer.

The trainer reads and checks rows with these; the client checks a dataset with the same functions before it uploads
one, so a malformed row is named (``<file>:<line>: <problem>``) on the user's machine rather than in a pod.
Locations: ``<file>:<line>`` (1-based) for JSON lines, the line of the row's first character for a JSON array,
``<file>:row <n>`` for Parquet.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

CHAT_ROLES = ("system", "user", "assistant")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """The training data cannot be used; the message names the file and line and what is wrong."""


class MalformedRow(Exception):
    """One row is unusable; the message says why (without the location)."""


def describe(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def read_rows(
    path: Path,
    name: str,
    columns: Sequence[str],
    *,
    start: int = 0,
    end: int | None = None,
    first_line: int = 1,
    row_group: int | None = None,
) -> Iterator[tuple[str, Any, str | None]]:
    """``(location, row, problem)`` for each row; ``problem`` is set when the row could not even be parsed.

    A part of the file only: JSON lines from byte ``start`` (a line start, numbered ``first_line``) to ``end``, or
    Parquet row group ``row_group`` whose first row is row ``first_line``.
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_rows(path, name, columns, row_group, first_line)
    elif suffix in (".jsonl", ".json"):
        with path.open("rb") as handle:
            first = handle.read(64).lstrip()
        if suffix == ".json" and first.startswith(b"["):
            yield from _json_array_rows(path, name)
        else:
            yield from _json_lines_rows(path, name, start, end, first_line)
    else:
        raise DataError(f"{name}: unsupported file type {suffix or '(none)'} (expected .jsonl, .json or .parquet)")


def _json_lines_rows(
    path: Path, name: str, start: int = 0, end: int | None = None, first_line: int = 1
) -> Iterator[tuple[str, Any, str | None]]:
    with path.open("rb") as handle:
        handle.seek(start)
        position = start
        for number, raw in enumerate(handle, start=first_line):
            if end is not None and position >= end:
                return
            position += len(raw)
            if not raw.strip():
                continue
            location = f"{name}:{number}"
            try:
                text = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                yield location, None, f"not valid UTF-8 (byte {exc.start + 1})"
                continue
            try:
                yield location, json.loads(text), None
            except json.JSONDecodeError as exc:
                yield location, None, f"not valid JSON: {exc.msg} (column {exc.colno})"


def _json_array_rows(path: Path, name: str) -> Iterator[tuple[str, Any, str | None]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not valid UTF-8 (byte {exc.start + 1})") from None
    decoder = json.JSONDecoder()
    position = text.index("[") + 1

    def skip_space(at: int) -> int:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        return at

    def line_of(at: int) -> int:
        return text.count("\n", 0, at) + 1

    position = skip_space(position)
    if position < len(text) and text[position] == "]":
        return
    while True:
        try:
            row, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            # The rest of an array cannot be parsed past an error, so this is never skippable.
            raise DataError(f"{name}:{exc.lineno}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        yield f"{name}:{line_of(position)}", row, None
        position = skip_space(end)
        if position < len(text) and text[position] == ",":
            position = skip_space(position + 1)
            continue
        if position < len(text) and text[position] == "]":
            return
        raise DataError(f"{name}:{line_of(position)}: not valid JSON: expected ',' or ']' after a row")


def _open_parquet(path: Path, name: str, columns: Sequence[str]) -> Any:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{name}: not a readable Parquet file: {exc}") from None
    present = set(parquet.schema_arrow.names)
    missing = [c for c in columns if c not in present]
    if missing:
        raise DataError(
            f"{name}: no column {', '.join(map(repr, missing))} (columns: {', '.join(sorted(present)) or 'none'})"
        )
    return parquet


def parquet_row_groups(path: Path, name: str, columns: Sequence[str]) -> list[tuple[int, int, int]]:
    """``(index, rows, bytes)`` of each row group of a Parquet file that has ``columns``."""
    metadata = _open_parquet(path, name, columns).metadata
    groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
    return [(i, group.num_rows, group.total_byte_size) for i, group in enumerate(groups)]


def _parquet_rows(
    path: Path, name: str, columns: Sequence[str], row_group: int | None, first_row: int
) -> Iterator[tuple[str, Any, str | None]]:
    parquet = _open_parquet(path, name, columns)
    groups = None if row_group is None else [row_group]
    number = first_row - 1
    for batch in parquet.iter_batches(columns=list(columns), batch_size=1024, row_groups=groups):
        for row in batch.to_pylist():
            number += 1
            yield f"{name}:row {number}", row, None


def string_field(row: dict[str, Any], name: str, *, allow_empty: bool) -> str:
    if name not in row:
        raise MalformedRow(f"missing field {name!r}")
    value = row[name]
    if not isinstance(value, str):
        raise MalformedRow(f"field {name!r} must be a string, got {describe(value)}")
    if not allow_empty and not value.strip():
        raise MalformedRow(f"field {name!r} is empty")
    return value


def chat_messages(row: dict[str, Any], name: str) -> list[dict[str, str]]:
    if name not in row:
        raise MalformedRow(f"missing field {name!r}")
    messages = row[name]
    if not isinstance(messages, list):
        raise MalformedRow(f"field {name!r} must be a list of messages, got {describe(messages)}")
    if not messages:
        raise MalformedRow(f"field {name!r} is empty")
    clean = []
    for i, message in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise MalformedRow(f"{where} must be an object with 'role' and 'content', got {describe(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise MalformedRow(f"{where}: missing field {key!r}")
            if not isinstance(message[key], str):
                raise MalformedRow(f"{where}: field {key!r} must be a string, got {describe(message[key])}")
        if message["role"] not in CHAT_ROLES:
            raise MalformedRow(f"{where}: unknown role {message['role']!r} (expected system, user or assistant)")
        clean.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in clean):
        raise MalformedRow(f"no assistant turn in {name!r} (nothing to train on)")
    return clean


def check_row(row: Any, data_format: str, fields: dict[str, str] | None = None) -> None:
    """Raise ``MalformedRow`` saying what is wrong with a row of ``data_format`` (text, promptCompletion, chat).

    ``fields`` maps ``text``, ``prompt``, ``completion`` and ``messages`` to the dataset's field names when they
    are not those."""
    names = {"text": "text", "prompt": "prompt", "completion": "completion", "messages": "messages", **(fields or {})}
    if not isinstance(row, dict):
        raise MalformedRow(f"expected a JSON object, got {describe(row)}")
    if data_format == "text":
        string_field(row, names["text"], allow_empty=False)
    elif data_format == "promptCompletion":
        string_field(row, names["prompt"], allow_empty=True)
        string_field(row, names["completion"], allow_empty=False)
    elif data_format == "chat":
        chat_messages(row, names["messages"])
    else:
        raise ValueError(f"unknown dataset format {data_format!r} (expected text, promptCompletion or chat)")

"""Datasets checked on the user's machine before upload, with the trainer's own row checks (``data_rows``, no torch).

A file (JSON lines, a JSON array or Parquet) or rows in memory (a list of dicts or a pandas DataFrame) are read and
every row is checked against the chosen format; the first malformed row stops the upload with the trainer's
message, ``<file>:<line>: <problem>`` (``rows[<i>]`` for rows in memory), before anything is sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from finetune_client.errors import DataRejected
from finetune_trainer.data_rows import DATA_SUFFIXES, DataError, MalformedRow, check_row, read_rows

FORMATS = ("text", "promptCompletion", "chat")
# The fields each format reads, by their default names (the dataset section's *Field settings rename them).
FORMAT_FIELDS = {"text": ("text",), "promptCompletion": ("prompt", "completion"), "chat": ("messages",)}


def _columns(data_format: str, fields: Mapping[str, str] | None) -> list[str]:
    if data_format not in FORMATS:
        raise DataRejected(f"unknown dataset format {data_format!r} (expected {', '.join(FORMATS)})")
    names = dict(fields or {})
    return [names.get(key, key) for key in FORMAT_FIELDS[data_format]]


def check_file(path: Path, data_format: str, fields: Mapping[str, str] | None = None) -> int:
    """The number of rows in a data file, each checked; ``DataRejected`` names the first malformed one."""
    columns = _columns(data_format, fields)
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise DataRejected(f"{path}: unsupported file type {path.suffix or '(none)'} (expected .jsonl, .json or "
                           ".parquet)")
    if not path.is_file():
        raise DataRejected(f"{path}: no such file")
    rows = 0
    try:
        for location, row, problem in read_rows(path, str(path), columns):
            if problem is None:
                problem = _problem(row, data_format, fields)
            if problem is not None:
                raise DataRejected(f"{location}: {problem}")
            rows += 1
    except DataError as exc:
        raise DataRejected(str(exc)) from None
    if rows == 0:
        raise DataRejected(f"{path}: no rows")
    return rows


def rows_to_jsonl(rows: Iterable[Mapping[str, Any]] | Any, data_format: str,
                  fields: Mapping[str, str] | None = None) -> bytes:
    """Rows (a list of dicts, or a pandas DataFrame) as JSON lines, each checked first."""
    _columns(data_format, fields)
    records = rows.to_dict(orient="records") if hasattr(rows, "to_dict") else list(rows)
    lines = []
    for index, row in enumerate(records):
        problem = _problem(row, data_format, fields)
        if problem is not None:
            raise DataRejected(f"rows[{index}]: {problem}")
        try:
            lines.append(json.dumps(row, ensure_ascii=False))
        except (TypeError, ValueError) as exc:
            raise DataRejected(f"rows[{index}]: not JSON-serialisable: {exc}") from None
    if not lines:
        raise DataRejected("no rows to upload")
    return ("\n".join(lines) + "\n").encode()


def _problem(row: Any, data_format: str, fields: Mapping[str, str] | None) -> str | None:
    try:
        check_row(row, data_format, dict(fields or {}))
    except MalformedRow as exc:
        return str(exc)
    return None

"""meta.k8s.io/v1 Tables for `kubectl get`: CRD printer columns and the columns of the built-in kinds."""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Callable, Iterable
from typing import Any

from localcluster.apiserver_resources import PrinterColumn, ResourceType

Cell = str | int | float | bool | None
RowBuilder = Callable[[dict[str, Any], datetime.datetime], list[Cell]]

_NAME_COLUMN = {
    "name": "Name", "type": "string", "format": "name", "priority": 0,
    "description": "Name must be unique within a namespace.",
}
_AGE_COLUMN = {
    "name": "Age", "type": "string", "format": "", "priority": 0,
    "description": "CreationTimestamp is a timestamp representing the server time when this object was created.",
}


def parse_time(value: str) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration, the AGE format kubectl users know."""
    whole = int(seconds)
    if whole < -1:
        return "<invalid>"
    if whole < 0:
        return "0s"
    if whole < 120:
        return f"{whole}s"
    minutes = whole // 60
    if minutes < 10:
        rest = whole % 60
        return f"{minutes}m" if rest == 0 else f"{minutes}m{rest}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = whole // 3600
    if hours < 8:
        rest = minutes % 60
        return f"{hours}h" if rest == 0 else f"{hours}h{rest}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        rest = hours % 24
        return f"{hours // 24}d" if rest == 0 else f"{hours // 24}d{rest}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        rest = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if rest == 0 else f"{hours // 24 // 365}y{rest}d"
    return f"{hours // 24 // 365}y"


def _age(timestamp: Any, now: datetime.datetime) -> str:
    if not isinstance(timestamp, str):
        return "<unknown>"
    parsed = parse_time(timestamp)
    if parsed is None:
        return "<invalid>"
    return human_duration((now - parsed).total_seconds())


# ---- JSONPath (the subset printer columns use) -----------------------------------------------------------

_JSONPATH_TOKEN = re.compile(
    r"""\.(?P<name>[A-Za-z0-9_\-$]+)
      | \[(?P<index>-?\d+)\]
      | \[\s*['"](?P<quoted>[^'"]+)['"]\s*\]
      | \[(?P<star>\*)\]
      | \[\?\(@\.(?P<filter_path>[A-Za-z0-9_.\-]+)\s*(?P<filter_op>==|!=)\s*['"]?(?P<filter_value>[^'")]*)['"]?\)\]
      | \.\*(?P<dotstar>)
    """,
    re.VERBOSE,
)


def jsonpath_values(obj: Any, expression: str) -> list[Any]:
    """Values a simple JSONPath (`.status.phase`, `.a[0].b`, `.c[?(@.type=="Ready")].status`) selects."""
    expression = expression.strip()
    if expression.startswith("{") and expression.endswith("}"):
        expression = expression[1:-1]
    if expression.startswith("$"):
        expression = expression[1:]
    nodes: list[Any] = [obj]
    position = 0
    while position < len(expression):
        match = _JSONPATH_TOKEN.match(expression, position)
        if match is None:
            return []
        position = match.end()
        following: list[Any] = []
        for node in nodes:
            if match.group("name") is not None or match.group("quoted") is not None:
                key = match.group("name") or match.group("quoted")
                if isinstance(node, dict) and key in node:
                    following.append(node[key])
            elif match.group("index") is not None:
                index = int(match.group("index"))
                if isinstance(node, list) and -len(node) <= index < len(node):
                    following.append(node[index])
            elif match.group("star") is not None or match.group("dotstar") is not None:
                if isinstance(node, list):
                    following.extend(node)
                elif isinstance(node, dict):
                    following.extend(node.values())
            elif match.group("filter_path") is not None and isinstance(node, list):
                path = "." + match.group("filter_path")
                wanted = match.group("filter_value")
                equal = match.group("filter_op") == "=="
                for item in node:
                    values = jsonpath_values(item, path)
                    actual = _to_text(values[0]) if values else None
                    if (actual == wanted) == equal:
                        following.append(item)
        nodes = following
    return nodes


def _to_text(value: Any) -> str:
    """Go's fmt of a JSON-decoded value, as kubectl's JSONPath printing shows it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e21 else repr(value)
    if isinstance(value, str):
        return value
    if value is None:
        return "<nil>"
    return json.dumps(value, separators=(",", ":"))


def _printer_cell(column: PrinterColumn, obj: dict[str, Any], now: datetime.datetime) -> Cell:
    values = jsonpath_values(obj, column.json_path)
    if not values:
        return None
    value = values[0]
    if column.type == "date":
        return _age(value, now)
    if column.type == "integer":
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if column.type == "number":
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if column.type == "boolean":
        return value if isinstance(value, bool) else None
    return _to_text(value)


def _column(name: str, description: str = "", *, kind: str = "string", priority: int = 0) -> dict[str, Any]:
    return {"name": name, "type": kind, "format": "", "description": description, "priority": priority}


def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = obj.get("metadata") or {}
    return meta


# ---- built-in kinds -----------------------------------------------------------------------------------


def _pod_row(pod: dict[str, Any], now: datetime.datetime) -> list[Cell]:
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    containers = spec.get("containers") or []
    statuses = status.get("containerStatuses") or []
    ready = sum(1 for item in statuses if item.get("ready"))
    restarts = sum(int(item.get("restartCount") or 0) for item in statuses)
    reason = status.get("reason") or status.get("phase") or "Pending"
    for item in statuses:
        state = item.get("state") or {}
        if (state.get("waiting") or {}).get("reason"):
            reason = state["waiting"]["reason"]
        elif state.get("terminated"):
            terminated = state["terminated"]
            if terminated.get("reason"):
                reason = terminated["reason"]
            elif terminated.get("signal"):
                reason = f"Signal:{terminated['signal']}"
            else:
                reason = f"ExitCode:{terminated.get('exitCode', 0)}"
    if _meta(pod).get("deletionTimestamp") and status.get("reason") != "NodeLost":
        reason = "Terminating"
    return [
        _meta(pod).get("name"),
        f"{ready}/{len(containers)}",
        reason,
        str(restarts),
        _age(_meta(pod).get("creationTimestamp"), now),
        status.get("podIP") or "<none>",
        spec.get("nodeName") or "<none>",
    ]


def _service_row(service: dict[str, Any], now: datetime.datetime) -> list[Cell]:
    spec = service.get("spec") or {}
    ports = ",".join(
        f"{port.get('port')}/{port.get('protocol', 'TCP')}" for port in spec.get("ports") or []
    ) or "<none>"
    external = ",".join(spec.get("externalIPs") or []) or "<none>"
    return [_meta(service).get("name"), spec.get("type", "ClusterIP"), spec.get("clusterIP") or "<none>", external,
            ports, _age(_meta(service).get("creationTimestamp"), now)]


def _event_row(event: dict[str, Any], now: datetime.datetime) -> list[Cell]:
    involved = event.get("involvedObject") or {}
    last = event.get("lastTimestamp") or event.get("eventTime") or _meta(event).get("creationTimestamp")
    return [_age(last, now), event.get("type"), event.get("reason"),
            f"{str(involved.get('kind', '')).lower()}/{involved.get('name', '')}", event.get("message")]


def _named(*columns: tuple[str, Callable[[dict[str, Any]], Cell]]) -> tuple[list[dict[str, Any]], RowBuilder]:
    definitions = [_NAME_COLUMN] + [_column(name) for name, _ in columns] + [_AGE_COLUMN]

    def row(obj: dict[str, Any], now: datetime.datetime) -> list[Cell]:
        return ([_meta(obj).get("name")] + [extract(obj) for _, extract in columns]
                + [_age(_meta(obj).get("creationTimestamp"), now)])

    return definitions, row


_BUILTIN_TABLES: dict[tuple[str, str], tuple[list[dict[str, Any]], RowBuilder]] = {
    ("", "pods"): (
        [_NAME_COLUMN, _column("Ready"), _column("Status"), _column("Restarts", kind="string"), _AGE_COLUMN,
         _column("IP", priority=1), _column("Node", priority=1)],
        _pod_row,
    ),
    ("", "services"): (
        [_NAME_COLUMN, _column("Type"), _column("Cluster-IP"), _column("External-IP"), _column("Port(s)"),
         _AGE_COLUMN],
        _service_row,
    ),
    ("", "events"): (
        [_column("Last Seen"), _column("Type"), _column("Reason"), _column("Object"), _column("Message")],
        _event_row,
    ),
    ("", "configmaps"): _named(("Data", lambda obj: len(obj.get("data") or {}) + len(obj.get("binaryData") or {}))),
    ("", "secrets"): _named(("Type", lambda obj: obj.get("type")), ("Data", lambda obj: len(obj.get("data") or {}))),
    ("", "namespaces"): _named(("Status", lambda obj: (obj.get("status") or {}).get("phase"))),
    ("", "nodes"): _named(("Status", lambda obj: next(
        ("Ready" if cond.get("status") == "True" else "NotReady"
         for cond in (obj.get("status") or {}).get("conditions") or [] if cond.get("type") == "Ready"),
        "Unknown",
    ))),
    ("apiextensions.k8s.io", "customresourcedefinitions"): (
        [_NAME_COLUMN, _column("Created At", kind="date")],
        lambda obj, now: [_meta(obj).get("name"), _meta(obj).get("creationTimestamp")],
    ),
}


def _table_shape(rt: ResourceType) -> tuple[list[dict[str, Any]], RowBuilder]:
    if rt.printer_columns is None:
        return _BUILTIN_TABLES.get(rt.storage_key) or _named()
    columns = rt.printer_columns
    definitions = [_NAME_COLUMN] + [
        {"name": column.name, "type": column.type, "format": column.format, "priority": column.priority,
         "description": column.description or f"Custom resource definition column (in JSONPath format): "
                                              f"{column.json_path}"}
        for column in columns
    ]
    add_age = not any(
        column.name.lower() == "age" or column.json_path.strip() == ".metadata.creationTimestamp" for column in columns
    )
    if add_age:
        definitions.append(_AGE_COLUMN)

    def row(obj: dict[str, Any], now: datetime.datetime) -> list[Cell]:
        cells = [_meta(obj).get("name")] + [_printer_cell(column, obj, now) for column in columns]
        if add_age:
            cells.append(_age(_meta(obj).get("creationTimestamp"), now))
        return cells

    return definitions, row


def _row_object(rt: ResourceType, obj: dict[str, Any], include_object: str) -> dict[str, Any] | None:
    if include_object == "None":
        return None
    if include_object == "Object":
        return obj
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj.get("metadata", {})}


def build_table(
    rt: ResourceType, objects: Iterable[dict[str, Any]], *, resource_version: str, include_object: str = "Metadata",
    include_columns: bool = True,
) -> dict[str, Any]:
    """A meta.k8s.io/v1 Table, `includeObject` (None/Metadata/Object) honoured as the real server does."""
    definitions, row = _table_shape(rt)
    now = datetime.datetime.now(tz=datetime.UTC)
    rows = []
    for obj in objects:
        entry: dict[str, Any] = {"cells": row(obj, now)}
        row_object = _row_object(rt, obj, include_object)
        if row_object is not None:
            entry["object"] = row_object
        rows.append(entry)
    table: dict[str, Any] = {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": definitions if include_columns else [],
        "rows": rows,
    }
    return table

"""The PATCH flavours of the Kubernetes API (JSON merge, strategic merge, JSON patch) over plain JSON values.

Stored objects are shared between watchers and never mutated: merge functions build new dicts along the
changed paths and reuse untouched subtrees, and JSON patch works on a deep copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class PatchError(ValueError):
    """A patch the real API server rejects: 400 for malformed ones, 422 (`unprocessable`) for failed tests."""

    def __init__(self, message: str, *, unprocessable: bool = False) -> None:
        super().__init__(message)
        self.unprocessable = unprocessable


def deep_copy(value: Any) -> Any:
    """A copy of a JSON value; several times faster than copy.deepcopy for dicts of primitives."""
    if isinstance(value, dict):
        return {key: deep_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [deep_copy(item) for item in value]
    return value


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge, null deletes, everything else (lists included) replaces."""
    if not isinstance(patch, Mapping):
        return patch
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# Lists that Kubernetes merges by a key in strategic merge patches (patchMergeKey in the Go types). Lists not
# named here are replaced whole, which is what the Go types say for most of the others.
STRATEGIC_MERGE_KEYS: dict[str, str] = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
    "ownerReferences": "uid",
    "conditions": "type",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
    "resourceClaims": "name",
    "readinessGates": "conditionType",
    "containerStatuses": "name",
    "initContainerStatuses": "name",
    "podIPs": "ip",
}
# Primitive lists with patchStrategy=merge: a patch adds to them instead of replacing them.
STRATEGIC_MERGED_PRIMITIVE_LISTS = frozenset({"finalizers"})
_PORTS_KEYS = ("containerPort", "port")


def _merge_key_for(field: str, items: list[Any]) -> str | None:
    if field == "ports":
        # Container ports merge by containerPort, service ports by port: tell them apart by content.
        for key in _PORTS_KEYS:
            if any(isinstance(item, Mapping) and key in item for item in items):
                return key
        return None
    return STRATEGIC_MERGE_KEYS.get(field)


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Kubernetes strategic merge patch with the directives kubectl sends ($patch, $retainKeys, ...)."""
    if not isinstance(patch, Mapping):
        return patch
    directive = patch.get("$patch")
    if directive == "replace":
        return {key: value for key, value in patch.items() if key != "$patch"}
    if directive == "delete":
        return None
    result = dict(target) if isinstance(target, Mapping) else {}
    retain_keys = patch.get("$retainKeys")
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys") or key.startswith("$setElementOrder/"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            current = result.get(field)
            if isinstance(current, list) and isinstance(value, list):
                result[field] = [item for item in current if item not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list):
            result[key] = _strategic_merge_list(key, result.get(key), value)
        elif isinstance(value, Mapping):
            merged = strategic_merge_patch(result.get(key), value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        else:
            result[key] = value
    if isinstance(retain_keys, list):
        result = {key: value for key, value in result.items() if key in retain_keys}
    return result


def _strategic_merge_list(field: str, current: Any, patch: list[Any]) -> list[Any]:
    if any(isinstance(item, Mapping) and item.get("$patch") == "replace" for item in patch):
        return [item for item in patch if not (isinstance(item, Mapping) and "$patch" in item)]
    if not isinstance(current, list):
        current = []
    if field in STRATEGIC_MERGED_PRIMITIVE_LISTS:
        return list(current) + [item for item in patch if item not in current]
    merge_key = _merge_key_for(field, patch) or _merge_key_for(field, current)
    if merge_key is None:
        return [item for item in patch if not (isinstance(item, Mapping) and "$patch" in item)]
    result: list[Any] = list(current)
    positions = {
        item.get(merge_key): index for index, item in enumerate(result) if isinstance(item, Mapping)
    }
    deleted: set[Any] = set()
    for item in patch:
        if not isinstance(item, Mapping):
            continue
        key_value = item.get(merge_key)
        if item.get("$patch") == "delete":
            deleted.add(key_value)
            continue
        if key_value in positions:
            index = positions[key_value]
            result[index] = strategic_merge_patch(result[index], item)
        else:
            positions[key_value] = len(result)
            result.append(strategic_merge_patch({}, item))
    if deleted:
        result = [item for item in result if not (isinstance(item, Mapping) and item.get(merge_key) in deleted)]
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"invalid JSON pointer {path!r}")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _resolve_parent(document: Any, parts: list[str], path: str) -> tuple[Any, str]:
    node = document
    for part in parts[:-1]:
        if isinstance(node, dict):
            if part not in node:
                raise PatchError(f"missing path: {path}", unprocessable=True)
            node = node[part]
        elif isinstance(node, list):
            node = node[_list_index(node, part, path, allow_end=False)]
        else:
            raise PatchError(f"missing path: {path}", unprocessable=True)
    return node, parts[-1]


def _list_index(node: list[Any], part: str, path: str, *, allow_end: bool) -> int:
    if part == "-" and allow_end:
        return len(node)
    try:
        index = int(part)
    except ValueError as exc:
        raise PatchError(f"invalid list index {part!r} in {path}", unprocessable=True) from exc
    limit = len(node) if allow_end else len(node) - 1
    if index < 0 or index > limit:
        raise PatchError(f"list index {index} out of range in {path}", unprocessable=True)
    return index


def _get(document: Any, path: str) -> Any:
    node = document
    for part in _pointer(path):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list):
            node = node[_list_index(node, part, path, allow_end=False)]
        else:
            raise PatchError(f"missing path: {path}", unprocessable=True)
    return node


def _add(document: Any, path: str, value: Any) -> Any:
    parts = _pointer(path)
    if not parts:
        return value
    parent, last = _resolve_parent(document, parts, path)
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_list_index(parent, last, path, allow_end=True), value)
    else:
        raise PatchError(f"cannot add to a non-container at {path}", unprocessable=True)
    return document


def _remove(document: Any, path: str) -> Any:
    parts = _pointer(path)
    if not parts:
        raise PatchError("cannot remove the whole document", unprocessable=True)
    parent, last = _resolve_parent(document, parts, path)
    if isinstance(parent, dict):
        if last not in parent:
            raise PatchError(f"unable to remove nonexistent key: {last}: missing value", unprocessable=True)
        del parent[last]
    elif isinstance(parent, list):
        del parent[_list_index(parent, last, path, allow_end=False)]
    else:
        raise PatchError(f"missing path: {path}", unprocessable=True)
    return document


def json_patch(document: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch; a failed `test` is 422 as on the real server (kopf relies on it)."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch must be a list of operations")
    result = deep_copy(document)
    for operation in operations:
        if not isinstance(operation, Mapping) or "op" not in operation or "path" not in operation:
            raise PatchError(f"invalid JSON patch operation: {operation!r}")
        op, path = operation["op"], operation["path"]
        if op == "add":
            result = _add(result, path, deep_copy(operation.get("value")))
        elif op == "remove":
            result = _remove(result, path)
        elif op == "replace":
            _get(result, path)
            result = _add(_remove(result, path), path, deep_copy(operation.get("value"))) if path else deep_copy(
                operation.get("value")
            )
        elif op == "move":
            value = _get(result, operation["from"])
            result = _add(_remove(result, operation["from"]), path, value)
        elif op == "copy":
            result = _add(result, path, deep_copy(_get(result, operation["from"])))
        elif op == "test":
            try:
                actual = _get(result, path)
            except PatchError:
                actual = None
            if actual != operation.get("value"):
                raise PatchError(
                    f"the server rejected our request due to an error in our request: testing value "
                    f"{path} failed",
                    unprocessable=True,
                )
        else:
            raise PatchError(f"unexpected JSON patch operation {op!r}")
    return result

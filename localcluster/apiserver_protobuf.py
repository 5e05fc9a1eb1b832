"""Decodes the few protobuf request bodies kubectl sends (`kubectl create namespace|configmap|secret|sa`).

kubectl's typed clients post `application/vnd.kubernetes.protobuf`; the emulator answers in JSON, which they
accept, but it must read the body. Only the kinds kubectl's generators create are described here, with the
field numbers of k8s.io/api/core/v1/generated.proto and k8s.io/apimachinery's meta/v1 and runtime protos.
"""

from __future__ import annotations

import base64
import datetime
from typing import Any

MAGIC = b"k8s\x00"

# field number -> (JSON name, kind); kind is "string", "bytes", "int", "bool", "strings", a message schema
# name, "map" (string -> string), "bytesmap" (string -> base64 bytes), "time", or "messages:<schema>".
Schema = dict[int, tuple[str, str]]
_SCHEMAS: dict[str, Schema] = {
    "ObjectMeta": {
        1: ("name", "string"), 2: ("generateName", "string"), 3: ("namespace", "string"), 5: ("uid", "string"),
        6: ("resourceVersion", "string"), 7: ("generation", "int"), 8: ("creationTimestamp", "time"),
        11: ("labels", "map"), 12: ("annotations", "map"), 13: ("ownerReferences", "messages:OwnerReference"),
        14: ("finalizers", "strings"),
    },
    "OwnerReference": {
        1: ("kind", "string"), 3: ("name", "string"), 4: ("uid", "string"), 5: ("apiVersion", "string"),
        6: ("controller", "bool"), 7: ("blockOwnerDeletion", "bool"),
    },
    "ConfigMap": {1: ("metadata", "ObjectMeta"), 2: ("data", "map"), 3: ("binaryData", "bytesmap"),
                  4: ("immutable", "bool")},
    "Secret": {1: ("metadata", "ObjectMeta"), 2: ("data", "bytesmap"), 3: ("type", "string"),
               4: ("stringData", "map"), 5: ("immutable", "bool")},
    "Namespace": {1: ("metadata", "ObjectMeta"), 2: ("spec", "NamespaceSpec")},
    "NamespaceSpec": {1: ("finalizers", "strings")},
    "ServiceAccount": {1: ("metadata", "ObjectMeta"), 3: ("imagePullSecrets", "messages:LocalObjectReference"),
                       4: ("automountServiceAccountToken", "bool")},
    "LocalObjectReference": {1: ("name", "string")},
    "Time": {1: ("seconds", "int"), 2: ("nanos", "int")},
}
SUPPORTED_KINDS = frozenset({"ConfigMap", "Secret", "Namespace", "ServiceAccount"})


class ProtobufError(ValueError):
    """A body that is not a Kubernetes protobuf envelope of a kind described here."""


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if position >= len(data):
            raise ProtobufError("truncated varint")
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs: ints for varints and fixed widths, bytes for length-delimited ones."""
    fields: list[tuple[int, int | bytes]] = []
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _varint(data, position)
            fields.append((number, value))
        elif wire_type == 2:
            length, position = _varint(data, position)
            fields.append((number, data[position:position + length]))
            position += length
        elif wire_type == 1:
            fields.append((number, int.from_bytes(data[position:position + 8], "little")))
            position += 8
        elif wire_type == 5:
            fields.append((number, int.from_bytes(data[position:position + 4], "little")))
            position += 4
        else:
            raise ProtobufError(f"unsupported wire type {wire_type}")
    return fields


def _map_entry(data: bytes) -> tuple[str, bytes]:
    key, value = "", b""
    for number, item in _fields(data):
        if number == 1 and isinstance(item, bytes):
            key = item.decode()
        elif number == 2 and isinstance(item, bytes):
            value = item
    return key, value


def _decode(data: bytes, schema_name: str) -> dict[str, Any]:
    schema = _SCHEMAS[schema_name]
    result: dict[str, Any] = {}
    for number, raw in _fields(data):
        if number not in schema:
            continue
        name, kind = schema[number]
        if kind == "int" and isinstance(raw, int):
            result[name] = raw
        elif kind == "bool" and isinstance(raw, int):
            result[name] = bool(raw)
        elif not isinstance(raw, bytes):
            raise ProtobufError(f"{schema_name}.{name}: unexpected wire type")
        elif kind == "string":
            result[name] = raw.decode()
        elif kind == "strings":
            result.setdefault(name, []).append(raw.decode())
        elif kind in ("map", "bytesmap"):
            key, value = _map_entry(raw)
            result.setdefault(name, {})[key] = (
                value.decode() if kind == "map" else base64.b64encode(value).decode()
            )
        elif kind == "time":
            stamp = _decode(raw, "Time")
            moment = datetime.datetime.fromtimestamp(stamp.get("seconds", 0), tz=datetime.UTC)
            result[name] = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
        elif kind.startswith("messages:"):
            result.setdefault(name, []).append(_decode(raw, kind.split(":", 1)[1]))
        else:
            result[name] = _decode(raw, kind)
    # gogo-protobuf writes empty strings that JSON would omit; drop them so both encodings agree.
    return {key: value for key, value in result.items() if value != "" and value != {} and value != []}


def decode_object(body: bytes) -> dict[str, Any]:
    """The JSON form of a protobuf-encoded object (runtime.Unknown in the `k8s\\0` envelope)."""
    if not body.startswith(MAGIC):
        raise ProtobufError("missing the k8s protobuf magic number")
    api_version = kind = ""
    raw = b""
    for number, value in _fields(body[len(MAGIC):]):
        if number == 1 and isinstance(value, bytes):
            for type_number, type_value in _fields(value):
                if type_number == 1 and isinstance(type_value, bytes):
                    api_version = type_value.decode()
                elif type_number == 2 and isinstance(type_value, bytes):
                    kind = type_value.decode()
        elif number == 2 and isinstance(value, bytes):
            raw = value
    if kind not in SUPPORTED_KINDS:
        raise ProtobufError(f"protobuf bodies of kind {kind!r} are not supported; send JSON")
    return {"apiVersion": api_version, "kind": kind, **_decode(raw, kind)}

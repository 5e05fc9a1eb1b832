"""The resource types the API emulator serves (built-in kinds and CRD-defined ones) and their discovery documents."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
READ_ONLY_VERBS = ("get", "list", "watch")


class FieldErrorLike(Protocol):
    """What localcluster.crd_validation.FieldError looks like to the API server."""

    field: str
    message: str
    reason: str


class ObjectValidator(Protocol):
    """What localcluster.crd_validation.CRDValidator looks like to the API server."""

    def apply_defaults(self, obj: dict[str, Any]) -> dict[str, Any]: ...

    def prune(self, obj: dict[str, Any]) -> dict[str, Any]: ...

    def validate(
        self, obj: dict[str, Any], old: dict[str, Any] | None = None, *, reject_unknown: bool = True
    ) -> list[Any]: ...


# (openAPIV3Schema, kind, group) -> validator; localcluster.crd_validation.CRDValidator is one.
ValidatorFactory = Callable[[dict[str, Any], str, str], ObjectValidator]


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    type: str
    json_path: str
    description: str = ""
    priority: int = 0
    format: str = ""


@dataclass
class ResourceType:
    """One group/version/plural as served over HTTP; several versions can share one storage."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    printer_columns: tuple[PrinterColumn, ...] | None = None  # CRD-declared; None for built-ins
    validator: ObjectValidator | None = None
    # The storage is keyed by group and plural; events.k8s.io/v1 events live in the core events storage.
    storage_group: str | None = None
    to_storage: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    from_storage: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    name_rule: str = "subdomain"  # "subdomain" | "label" (RFC 1123) | "label1035" (services)
    crd_name: str | None = None
    open_api_schema: dict[str, Any] | None = field(default=None, repr=False)
    validator_factory: ValidatorFactory | None = field(default=None, repr=False)
    _ratcheting_validators: dict[frozenset[str], ObjectValidator] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.singular:
            self.singular = self.kind.lower()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def storage_key(self) -> tuple[str, str]:
        return (self.group if self.storage_group is None else self.storage_group, self.plural)

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources

    @property
    def qualified_kind(self) -> str:
        """`FineTuneJob.finetune.dev` as in "is invalid" messages; `Pod` for the core group."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    @property
    def group_resource(self) -> str:
        """`finetunejobs.finetune.dev` as in "not found" and "conflict" messages; `pods` for the core group."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def validator_for_update(self, old: Mapping[str, Any], new: Mapping[str, Any]) -> ObjectValidator | None:
        """The validator for an update, ratcheting like the real server: fields left as they were are not
        validated again. Top-level fields are the unit here, so kopf's metadata and status writes skip the
        spec's CEL rules (several milliseconds each), while any spec change still gets all of them."""
        schema, factory = self.open_api_schema, self.validator_factory
        if self.validator is None or schema is None or factory is None or schema.get("x-kubernetes-validations"):
            return self.validator
        changed = frozenset(
            key for key in set(old) | set(new) if key not in ("apiVersion", "kind", "metadata") and
            old.get(key) != new.get(key)
        )
        if not changed:
            return None
        cached = self._ratcheting_validators.get(changed)
        if cached is None:
            properties = schema.get("properties") or {}
            reduced = {
                **schema,
                "properties": {
                    key: value if key in changed else {"x-kubernetes-preserve-unknown-fields": True}
                    for key, value in properties.items()
                },
                "required": [key for key in schema.get("required") or [] if key in changed],
            }
            if not reduced["required"]:
                del reduced["required"]
            cached = self._ratcheting_validators[changed] = factory(reduced, self.kind, self.group)
        return cached

    def output(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The stored object as this group/version shows it."""
        if self.from_storage is not None:
            return self.from_storage(obj)
        if obj.get("apiVersion") == self.api_version:
            return obj
        return {**obj, "apiVersion": self.api_version}


def _core(plural: str, kind: str, **kwargs: Any) -> ResourceType:
    return ResourceType(group="", version="v1", plural=plural, kind=kind, **kwargs)


# events.k8s.io/v1 field names against core/v1 ones; both APIs share one storage like on the real server.
_EVENT_FIELDS = (
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
)


def events_v1_to_core(obj: dict[str, Any]) -> dict[str, Any]:
    result = {key: value for key, value in obj.items() if key not in dict(_EVENT_FIELDS)}
    for new_name, core_name in _EVENT_FIELDS:
        if new_name in obj:
            result[core_name] = obj[new_name]
    result["apiVersion"], result["kind"] = "v1", "Event"
    return result


def events_core_to_v1(obj: dict[str, Any]) -> dict[str, Any]:
    core_names = {core_name: new_name for new_name, core_name in _EVENT_FIELDS}
    result = {key: value for key, value in obj.items() if key not in core_names}
    for core_name, new_name in core_names.items():
        if core_name in obj:
            result[new_name] = obj[core_name]
    result["apiVersion"], result["kind"] = "events.k8s.io/v1", "Event"
    return result


def builtin_resource_types() -> list[ResourceType]:
    """The built-in kinds the operator, the kubelet, kopf and kubectl use; all share generic semantics."""
    return [
        _core("pods", "Pod", namespaced=True, short_names=("po",), categories=("all",),
              subresources=("status", "log", "eviction", "binding")),
        _core("services", "Service", namespaced=True, short_names=("svc",), categories=("all",),
              subresources=("status",), name_rule="label1035"),
        _core("endpoints", "Endpoints", namespaced=True, short_names=("ep",)),
        _core("configmaps", "ConfigMap", namespaced=True, short_names=("cm",)),
        _core("secrets", "Secret", namespaced=True),
        _core("serviceaccounts", "ServiceAccount", namespaced=True, short_names=("sa",)),
        _core("persistentvolumeclaims", "PersistentVolumeClaim", namespaced=True, short_names=("pvc",),
              subresources=("status",)),
        _core("events", "Event", namespaced=True, short_names=("ev",)),
        _core("namespaces", "Namespace", namespaced=False, short_names=("ns",), subresources=("status",),
              name_rule="label", verbs=("create", "delete", "get", "list", "patch", "update", "watch")),
        _core("nodes", "Node", namespaced=False, short_names=("no",), subresources=("status",)),
        ResourceType(group="events.k8s.io", version="v1", plural="events", kind="Event", namespaced=True,
                     short_names=("ev",), storage_group="", to_storage=events_v1_to_core,
                     from_storage=events_core_to_v1),
        ResourceType(group="coordination.k8s.io", version="v1", plural="leases", kind="Lease", namespaced=True),
        ResourceType(group="scheduling.k8s.io", version="v1", plural="priorityclasses", kind="PriorityClass",
                     namespaced=False, short_names=("pc",)),
        # Stored only (no controllers run them), so that a Helm chart applies as on a real cluster.
        ResourceType(group="apps", version="v1", plural="deployments", kind="Deployment", namespaced=True,
                     short_names=("deploy",), categories=("all",), subresources=("status",)),
        ResourceType(group="rbac.authorization.k8s.io", version="v1", plural="roles", kind="Role", namespaced=True),
        ResourceType(group="rbac.authorization.k8s.io", version="v1", plural="rolebindings", kind="RoleBinding",
                     namespaced=True),
        ResourceType(group="rbac.authorization.k8s.io", version="v1", plural="clusterroles", kind="ClusterRole",
                     namespaced=False),
        ResourceType(group="rbac.authorization.k8s.io", version="v1", plural="clusterrolebindings",
                     kind="ClusterRoleBinding", namespaced=False),
        ResourceType(group="networking.k8s.io", version="v1", plural="networkpolicies", kind="NetworkPolicy",
                     namespaced=True, short_names=("netpol",)),
        ResourceType(group="apiextensions.k8s.io", version="v1", plural="customresourcedefinitions",
                     kind="CustomResourceDefinition", namespaced=False, short_names=("crd", "crds"),
                     categories=("api-extensions",), subresources=("status",)),
    ]


class CRDError(ValueError):
    """A CustomResourceDefinition that cannot be served: (field path, message)."""

    def __init__(self, field_path: str, message: str) -> None:
        super().__init__(f"{field_path}: {message}")
        self.field_path = field_path
        self.message = message


def resource_types_from_crd(
    crd: Mapping[str, Any], validator_factory: ValidatorFactory | None
) -> list[ResourceType]:
    """One ResourceType per served version of a CRD, with its printer columns and validator."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group, plural, kind = spec.get("group"), names.get("plural"), names.get("kind")
    if not group:
        raise CRDError("spec.group", "Required value")
    if not plural:
        raise CRDError("spec.names.plural", "Required value")
    if not kind:
        raise CRDError("spec.names.kind", "Required value")
    name = (crd.get("metadata") or {}).get("name")
    if name != f"{plural}.{group}":
        raise CRDError("metadata.name", f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group')
    scope = spec.get("scope", "Namespaced")
    if scope not in ("Namespaced", "Cluster"):
        raise CRDError("spec.scope", f'Unsupported value: "{scope}": supported values: "Cluster", "Namespaced"')
    versions = spec.get("versions") or []
    if not versions:
        raise CRDError("spec.versions", "Invalid value: null: must have exactly one version marked as storage version")
    result: list[ResourceType] = []
    for version in versions:
        if not version.get("served", True):
            continue
        subresources = version.get("subresources") or spec.get("subresources") or {}
        columns_spec = version.get("additionalPrinterColumns") or spec.get("additionalPrinterColumns") or []
        columns = tuple(
            PrinterColumn(
                name=column["name"],
                type=column.get("type", "string"),
                json_path=column.get("jsonPath") or column.get("JSONPath") or "",
                description=column.get("description", ""),
                priority=int(column.get("priority", 0)),
                format=column.get("format", ""),
            )
            for column in columns_spec
        )
        schema = ((version.get("schema") or spec.get("validation") or {}).get("openAPIV3Schema")) or None
        validator = (
            validator_factory(schema, kind, group) if schema is not None and validator_factory is not None else None
        )
        result.append(
            ResourceType(
                group=group,
                version=version["name"],
                plural=plural,
                kind=kind,
                namespaced=scope == "Namespaced",
                singular=names.get("singular") or kind.lower(),
                short_names=tuple(names.get("shortNames") or ()),
                categories=tuple(names.get("categories") or ()),
                subresources=tuple(key for key in ("status", "scale") if key in subresources),
                printer_columns=columns,
                validator=validator,
                crd_name=name,
                open_api_schema=schema,
                validator_factory=validator_factory,
            )
        )
    return result


# ---- discovery documents ------------------------------------------------------------------------------


_SUBRESOURCE_KINDS = {"eviction": "Eviction", "binding": "Binding"}


def _verbs_for_subresource(subresource: str) -> list[str]:
    if subresource == "log":
        return ["get"]
    if subresource in ("eviction", "binding"):
        return ["create"]
    return ["get", "patch", "update"]


def legacy_resource_list(group: str, version: str, types: Iterable[ResourceType]) -> dict[str, Any]:
    """APIResourceList for /api/v1 and /apis/<group>/<version> (what kopf reads)."""
    resources: list[dict[str, Any]] = []
    for rt in sorted(types, key=lambda item: item.plural):
        entry: dict[str, Any] = {
            "name": rt.plural,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": list(rt.verbs),
        }
        if rt.short_names:
            entry["shortNames"] = list(rt.short_names)
        if rt.categories:
            entry["categories"] = list(rt.categories)
        entry["storageVersionHash"] = hashlib.sha256(f"{rt.group}/{rt.plural}".encode()).hexdigest()[:12]
        resources.append(entry)
        for subresource in rt.subresources:
            resources.append({
                "name": f"{rt.plural}/{subresource}",
                "singularName": "",
                "namespaced": rt.namespaced,
                "kind": _SUBRESOURCE_KINDS.get(subresource, rt.kind),
                "verbs": _verbs_for_subresource(subresource),
            })
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": resources,
    }


def group_versions(types: Iterable[ResourceType]) -> dict[str, list[str]]:
    """Group name to its versions, the preferred (first declared) version first."""
    result: dict[str, list[str]] = {}
    for rt in types:
        versions = result.setdefault(rt.group, [])
        if rt.version not in versions:
            versions.append(rt.version)
    return result


def legacy_group(group: str, versions: list[str]) -> dict[str, Any]:
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": group,
        "versions": [{"groupVersion": f"{group}/{version}", "version": version} for version in versions],
        "preferredVersion": {"groupVersion": f"{group}/{versions[0]}", "version": versions[0]},
    }


def legacy_group_list(groups: Mapping[str, list[str]]) -> dict[str, Any]:
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [legacy_group(group, versions) for group, versions in groups.items() if group],
    }


def aggregated_discovery(
    types: Iterable[ResourceType], *, core: bool, api_version: str = "apidiscovery.k8s.io/v2"
) -> dict[str, Any]:
    """APIGroupDiscoveryList: what kubectl 1.32 asks /api and /apis for, all resources in one answer."""
    by_group: dict[str, dict[str, list[ResourceType]]] = {}
    for rt in types:
        if (rt.group == "") != core:
            continue
        by_group.setdefault(rt.group, {}).setdefault(rt.version, []).append(rt)
    items: list[dict[str, Any]] = []
    for group, versions in by_group.items():
        version_entries = []
        for version, resources in versions.items():
            entries = []
            for rt in sorted(resources, key=lambda item: item.plural):
                entry: dict[str, Any] = {
                    "resource": rt.plural,
                    "responseKind": {"group": rt.group, "version": rt.version, "kind": rt.kind},
                    "scope": "Namespaced" if rt.namespaced else "Cluster",
                    "singularResource": rt.singular,
                    "verbs": list(rt.verbs),
                }
                if rt.short_names:
                    entry["shortNames"] = list(rt.short_names)
                if rt.categories:
                    entry["categories"] = list(rt.categories)
                if rt.subresources:
                    entry["subresources"] = [
                        {
                            "subresource": subresource,
                            "responseKind": {
                                "group": "policy" if subresource == "eviction" else rt.group,
                                "version": "v1" if subresource == "eviction" else rt.version,
                                "kind": _SUBRESOURCE_KINDS.get(subresource, rt.kind),
                            },
                            "verbs": _verbs_for_subresource(subresource),
                        }
                        for subresource in rt.subresources
                    ]
                entries.append(entry)
            version_entries.append({"version": version, "resources": entries, "freshness": "Current"})
        items.append({"metadata": {"name": group, "creationTimestamp": None}, "versions": version_entries})
    return {"kind": "APIGroupDiscoveryList", "apiVersion": api_version, "metadata": {}, "items": items}


# ---- OpenAPI v3 --------------------------------------------------------------------------------------
# kubectl apply/create ask /openapi/v3 whether the server validates fields itself (the `fieldValidation`
# query parameter on PATCH); when it does, kubectl skips its client-side schema validation, which would need
# the full OpenAPI schemas of every kind. These documents declare exactly that and nothing more.


def openapi_v3_path(rt: ResourceType) -> str:
    return f"apis/{rt.group}/{rt.version}" if rt.group else f"api/{rt.version}"


def openapi_v3_document(types: Iterable[ResourceType]) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for rt in types:
        gvk = {"group": rt.group, "version": rt.version, "kind": rt.kind}
        prefix = f"/{openapi_v3_path(rt)}"
        scope = f"{prefix}/namespaces/{{namespace}}" if rt.namespaced else prefix
        object_path = f"{scope}/{rt.plural}/{{name}}"
        parameters = [
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": True}},
            {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": True}},
        ]
        schema_name = f"{rt.group or 'core'}.{rt.version}.{rt.kind}"
        reference = {"$ref": f"#/components/schemas/{schema_name}"}
        content_types = ["application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml"]
        paths[object_path] = {
            "get": {"operationId": f"read{rt.kind}", "x-kubernetes-action": "get",
                    "x-kubernetes-group-version-kind": gvk,
                    "responses": {"200": {"content": {"application/json": {"schema": reference}}}}},
            "put": {"operationId": f"replace{rt.kind}", "x-kubernetes-action": "put",
                    "x-kubernetes-group-version-kind": gvk, "parameters": parameters,
                    "requestBody": {"content": {"application/json": {"schema": reference}}},
                    "responses": {"200": {"content": {"application/json": {"schema": reference}}}}},
            "patch": {"operationId": f"patch{rt.kind}", "x-kubernetes-action": "patch",
                      "x-kubernetes-group-version-kind": gvk, "parameters": parameters,
                      "requestBody": {"content": {kind: {"schema": {"type": "object"}} for kind in content_types}},
                      "responses": {"200": {"content": {"application/json": {"schema": reference}}}}},
            "delete": {"operationId": f"delete{rt.kind}", "x-kubernetes-action": "delete",
                       "x-kubernetes-group-version-kind": gvk, "responses": {"200": {}}},
        }
        schema = dict(rt.open_api_schema) if rt.open_api_schema else {"type": "object",
                                                                       "x-kubernetes-preserve-unknown-fields": True}
        schema["x-kubernetes-group-version-kind"] = [gvk]
        schemas[schema_name] = schema
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def openapi_v3_root(types: Iterable[ResourceType], documents: Callable[[str], bytes]) -> dict[str, Any]:
    """The /openapi/v3 index; each entry's hash changes with its document so clients re-fetch after a CRD."""
    result: dict[str, Any] = {}
    for path in sorted({openapi_v3_path(rt) for rt in types}):
        digest = hashlib.sha512(documents(path)).hexdigest()[:64].upper()
        result[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={digest}"}
    return {"paths": result}


def encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

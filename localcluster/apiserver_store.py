"""The API emulator's object store: versions, watches, finalizers, graceful pod deletion and garbage collection.

Every method is synchronous and runs on the server's event loop, so each request's read-modify-write is atomic
without locks and every client reads its own (and everyone's) writes at once. Stored objects are never mutated
in place: a write stores a new dict, so watch events and responses can share them without copying.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import datetime
import logging
import random
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from localcluster.apiserver_patches import (
    PatchError,
    json_patch,
    merge_patch,
    strategic_merge_patch,
)
from localcluster.apiserver_resources import (
    CRDError,
    ResourceType,
    ValidatorFactory,
    builtin_resource_types,
    resource_types_from_crd,
)

logger = logging.getLogger(__name__)

Obj = dict[str, Any]
Filter = Callable[[Mapping[str, Any]], bool]
ObjectKey = tuple[tuple[str, str], str, str]  # (storage key, namespace or "", name)

DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
_UNDELETABLE_NAMESPACES = frozenset({"default", "kube-system", "kube-public"})
_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_TERMINAL_POD_PHASES = frozenset({"Succeeded", "Failed"})
# Fields the server owns: a client's PUT or patch cannot change them.
_SYSTEM_METADATA = ("uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "generation")


class APIError(Exception):
    """An error answered as a meta/v1 Status with this HTTP code."""

    def __init__(self, code: int, reason: str, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = dict(details) if details else None

    def status(self) -> Obj:
        body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def not_found(rt: ResourceType, name: str) -> APIError:
    details: Obj = {"name": name, "kind": rt.plural}
    if rt.group:
        details["group"] = rt.group
    return APIError(404, "NotFound", f'{rt.group_resource} "{name}" not found', details)


def _conflict(rt: ResourceType, name: str) -> APIError:
    details: Obj = {"name": name, "kind": rt.plural}
    if rt.group:
        details["group"] = rt.group
    return APIError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {rt.group_resource} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        details,
    )


def invalid(rt: ResourceType, name: str, causes: list[tuple[str, str, str]]) -> APIError:
    """422 Invalid exactly like the real server: causes are (reason, field, message)."""
    texts = [f"{cause_field}: {message}" if cause_field else message for _, cause_field, message in causes]
    summary = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    details: Obj = {"name": name, "kind": rt.kind, "causes": [
        {"reason": reason, "message": message, "field": cause_field} for reason, cause_field, message in causes
    ]}
    if rt.group:
        details["group"] = rt.group
    return APIError(422, "Invalid", f'{rt.qualified_kind} "{name}" is invalid: {summary}', details)


def bad_request(message: str) -> APIError:
    return APIError(400, "BadRequest", message)


def now_timestamp(offset_seconds: float = 0) -> str:
    moment = datetime.datetime.now(tz=datetime.UTC) + datetime.timedelta(seconds=offset_seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class DeleteOptions:
    grace_period_seconds: int | None = None
    propagation_policy: str | None = None  # Background | Foreground | Orphan
    precondition_uid: str | None = None
    precondition_resource_version: str | None = None
    dry_run: bool = False


@dataclass
class WatchEvent:
    type: str  # ADDED | MODIFIED | DELETED
    obj: Obj
    old: Obj | None
    resource_version: int
    # Encoded lines per (delivered type, view) shared by all watchers that see the event the same way.
    encoded: dict[tuple[str, int], bytes] = field(default_factory=dict)


class Watcher:
    """One watch request: a queue fed by the store for objects that pass its namespace and selectors."""

    def __init__(self, namespace: str | None, predicate: Filter | None) -> None:
        self.namespace = namespace
        self.predicate = predicate
        self.queue: asyncio.Queue[tuple[str, WatchEvent] | None] = asyncio.Queue()

    def _matches(self, obj: Obj) -> bool:
        if self.namespace is not None and obj.get("metadata", {}).get("namespace") != self.namespace:
            return False
        return self.predicate is None or self.predicate(obj)

    def delivery(self, event: WatchEvent) -> str | None:
        """The event type this watcher sees: objects leaving or entering its selection become DELETED/ADDED."""
        now = self._matches(event.obj)
        if event.type != "MODIFIED" or event.old is None:
            return event.type if now else None
        before = self._matches(event.old)
        if now and before:
            return "MODIFIED"
        if now:
            return "ADDED"
        if before:
            return "DELETED"
        return None

    def offer(self, event: WatchEvent) -> None:
        delivered = self.delivery(event)
        if delivered is not None:
            self.queue.put_nowait((delivered, event))

    def close(self) -> None:
        self.queue.put_nowait(None)


@dataclass
class _Bucket:
    """The objects of one group/plural across versions, with their recent history for watch resumption."""

    history_limit: int
    objects: dict[str, dict[str, Obj]] = field(default_factory=dict)  # namespace ("" if cluster) -> name -> obj
    history: collections.deque[WatchEvent] = field(default_factory=collections.deque)
    dropped_through: int = 0  # watches from an older resourceVersion than this get 410 Gone
    watchers: set[Watcher] = field(default_factory=set)

    def record(self, event: WatchEvent) -> None:
        self.history.append(event)
        if len(self.history) > self.history_limit:
            self.dropped_through = self.history.popleft().resource_version
        for watcher in list(self.watchers):
            watcher.offer(event)

    def iter_objects(self, namespace: str | None) -> Iterator[Obj]:
        if namespace is not None:
            yield from self.objects.get(namespace, {}).values()
        else:
            for objects in self.objects.values():
                yield from objects.values()


class ObjectStore:
    """All objects of the emulated cluster, one global resourceVersion counter."""

    def __init__(
        self,
        *,
        kubelet: bool = True,
        history_limit: int = 10_000,
        validator_factory: ValidatorFactory | None = None,
    ) -> None:
        self.kubelet = kubelet
        self.history_limit = history_limit
        self.validator_factory = validator_factory
        self._resource_version = 0
        self._types: dict[tuple[str, str, str], ResourceType] = {}
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._uids: dict[str, ObjectKey] = {}
        self._dependents: dict[str, set[ObjectKey]] = collections.defaultdict(set)
        self._namespace_population: collections.Counter[str] = collections.Counter()
        self._service_ips = 0
        self.types_changed: list[Callable[[], None]] = []
        for rt in builtin_resource_types():
            self._register(rt)
        namespaces = self.resource_type("", "v1", "namespaces")
        for name in DEFAULT_NAMESPACES:
            self.create(namespaces, None, {"metadata": {"name": name}})

    # ---- resource types ------------------------------------------------------------------------------

    def _register(self, rt: ResourceType) -> None:
        self._types[(rt.group, rt.version, rt.plural)] = rt
        self._buckets.setdefault(rt.storage_key, _Bucket(self.history_limit))

    def resource_type(self, group: str, version: str, plural: str) -> ResourceType:
        rt = self._types.get((group, version, plural))
        if rt is None:
            raise APIError(404, "NotFound", "the server could not find the requested resource", {})
        return rt

    def find_resource_type(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._types.get((group, version, plural))

    def resource_types(self) -> list[ResourceType]:
        return list(self._types.values())

    def _bucket(self, rt: ResourceType) -> _Bucket:
        return self._buckets[rt.storage_key]

    @property
    def resource_version(self) -> str:
        return str(self._resource_version)

    def _next_resource_version(self) -> int:
        self._resource_version += 1
        return self._resource_version

    def _notify_types_changed(self) -> None:
        for callback in self.types_changed:
            callback()

    # ---- reads ---------------------------------------------------------------------------------------

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> Obj:
        obj = self._bucket(rt).objects.get(namespace or "", {}).get(name)
        if obj is None:
            raise not_found(rt, name)
        return obj

    def list_objects(self, rt: ResourceType, namespace: str | None, predicate: Filter | None,
             name: str | None = None) -> list[Obj]:
        bucket = self._bucket(rt)
        if name is not None:
            candidates: Iterable[Obj] = [
                objects[name] for ns, objects in bucket.objects.items()
                if (namespace is None or ns == namespace) and name in objects
            ]
        else:
            candidates = bucket.iter_objects(namespace if rt.namespaced else None)
        selected = [obj for obj in candidates if predicate is None or predicate(obj)]
        selected.sort(key=lambda obj: (obj["metadata"].get("namespace", ""), obj["metadata"]["name"]))
        return selected

    def watch(
        self, rt: ResourceType, namespace: str | None, predicate: Filter | None, since: int | None
    ) -> tuple[Watcher, list[tuple[str, WatchEvent]]] | None:
        """A registered watcher plus the events to send first; None when `since` is older than the history."""
        bucket = self._bucket(rt)
        watcher = Watcher(namespace if rt.namespaced else None, predicate)
        backlog: list[tuple[str, WatchEvent]] = []
        if since is None:
            for obj in self.list_objects(rt, watcher.namespace, predicate):
                rv = int(obj["metadata"]["resourceVersion"])
                backlog.append(("ADDED", WatchEvent("ADDED", obj, None, rv)))
        else:
            if since < bucket.dropped_through:
                return None
            for event in bucket.history:
                if event.resource_version > since:
                    delivered = watcher.delivery(event)
                    if delivered is not None:
                        backlog.append((delivered, event))
        bucket.watchers.add(watcher)
        return watcher, backlog

    def unwatch(self, rt: ResourceType, watcher: Watcher) -> None:
        self._bucket(rt).watchers.discard(watcher)

    def close_watchers(self) -> None:
        for bucket in self._buckets.values():
            for watcher in bucket.watchers:
                watcher.close()
            bucket.watchers.clear()

    # ---- writes --------------------------------------------------------------------------------------

    def _store(self, rt: ResourceType, obj: Obj, event_type: str, old: Obj | None) -> Obj:
        """Give `obj` a new resourceVersion, store it, index it and tell the watchers."""
        rv = self._next_resource_version()
        meta = dict(obj["metadata"])
        meta["resourceVersion"] = str(rv)
        obj = {**obj, "metadata": meta}
        namespace, name = meta.get("namespace", ""), meta["name"]
        bucket = self._bucket(rt)
        key: ObjectKey = (rt.storage_key, namespace, name)
        if event_type == "DELETED":
            bucket.objects.get(namespace, {}).pop(name, None)
            if namespace and not bucket.objects.get(namespace):
                bucket.objects.pop(namespace, None)
            self._uids.pop(meta["uid"], None)
            self._index_owners(key, old, None)
            if namespace:
                self._namespace_population[namespace] -= 1
        else:
            bucket.objects.setdefault(namespace, {})[name] = obj
            self._uids[meta["uid"]] = key
            self._index_owners(key, old, obj)
            if namespace and old is None:
                self._namespace_population[namespace] += 1
        bucket.record(WatchEvent(event_type, obj, old, rv))
        return obj

    def _index_owners(self, key: ObjectKey, old: Obj | None, new: Obj | None) -> None:
        old_owners = {ref.get("uid") for ref in (old or {}).get("metadata", {}).get("ownerReferences") or []}
        new_owners = {ref.get("uid") for ref in (new or {}).get("metadata", {}).get("ownerReferences") or []}
        for uid in old_owners - new_owners:
            dependents = self._dependents.get(uid)
            if dependents is not None:
                dependents.discard(key)
                if not dependents:
                    del self._dependents[uid]
        for uid in new_owners - old_owners:
            if uid:
                self._dependents[uid].add(key)

    def _lookup(self, key: ObjectKey) -> tuple[ResourceType, Obj] | None:
        storage_key, namespace, name = key
        bucket = self._buckets.get(storage_key)
        obj = None if bucket is None else bucket.objects.get(namespace, {}).get(name)
        if obj is None:
            return None
        return self._storage_type(storage_key), obj

    def _storage_type(self, storage_key: tuple[str, str]) -> ResourceType:
        for rt in self._types.values():
            if rt.storage_key == storage_key and rt.storage_group is None:
                return rt
        raise KeyError(storage_key)

    def _prepare_input(self, rt: ResourceType, body: Any) -> Obj:
        if not isinstance(body, dict):
            raise bad_request("the body of the request was in an unknown format")
        if rt.to_storage is not None:
            body = rt.to_storage(body)
        api_version, kind = body.get("apiVersion"), body.get("kind")
        storage_rt = rt if rt.to_storage is None else self._storage_type(rt.storage_key)
        if api_version and api_version != rt.api_version and rt.to_storage is None:
            other = api_version.rsplit("/", 1)
            other_group = other[0] if len(other) == 2 else ""
            if other_group != rt.group:
                raise bad_request(
                    f"the API version in the data ({api_version}) does not match the expected API version "
                    f"({rt.api_version})"
                )
        if kind and kind != storage_rt.kind:
            raise bad_request(f"the kind in the data ({kind}) does not match the expected kind ({storage_rt.kind})")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise bad_request("metadata must be an object")
        return {**body, "apiVersion": storage_rt.api_version if rt.to_storage else rt.api_version,
                "kind": storage_rt.kind, "metadata": dict(metadata or {})}

    def _check_name(self, rt: ResourceType, name: str) -> None:
        pattern, what = {
            "label": (_LABEL_1123, "a lowercase RFC 1123 label"),
            "label1035": (_LABEL_1035, "a DNS-1035 label"),
        }.get(rt.name_rule, (_SUBDOMAIN, "a lowercase RFC 1123 subdomain"))
        limit = 253 if rt.name_rule == "subdomain" else 63
        if len(name) > limit or not pattern.match(name):
            raise invalid(rt, name, [(
                "FieldValueInvalid", "metadata.name",
                f'Invalid value: "{name}": {what} must consist of lower case alphanumeric characters, \'-\''
                + (" or '.'" if rt.name_rule == "subdomain" else "")
                + ", and must start and end with an alphanumeric character",
            )])

    def _check_namespace(self, rt: ResourceType, namespace: str | None) -> None:
        if not rt.namespaced:
            return
        if not namespace:
            raise bad_request("the server could not find the requested resource: a namespace is required")
        namespace_obj = self._buckets[("", "namespaces")].objects.get("", {}).get(namespace)
        if namespace_obj is None:
            raise APIError(404, "NotFound", f'namespaces "{namespace}" not found',
                           {"name": namespace, "kind": "namespaces"})
        if namespace_obj["metadata"].get("deletionTimestamp"):
            raise APIError(
                403, "Forbidden",
                f"unable to create new content in namespace {namespace} because it is being terminated",
                {"name": namespace, "kind": "namespaces",
                 "causes": [{"reason": "NamespaceTerminating", "field": "metadata.namespace",
                             "message": f"namespace {namespace} is being terminated"}]},
            )

    def _validate_custom(self, rt: ResourceType, obj: Obj, old: Obj | None, strict: bool) -> Obj:
        """Defaults, then unknown fields (rejected when strict, else dropped as by default), schema and CEL."""
        validator = rt.validator if old is None else rt.validator_for_update(old, obj)
        if validator is None:
            return obj
        obj = validator.apply_defaults(obj)
        if not strict:
            obj = validator.prune(obj)
        errors = validator.validate(obj, old, reject_unknown=strict)
        if errors:
            raise invalid(rt, obj["metadata"].get("name", ""), [
                (error.reason, error.field, error.message) for error in errors
            ])
        return obj

    def create(self, rt: ResourceType, namespace: str | None, body: Any, *, dry_run: bool = False,
               strict: bool = False) -> Obj:
        if "create" not in rt.verbs:
            raise APIError(405, "MethodNotAllowed", f"create is not supported on resources of kind {rt.kind!r}")
        obj = self._prepare_input(rt, body)
        meta = obj["metadata"]
        if rt.namespaced:
            body_namespace = meta.get("namespace")
            if namespace and body_namespace and body_namespace != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            namespace = namespace or body_namespace
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
            namespace = None
        bucket = self._bucket(rt)
        existing = bucket.objects.get(namespace or "", {})
        if not meta.get("name"):
            prefix = meta.get("generateName")
            if not prefix:
                raise invalid(rt, "", [("FieldValueRequired", "metadata.name",
                                        "Required value: name or generateName is required")])
            while True:
                candidate = prefix + "".join(random.choices(_GENERATE_ALPHABET, k=5))
                if candidate not in existing:
                    meta["name"] = candidate
                    break
        name = meta["name"]
        self._check_name(rt, name)
        self._check_namespace(rt, namespace)
        if name in existing:
            details: Obj = {"name": name, "kind": rt.plural}
            if rt.group:
                details["group"] = rt.group
            raise APIError(409, "AlreadyExists", f'{rt.group_resource} "{name}" already exists', details)
        for key in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion", "selfLink",
                    "managedFields"):
            meta.pop(key, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_timestamp()
        meta["generation"] = 1
        if rt.has_status and rt.printer_columns is not None:
            obj.pop("status", None)  # custom resources with a status subresource ignore status on create
        obj = self._defaults_on_create(rt, obj)
        obj = self._validate_custom(rt, obj, None, strict)
        if rt.storage_key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            obj = self._accept_crd(obj, dry_run=dry_run)
        if dry_run:
            return obj
        stored = self._store(rt, obj, "ADDED", None)
        self._check_dangling_owners(stored)
        return stored

    def _defaults_on_create(self, rt: ResourceType, obj: Obj) -> Obj:
        key = rt.storage_key
        if key == ("", "pods"):
            spec = dict(obj.get("spec") or {})
            spec.setdefault("restartPolicy", "Always")
            spec.setdefault("terminationGracePeriodSeconds", 30)
            spec.setdefault("dnsPolicy", "ClusterFirst")
            spec.setdefault("schedulerName", "default-scheduler")
            obj["spec"] = spec
            obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}
        elif key == ("", "services"):
            spec = dict(obj.get("spec") or {})
            spec.setdefault("type", "ClusterIP")
            if not spec.get("clusterIP"):
                self._service_ips += 1
                spec["clusterIP"] = f"10.96.{self._service_ips // 250}.{self._service_ips % 250 + 1}"
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
            obj["spec"] = spec
        elif key == ("", "namespaces"):
            obj["metadata"]["labels"] = {
                **(obj["metadata"].get("labels") or {}), "kubernetes.io/metadata.name": obj["metadata"]["name"]
            }
            obj["spec"] = {"finalizers": ["kubernetes"]}
            obj["status"] = {"phase": "Active"}
        elif key == ("", "secrets"):
            obj = self._secret_string_data(obj)
            obj.setdefault("type", "Opaque")
        return obj

    @staticmethod
    def _secret_string_data(obj: Obj) -> Obj:
        string_data = obj.pop("stringData", None)
        if string_data:
            data = dict(obj.get("data") or {})
            for key, value in string_data.items():
                data[key] = base64.b64encode(str(value).encode()).decode()
            obj["data"] = data
        return obj

    def _accept_crd(self, crd: Obj, *, dry_run: bool) -> Obj:
        try:
            types = resource_types_from_crd(crd, self.validator_factory)
        except CRDError as exc:
            crd_rt = self.resource_type("apiextensions.k8s.io", "v1", "customresourcedefinitions")
            raise invalid(crd_rt, crd["metadata"].get("name", ""), [
                ("FieldValueInvalid", exc.field_path, exc.message)
            ]) from exc
        spec = crd.get("spec") or {}
        names = dict(spec.get("names") or {})
        names.setdefault("singular", names.get("kind", "").lower())
        names.setdefault("listKind", f"{names.get('kind')}List")
        stamp = now_timestamp()
        crd = {**crd, "status": {
            "acceptedNames": names,
            "storedVersions": [v["name"] for v in spec.get("versions") or [] if v.get("storage")],
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                 "message": "no conflicts found", "lastTransitionTime": stamp},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                 "message": "the initial names have been accepted", "lastTransitionTime": stamp},
            ],
        }}
        if not dry_run:
            crd_name = crd["metadata"]["name"]
            for key, rt in list(self._types.items()):
                if rt.crd_name == crd_name:
                    del self._types[key]
            for rt in types:
                self._register(rt)
            self._notify_types_changed()
        return crd

    def _check_dangling_owners(self, obj: Obj) -> None:
        """Objects whose owners are all gone are garbage, as the real garbage collector decides."""
        refs = obj["metadata"].get("ownerReferences") or []
        if not refs or any(ref.get("uid") in self._uids for ref in refs):
            return
        key: ObjectKey = self._uids[obj["metadata"]["uid"]]

        def collect() -> None:
            found = self._lookup(key)
            if found is None:
                return
            rt, current = found
            refs_now = current["metadata"].get("ownerReferences") or []
            if refs_now and not any(ref.get("uid") in self._uids for ref in refs_now):
                self._request_deletion(rt, current, DeleteOptions())

        # After this request's response, so that the creator sees its object as a real server would show it.
        try:
            asyncio.get_running_loop().call_soon(collect)
        except RuntimeError:
            collect()

    # ---- updates -------------------------------------------------------------------------------------

    def update(self, rt: ResourceType, namespace: str | None, name: str, body: Any, *,
               subresource: str | None = None, dry_run: bool = False, strict: bool = False) -> Obj:
        current = self.get(rt, namespace, name)
        obj = self._prepare_input(rt, body)
        meta = obj["metadata"]
        if meta.get("name") and meta["name"] != name:
            raise bad_request(f"the name of the object ({meta['name']}) does not match the name on the URL ({name})")
        if rt.namespaced and meta.get("namespace") and meta["namespace"] != namespace:
            raise bad_request("the namespace of the provided object does not match the namespace sent on the request")
        expected = meta.get("resourceVersion")
        if expected and expected != current["metadata"]["resourceVersion"]:
            raise _conflict(rt, name)
        return self._commit_update(rt, current, obj, subresource=subresource, dry_run=dry_run, strict=strict)

    def patch(self, rt: ResourceType, namespace: str | None, name: str, patch_type: str, patch: Any, *,
              subresource: str | None = None, dry_run: bool = False, strict: bool = False) -> Obj:
        try:
            current = self.get(rt, namespace, name)
        except APIError:
            if patch_type == "application/apply-patch+yaml":
                # Server-side apply of an absent object creates it (without field ownership tracking).
                body = dict(patch) if isinstance(patch, dict) else patch
                if isinstance(body, dict):
                    body["metadata"] = {**(body.get("metadata") or {}), "name": name}
                return self.create(rt, namespace, body, dry_run=dry_run, strict=strict)
            raise
        view = rt.output(current)
        try:
            if patch_type == "application/json-patch+json":
                patched = json_patch(view, patch)
            elif patch_type == "application/merge-patch+json":
                patched = merge_patch(view, patch)
            elif patch_type in ("application/strategic-merge-patch+json", "application/apply-patch+yaml"):
                # Custom resources have no patch strategies: their lists are replaced, as in a merge patch.
                custom = rt.printer_columns is not None
                patched = merge_patch(view, patch) if custom else strategic_merge_patch(view, patch)
            else:
                raise APIError(415, "UnsupportedMediaType", f"the media type {patch_type!r} is not supported")
        except PatchError as exc:
            if exc.unprocessable:
                raise APIError(422, "Invalid", str(exc)) from exc
            raise bad_request(str(exc)) from exc
        if not isinstance(patched, dict):
            raise bad_request("the patch does not produce an object")
        patched_meta = patched.get("metadata") or {}
        expected = patched_meta.get("resourceVersion")
        if expected and expected != current["metadata"]["resourceVersion"]:
            raise _conflict(rt, name)
        if patched_meta.get("name") != name:
            raise bad_request("metadata.name cannot be changed by a patch")
        obj = self._prepare_input(rt, patched)
        return self._commit_update(rt, current, obj, subresource=subresource, dry_run=dry_run, strict=strict)

    def _commit_update(self, rt: ResourceType, current: Obj, obj: Obj, *, subresource: str | None,
                       dry_run: bool, strict: bool) -> Obj:
        current_meta = current["metadata"]
        if subresource == "status":
            # The status subresource changes the status and nothing else.
            obj = {**current, "status": obj.get("status")} if obj.get("status") is not None else {
                key: value for key, value in current.items() if key != "status"
            }
        else:
            if rt.has_status:
                obj = {key: value for key, value in obj.items() if key != "status"}
                if "status" in current:
                    obj["status"] = current["status"]
            meta = obj["metadata"]
            for key in _SYSTEM_METADATA + ("namespace", "name"):
                if key in current_meta:
                    meta[key] = current_meta[key]
                else:
                    meta.pop(key, None)
            meta.pop("managedFields", None)
            meta.pop("selfLink", None)
            if current_meta.get("deletionTimestamp"):
                added = set(meta.get("finalizers") or []) - set(current_meta.get("finalizers") or [])
                if added:
                    raise invalid(rt, current_meta["name"], [(
                        "FieldValueForbidden", "metadata.finalizers",
                        f"Forbidden: no new finalizers can be added if the object is being deleted, found new "
                        f"finalizers {sorted(added)}",
                    )])
            if rt.storage_key == ("", "secrets"):
                obj = self._secret_string_data(obj)
            if rt.storage_key == ("", "pods"):
                self._check_pod_update(rt, current, obj)
        obj["metadata"] = {**obj["metadata"], "resourceVersion": current_meta["resourceVersion"]}
        obj = self._validate_custom(rt, obj, current, strict)
        if obj == current:
            return current  # a no-op write keeps the resourceVersion and wakes no watcher, as on the real server
        ignored = ("metadata", "status") if rt.has_status else ("metadata",)
        if any(obj.get(key) != current.get(key) for key in set(obj) | set(current) if key not in ignored):
            obj["metadata"] = {**obj["metadata"], "generation": int(current_meta.get("generation", 1)) + 1}
        if rt.storage_key == ("apiextensions.k8s.io", "customresourcedefinitions") and subresource != "status":
            obj = self._accept_crd(obj, dry_run=dry_run)
        if dry_run:
            return obj
        meta = obj["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and not meta.get("deletionGracePeriodSeconds"):
            return self._remove(rt, obj, old=current)
        return self._store(rt, obj, "MODIFIED", current)

    def bind(self, rt: ResourceType, namespace: str | None, name: str, node_name: str) -> Obj:
        """pods/binding: the scheduler's one way to set spec.nodeName, once."""
        current = self.get(rt, namespace, name)
        bound = (current.get("spec") or {}).get("nodeName")
        if bound:
            raise APIError(409, "Conflict", f'Operation cannot be fulfilled on pods/binding "{name}": pod {name} is '
                           f"already assigned to node \"{bound}\"", {"name": name, "kind": "pods"})
        if current["metadata"].get("deletionTimestamp"):
            raise APIError(409, "Conflict", f'pod "{name}" is being deleted, cannot be assigned to a host',
                           {"name": name, "kind": "pods"})
        obj = {**current, "spec": {**(current.get("spec") or {}), "nodeName": node_name}}
        return self._store(rt, obj, "MODIFIED", current)

    @staticmethod
    def _check_pod_update(rt: ResourceType, current: Obj, obj: Obj) -> None:
        def comparable(spec: Any) -> Any:
            spec = dict(spec or {})
            for key in ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds", "schedulingGates"):
                spec.pop(key, None)
            for key in ("containers", "initContainers"):
                spec[key] = [{**container, "image": None} for container in spec.get(key) or []]
            return spec

        if comparable(obj.get("spec")) != comparable(current.get("spec")):
            raise invalid(rt, current["metadata"]["name"], [(
                "FieldValueForbidden", "spec",
                "Forbidden: pod updates may not change fields other than `spec.containers[*].image`, "
                "`spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` (only additions "
                "to existing tolerations), `spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was "
                "previously negative)",
            )])

    # ---- deletion ------------------------------------------------------------------------------------

    def delete(self, rt: ResourceType, namespace: str | None, name: str, options: DeleteOptions) -> Obj:
        current = self.get(rt, namespace, name)
        meta = current["metadata"]
        if options.precondition_uid and options.precondition_uid != meta["uid"]:
            raise _conflict(rt, name)
        if options.precondition_resource_version and options.precondition_resource_version != meta["resourceVersion"]:
            raise _conflict(rt, name)
        if rt.storage_key == ("", "namespaces") and name in _UNDELETABLE_NAMESPACES:
            raise APIError(403, "Forbidden", f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                           {"name": name, "kind": "namespaces"})
        if options.dry_run:
            return current
        return self._request_deletion(rt, current, options)

    def delete_collection(self, rt: ResourceType, namespace: str | None, predicate: Filter | None,
                          options: DeleteOptions) -> list[Obj]:
        if "deletecollection" not in rt.verbs:
            raise APIError(405, "MethodNotAllowed", f"deletecollection is not supported on {rt.group_resource}")
        victims = self.list_objects(rt, namespace, predicate)
        if options.dry_run:
            return victims
        return [self._request_deletion(rt, obj, options) for obj in victims
                if self._lookup((rt.storage_key, obj["metadata"].get("namespace", ""), obj["metadata"]["name"]))]

    def _request_deletion(self, rt: ResourceType, current: Obj, options: DeleteOptions) -> Obj:
        """Graceful deletion, finalizers and propagation, as the real registry and garbage collector do."""
        meta = current["metadata"]
        policy = options.propagation_policy or "Background"
        if policy == "Orphan":
            self._orphan_dependents(meta["uid"])
        if rt.storage_key == ("", "pods") and self.kubelet:
            grace = options.grace_period_seconds
            if grace is None:
                grace = int((current.get("spec") or {}).get("terminationGracePeriodSeconds", 30))
            terminal = (current.get("status") or {}).get("phase") in _TERMINAL_POD_PHASES
            if grace > 0 and not terminal:
                # The kubelet stops the containers and then deletes the pod with gracePeriodSeconds=0.
                existing = meta.get("deletionGracePeriodSeconds")
                if meta.get("deletionTimestamp") and existing is not None and existing <= grace:
                    return current
                new_meta = {**meta, "deletionTimestamp": now_timestamp(grace), "deletionGracePeriodSeconds": grace}
                return self._store(rt, {**current, "metadata": new_meta}, "MODIFIED", current)
        if rt.storage_key == ("", "namespaces"):
            return self._delete_namespace(rt, current)
        finalizers = list(meta.get("finalizers") or [])
        if policy == "Foreground" and self._dependents.get(meta["uid"]) and "foregroundDeletion" not in finalizers:
            finalizers.append("foregroundDeletion")
        if finalizers:
            if meta.get("deletionTimestamp") and meta.get("finalizers") == finalizers and not meta.get(
                    "deletionGracePeriodSeconds"):
                return current
            new_meta = {**meta, "finalizers": finalizers, "deletionGracePeriodSeconds": 0,
                        "deletionTimestamp": meta.get("deletionTimestamp") or now_timestamp()}
            stored = self._store(rt, {**current, "metadata": new_meta}, "MODIFIED", current)
            if "foregroundDeletion" in finalizers:
                self._delete_dependents(meta["uid"], DeleteOptions(propagation_policy="Foreground"))
                self._finish_foreground(meta["uid"])
            return stored
        final = current
        if not meta.get("deletionTimestamp"):
            final = {**current, "metadata": {**meta, "deletionTimestamp": now_timestamp(),
                                             "deletionGracePeriodSeconds": 0}}
        return self._remove(rt, final, old=current)

    def _remove(self, rt: ResourceType, obj: Obj, *, old: Obj) -> Obj:
        removed = self._store(rt, obj, "DELETED", old)
        meta = removed["metadata"]
        uid = meta["uid"]
        if rt.storage_key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            self._drop_crd(meta["name"])
        self._delete_dependents(uid, DeleteOptions())
        for ref in meta.get("ownerReferences") or []:
            self._finish_foreground(ref.get("uid"))
        namespace = meta.get("namespace")
        if namespace and self._namespace_population[namespace] <= 0:
            self._finish_namespace(namespace)
        return removed

    def _dependents_of(self, uid: str) -> list[tuple[ResourceType, Obj]]:
        found = []
        for key in sorted(self._dependents.get(uid, ())):
            item = self._lookup(key)
            if item is not None:
                found.append(item)
        return found

    def _delete_dependents(self, owner_uid: str, options: DeleteOptions) -> None:
        for rt, dependent in self._dependents_of(owner_uid):
            refs = dependent["metadata"].get("ownerReferences") or []
            others = [ref for ref in refs if ref.get("uid") != owner_uid and ref.get("uid") in self._uids]
            if others:
                # Still owned by someone alive: the garbage collector only drops the dead owner's reference.
                kept = [ref for ref in refs if ref.get("uid") != owner_uid]
                self._store(rt, {**dependent, "metadata": {**dependent["metadata"], "ownerReferences": kept}},
                            "MODIFIED", dependent)
            elif not dependent["metadata"].get("deletionTimestamp") or options.propagation_policy == "Foreground":
                self._request_deletion(rt, dependent, options)

    def _orphan_dependents(self, owner_uid: str) -> None:
        for rt, dependent in self._dependents_of(owner_uid):
            refs = dependent["metadata"].get("ownerReferences") or []
            kept = [ref for ref in refs if ref.get("uid") != owner_uid]
            self._store(rt, {**dependent, "metadata": {**dependent["metadata"], "ownerReferences": kept}},
                        "MODIFIED", dependent)

    def _finish_foreground(self, owner_uid: str | None) -> None:
        """An owner deleted in the foreground goes once its last dependent is gone."""
        if not owner_uid or owner_uid not in self._uids or self._dependents.get(owner_uid):
            return
        found = self._lookup(self._uids[owner_uid])
        if found is None:
            return
        rt, owner = found
        finalizers = owner["metadata"].get("finalizers") or []
        if "foregroundDeletion" not in finalizers or not owner["metadata"].get("deletionTimestamp"):
            return
        remaining = [item for item in finalizers if item != "foregroundDeletion"]
        updated = {**owner, "metadata": {**owner["metadata"], "finalizers": remaining}}
        if remaining:
            self._store(rt, updated, "MODIFIED", owner)
        else:
            self._remove(rt, updated, old=owner)

    def _delete_namespace(self, rt: ResourceType, namespace_obj: Obj) -> Obj:
        name = namespace_obj["metadata"]["name"]
        current = namespace_obj
        if not namespace_obj["metadata"].get("deletionTimestamp"):
            current = self._store(rt, {
                **namespace_obj,
                "metadata": {**namespace_obj["metadata"], "deletionTimestamp": now_timestamp(),
                             "deletionGracePeriodSeconds": 0},
                "status": {"phase": "Terminating"},
            }, "MODIFIED", namespace_obj)
        for storage_key, bucket in list(self._buckets.items()):
            objects = list(bucket.objects.get(name, {}).values())
            if not objects:
                continue
            content_rt = self._storage_type(storage_key)
            for obj in objects:
                if not obj["metadata"].get("deletionTimestamp"):
                    self._request_deletion(content_rt, obj, DeleteOptions())
        if self._namespace_population[name] <= 0:
            self._finish_namespace(name)
            return self._buckets[("", "namespaces")].objects.get("", {}).get(name, current)
        return current

    def _finish_namespace(self, name: str) -> None:
        namespaces = self._buckets[("", "namespaces")]
        namespace_obj = namespaces.objects.get("", {}).get(name)
        if namespace_obj is None or not namespace_obj["metadata"].get("deletionTimestamp"):
            return
        self._namespace_population.pop(name, None)
        rt = self._storage_type(("", "namespaces"))
        final = {**namespace_obj, "spec": {"finalizers": []}}
        self._remove(rt, final, old=namespace_obj)

    def _drop_crd(self, crd_name: str) -> None:
        types = [rt for rt in self._types.values() if rt.crd_name == crd_name]
        if not types:
            return
        rt = types[0]
        bucket = self._buckets.get(rt.storage_key)
        if bucket is not None:
            # The real server deletes the custom objects before the CRD goes; they go at once here.
            for obj in list(bucket.iter_objects(None)):
                self._remove(rt, obj, old=obj)
            for watcher in bucket.watchers:
                watcher.close()
            del self._buckets[rt.storage_key]
        for key in [key for key, item in self._types.items() if item.crd_name == crd_name]:
            del self._types[key]
        self._notify_types_changed()

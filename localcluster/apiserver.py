"""A Kubernetes API server stand-in on 127.0.0.1, good enough for real kopf, kubectl and the kubernetes client.

It began as kmock's KubernetesEmulator and keeps its idea (an in-memory object store served over real HTTP by
aiohttp), but every part is replaced here: kmock scans all objects on each request, keeps every version of every
object and every request forever, has no resourceVersion, uid or generation, cannot resume a watch, and serves
through a test server that patches aiohttp's DNS resolution process-wide. See apiserver_store.py for the object
semantics, apiserver_resources.py for discovery and apiserver_tables.py for `kubectl get` tables.

    async with APIServer() as server:          # or: with running_apiserver() as server: (background thread)
        server.install_crds("crds/")
        write_kubeconfig("kubeconfig", server.url)
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import json
import logging
import os
import pathlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import yaml
from aiohttp import web

from localcluster.apiserver_protobuf import ProtobufError, decode_object
from localcluster.apiserver_resources import (
    ResourceType,
    ValidatorFactory,
    aggregated_discovery,
    encode,
    group_versions,
    legacy_group,
    legacy_group_list,
    legacy_resource_list,
    openapi_v3_document,
    openapi_v3_path,
    openapi_v3_root,
)
from localcluster.apiserver_selectors import FieldSelector, SelectorError, build_filter
from localcluster.apiserver_store import (
    APIError,
    DeleteOptions,
    ObjectStore,
    Watcher,
    WatchEvent,
    bad_request,
)
from localcluster.apiserver_tables import build_table
from localcluster.crd_validation import CRDValidator

__all__ = [
    "APIError",
    "APIServer",
    "LogProvider",
    "load_crd_documents",
    "running_apiserver",
    "write_kubeconfig",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
LogChunks = bytes | str | AsyncIterator[bytes]
# (namespace, pod, container, follow, tail_lines) -> the log bytes, or chunks as they come when following.
LogProvider = Callable[[str, str, str, bool, int | None], LogChunks | Awaitable[LogChunks]]

SERVER_VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.0-localcluster",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.23.4",
    "compiler": "gc",
    "platform": "linux/amd64",
}
_JSON = "application/json"
_DISCOVERY_V2 = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
_DISCOVERY_V2BETA1 = "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList"
_PATCH_TYPES = frozenset({
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/apply-patch+yaml",
})


def load_crd_documents(path_or_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """CustomResourceDefinition documents from one YAML file or every *.yaml/*.yml file of a folder."""
    path = pathlib.Path(path_or_dir)
    files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
    documents: list[dict[str, Any]] = []
    for file in files:
        for document in yaml.safe_load_all(file.read_text()):
            if isinstance(document, dict) and document.get("kind") == "CustomResourceDefinition":
                documents.append(document)
    return documents


def write_kubeconfig(path: str | os.PathLike[str], url: str, *, namespace: str = "default") -> pathlib.Path:
    """A kubeconfig for kubectl, kopf and the kubernetes client pointing at a plain-HTTP server URL."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "localcluster", "cluster": {"server": url}}],
        "users": [{"name": "localcluster", "user": {"token": "localcluster"}}],
        "contexts": [{"name": "localcluster",
                      "context": {"cluster": "localcluster", "user": "localcluster", "namespace": namespace}}],
        "current-context": "localcluster",
        "preferences": {},
    }
    target = pathlib.Path(path)
    target.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def _wants(request: web.BaseRequest, marker: str) -> bool:
    return marker in request.headers.get("Accept", "")


def _json_response(body: Any, status: int = 200, content_type: str = _JSON) -> web.Response:
    return web.Response(body=encode(body), status=status, headers={"Content-Type": content_type})


def _error_response(error: APIError) -> web.Response:
    return _json_response(error.status(), status=error.code)


def _int_param(request: web.BaseRequest, name: str) -> int | None:
    value = request.query.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise bad_request(f"invalid value for {name}: {value!r}") from exc


def _true(value: str | None) -> bool:
    return value is not None and value.lower() in ("true", "1")


class _Route:
    """A resource URL taken apart: /api/v1/namespaces/ns/pods/name/status and friends."""

    __slots__ = ("group", "version", "namespace", "plural", "name", "subresource", "legacy_watch")

    def __init__(self, group: str, version: str, parts: list[str]) -> None:
        self.group, self.version = group, version
        self.legacy_watch = bool(parts) and parts[0] == "watch"
        if self.legacy_watch:
            parts = parts[1:]
        self.namespace: str | None = None
        self.subresource: str | None = None
        self.name: str | None = None
        if len(parts) >= 3 and parts[0] == "namespaces" and parts[2] not in ("status", "finalize"):
            self.namespace = parts[1]
            parts = parts[2:]
        self.plural = parts[0] if parts else ""
        if len(parts) >= 2:
            self.name = parts[1]
        if len(parts) >= 3:
            self.subresource = "/".join(parts[2:])


class APIServer:
    """The API server on one event loop: `await start()` / `await stop()`, or `async with`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        kubelet: bool = True,
        history_limit: int = 10_000,
        bookmark_interval: float = 30.0,
        validator_factory: ValidatorFactory | None = CRDValidator,
    ) -> None:
        """`kubelet=False` deletes pods at once; with a kubelet, a deleted pod waits for the kubelet's
        DELETE with gracePeriodSeconds=0. `validator_factory(openAPIV3Schema, kind, group)` validates custom
        objects (None: no validation). `bookmark_interval` paces BOOKMARK events to idle watches that ask."""
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the API emulator has no authentication: it binds to the loopback interface only")
        self.host = host
        self.port = port
        self.bookmark_interval = bookmark_interval
        self.store = ObjectStore(kubelet=kubelet, history_limit=history_limit, validator_factory=validator_factory)
        self.store.types_changed.append(self._forget_discovery)
        self.log_provider: LogProvider | None = None
        self._runner: web.ServerRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._discovery_cache: dict[str, bytes] = {}
        self._streams: set[asyncio.Task[Any]] = set()

    # ---- life cycle ----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        server = web.Server(self._handle, handler_cancellation=True, access_log=None)
        self._runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        for address in self._runner.addresses:
            if isinstance(address, tuple):
                self.port = int(address[1])
                break
        logger.info("API server emulator listening on %s", self.url)

    async def stop(self) -> None:
        self.store.close_watchers()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> APIServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.stop()

    def call(self, function: Callable[[], T]) -> T:
        """Run `function` on the server's loop (the store is not thread-safe) and return its result."""
        loop = self._loop
        if loop is None or not loop.is_running():
            return function()
        try:
            if asyncio.get_running_loop() is loop:
                return function()
        except RuntimeError:
            pass
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(function())
            except BaseException as exc:  # handed over to the calling thread
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(timeout=30)

    def install_crds(self, path_or_dir: str | os.PathLike[str]) -> list[str]:
        """Create (or update) the CRDs in a YAML file or folder; their resources are served at once."""
        documents = load_crd_documents(path_or_dir)
        return self.call(functools.partial(self._apply_crds, documents))

    def _apply_crds(self, documents: list[dict[str, Any]]) -> list[str]:
        rt = self.store.resource_type("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        names = []
        for document in documents:
            name = document["metadata"]["name"]
            try:
                current = self.store.get(rt, None, name)
            except APIError:
                self.store.create(rt, None, document)
            else:
                body = {**document, "metadata": {**document["metadata"],
                                                 "resourceVersion": current["metadata"]["resourceVersion"]}}
                self.store.update(rt, None, name, body)
            names.append(name)
        return names

    def set_log_provider(self, provider: LogProvider | None) -> None:
        """The kubelet's source of `kubectl logs`; it is called on the server's event loop."""
        self.log_provider = provider

    # ---- dispatch ------------------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await self._dispatch(request)
        except APIError as error:
            return _error_response(error)
        except SelectorError as error:
            return _error_response(bad_request(str(error)))
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as error:
            logger.exception("API emulator failed on %s %s", request.method, request.path_qs)
            return _error_response(APIError(500, "InternalError", f"an error on the server: {error!r}"))

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        parts = [part for part in path.split("/") if part]
        if parts[:1] == ["api"] and len(parts) >= 2:
            if len(parts) == 2:
                return self._serve_resource_list("", parts[1])
            return await self._serve_resource(request, _Route("", parts[1], parts[2:]))
        if parts[:1] == ["apis"] and len(parts) >= 3:
            if len(parts) == 3:
                return self._serve_resource_list(parts[1], parts[2])
            return await self._serve_resource(request, _Route(parts[1], parts[2], parts[3:]))
        if request.method != "GET":
            raise APIError(405, "MethodNotAllowed", f"the server does not allow this method on {path}")
        if path == "/api":
            if _wants(request, "as=APIGroupDiscoveryList"):
                return self._serve_aggregated(request, core=True)
            return _json_response({"kind": "APIVersions", "versions": ["v1"],
                                   "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                                   "serverAddress": f"{self.host}:{self.port}"}]})
        if path == "/apis":
            if _wants(request, "as=APIGroupDiscoveryList"):
                return self._serve_aggregated(request, core=False)
            return _json_response(legacy_group_list(group_versions(self.store.resource_types())))
        if parts[:1] == ["apis"] and len(parts) == 2:
            versions = group_versions(self.store.resource_types()).get(parts[1])
            if not versions:
                raise APIError(404, "NotFound", "the server could not find the requested resource", {})
            return _json_response(legacy_group(parts[1], versions))
        if path == "/version":
            return _json_response(SERVER_VERSION)
        if path in ("/healthz", "/readyz", "/livez"):
            return web.Response(text="ok")
        if path == "/":
            return _json_response({"paths": ["/api", "/api/v1", "/apis", "/openapi/v3", "/version", "/healthz"]})
        if parts[:2] == ["openapi", "v3"]:
            return self._serve_openapi_v3("/".join(parts[2:]))
        raise APIError(404, "NotFound", "the server could not find the requested resource", {})

    # ---- discovery -----------------------------------------------------------------------------------

    def _forget_discovery(self) -> None:
        self._discovery_cache.clear()

    def _cached(self, key: str, build: Callable[[], Any]) -> bytes:
        cached = self._discovery_cache.get(key)
        if cached is None:
            cached = self._discovery_cache[key] = encode(build())
        return cached

    def _serve_resource_list(self, group: str, version: str) -> web.Response:
        types = [rt for rt in self.store.resource_types() if rt.group == group and rt.version == version]
        if not types:
            raise APIError(404, "NotFound", "the server could not find the requested resource", {})
        body = self._cached(f"list:{group}/{version}", lambda: legacy_resource_list(group, version, types))
        return web.Response(body=body, headers={"Content-Type": _JSON})

    def _serve_aggregated(self, request: web.BaseRequest, *, core: bool) -> web.Response:
        accept = request.headers.get("Accept", "")
        v2_index, beta_index = accept.find("v=v2;"), accept.find("v=v2beta1")
        use_beta = beta_index >= 0 and (v2_index < 0 or beta_index < v2_index)
        api_version = "apidiscovery.k8s.io/v2beta1" if use_beta else "apidiscovery.k8s.io/v2"
        body = self._cached(
            f"aggregated:{core}:{api_version}",
            lambda: aggregated_discovery(self.store.resource_types(), core=core, api_version=api_version),
        )
        return web.Response(body=body, headers={"Content-Type": _DISCOVERY_V2BETA1 if use_beta else _DISCOVERY_V2})

    def _openapi_document(self, path: str) -> bytes:
        types = [rt for rt in self.store.resource_types() if openapi_v3_path(rt) == path]
        return self._cached(f"openapi:{path}", lambda: openapi_v3_document(types))

    def _serve_openapi_v3(self, path: str) -> web.Response:
        types = self.store.resource_types()
        if not path:
            body = self._cached("openapi:root", lambda: openapi_v3_root(types, self._openapi_document))
            return web.Response(body=body, headers={"Content-Type": _JSON})
        if not any(openapi_v3_path(rt) == path for rt in types):
            raise APIError(404, "NotFound", "the server could not find the requested resource", {})
        return web.Response(body=self._openapi_document(path), headers={"Content-Type": _JSON})

    # ---- resources -----------------------------------------------------------------------------------

    async def _serve_resource(self, request: web.BaseRequest, route: _Route) -> web.StreamResponse:
        store = self.store
        rt = store.resource_type(route.group, route.version, route.plural)
        if rt.namespaced != (route.namespace is not None) and route.namespace is not None:
            raise APIError(404, "NotFound", "the server could not find the requested resource", {})
        namespace = route.namespace if rt.namespaced else None
        method = request.method
        query = request.query
        dry_run = query.get("dryRun") == "All"
        strict = query.get("fieldValidation") == "Strict"
        if route.subresource is not None:
            return await self._serve_subresource(request, rt, namespace, route)
        if route.name is None:
            if method == "GET":
                if _true(query.get("watch")) or route.legacy_watch:
                    return await self._serve_watch(request, rt, namespace, None)
                return self._serve_list(request, rt, namespace)
            if method == "POST":
                body = await self._read_body(request)
                return _json_response(rt.output(store.create(rt, namespace, body, dry_run=dry_run, strict=strict)),
                                      status=201)
            if method == "DELETE":
                predicate = build_filter(query.get("labelSelector"), query.get("fieldSelector"))
                options = await self._delete_options(request)
                deleted = store.delete_collection(rt, namespace, predicate, options)
                return _json_response({"kind": f"{rt.kind}List", "apiVersion": rt.api_version,
                                       "metadata": {"resourceVersion": store.resource_version},
                                       "items": [rt.output(obj) for obj in deleted]})
            raise APIError(405, "MethodNotAllowed", f"{method} is not supported on a collection")
        name = route.name
        if method == "GET":
            if _true(query.get("watch")) or route.legacy_watch:
                return await self._serve_watch(request, rt, namespace, name)
            obj = store.get(rt, namespace, name)
            if _wants(request, "as=Table"):
                return _json_response(build_table(rt, [rt.output(obj)], resource_version=store.resource_version,
                                                  include_object=query.get("includeObject", "Metadata")))
            return _json_response(rt.output(obj))
        if method == "PUT":
            body = await self._read_body(request)
            return _json_response(rt.output(store.update(rt, namespace, name, body, dry_run=dry_run,
                                                                   strict=strict)))
        if method == "PATCH":
            patch_type, body = await self._read_patch(request)
            return _json_response(rt.output(store.patch(rt, namespace, name, patch_type, body,
                                                                  dry_run=dry_run, strict=strict)))
        if method == "DELETE":
            options = await self._delete_options(request)
            result = store.delete(rt, namespace, name, options)
            return _json_response(rt.output(result), status=202 if self._exists(rt, namespace, name) else 200)
        raise APIError(405, "MethodNotAllowed", f"{method} is not supported on {rt.group_resource}")

    def _exists(self, rt: ResourceType, namespace: str | None, name: str) -> bool:
        try:
            self.store.get(rt, namespace, name)
        except APIError:
            return False
        return True

    async def _serve_subresource(self, request: web.BaseRequest, rt: ResourceType, namespace: str | None,
                                 route: _Route) -> web.StreamResponse:
        assert route.name is not None and route.subresource is not None
        name, subresource, method = route.name, route.subresource, request.method
        dry_run = request.query.get("dryRun") == "All"
        strict = request.query.get("fieldValidation") == "Strict"
        if subresource not in rt.subresources:
            raise APIError(404, "NotFound", "the server could not find the requested resource", {})
        if subresource == "status":
            if method == "GET":
                return _json_response(rt.output(self.store.get(rt, namespace, name)))
            if method == "PUT":
                body = await self._read_body(request)
                return _json_response(rt.output(self.store.update(rt, namespace, name, body, subresource="status",
                                                                  dry_run=dry_run, strict=strict)))
            if method == "PATCH":
                patch_type, body = await self._read_patch(request)
                return _json_response(rt.output(self.store.patch(rt, namespace, name, patch_type, body,
                                                                 subresource="status", dry_run=dry_run,
                                                                 strict=strict)))
        elif subresource == "log" and method == "GET":
            return await self._serve_log(request, rt, namespace or "", name)
        elif subresource == "binding" and method == "POST":
            body = await self._read_body(request)
            target = (body or {}).get("target") or {}
            if not target.get("name"):
                raise APIError(400, "BadRequest", "a Binding needs target.name", {})
            self.store.bind(rt, namespace, name, str(target["name"]))
            return _json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                   "code": 201}, status=201)
        elif subresource == "eviction" and method == "POST":
            body = await self._read_body(request)
            options = self._parse_delete_options(request, (body or {}).get("deleteOptions") or {})
            self.store.delete(rt, namespace, name, options)
            return _json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                                   "code": 201}, status=201)
        raise APIError(405, "MethodNotAllowed", f"{method} is not supported on {rt.plural}/{subresource}")

    async def _read_body(self, request: web.BaseRequest) -> Any:
        raw = await request.read()
        content_type = request.content_type
        if "protobuf" in content_type:
            try:
                return decode_object(raw)
            except ProtobufError as exc:
                raise APIError(415, "UnsupportedMediaType", str(exc)) from exc
        try:
            if "yaml" in content_type:
                return yaml.safe_load(raw)
            return json.loads(raw) if raw else None
        except (ValueError, yaml.YAMLError) as exc:
            raise bad_request(f"the body of the request could not be decoded: {exc}") from exc

    async def _read_patch(self, request: web.BaseRequest) -> tuple[str, Any]:
        patch_type = request.content_type
        if patch_type not in _PATCH_TYPES:
            raise APIError(415, "UnsupportedMediaType",
                           f"the body of the request was in an unknown format - accepted media types include: "
                           f"{', '.join(sorted(_PATCH_TYPES))}")
        return patch_type, await self._read_body(request)

    async def _delete_options(self, request: web.BaseRequest) -> DeleteOptions:
        body: Any = None
        if request.can_read_body:
            body = await self._read_body(request)
        return self._parse_delete_options(request, body if isinstance(body, dict) else {})

    @staticmethod
    def _parse_delete_options(request: web.BaseRequest, body: dict[str, Any]) -> DeleteOptions:
        query = request.query
        grace = _int_param(request, "gracePeriodSeconds")
        if body.get("gracePeriodSeconds") is not None:
            grace = int(body["gracePeriodSeconds"])
        policy = body.get("propagationPolicy") or query.get("propagationPolicy")
        orphan = body.get("orphanDependents", query.get("orphanDependents"))
        if policy is None and orphan in (True, "true"):
            policy = "Orphan"
        if policy not in (None, "Background", "Foreground", "Orphan"):
            raise bad_request(f"unsupported propagationPolicy {policy!r}")
        preconditions = body.get("preconditions") or {}
        dry_run = query.get("dryRun") == "All" or "All" in (body.get("dryRun") or [])
        return DeleteOptions(
            grace_period_seconds=grace,
            propagation_policy=policy,
            precondition_uid=preconditions.get("uid"),
            precondition_resource_version=preconditions.get("resourceVersion"),
            dry_run=dry_run,
        )

    def _serve_list(self, request: web.BaseRequest, rt: ResourceType, namespace: str | None) -> web.Response:
        query = request.query
        predicate = build_filter(query.get("labelSelector"), query.get("fieldSelector"))
        field_selector = query.get("fieldSelector")
        name = FieldSelector(field_selector).required_name() if field_selector else None
        items = [rt.output(obj) for obj in self.store.list_objects(rt, namespace, predicate, name)]
        resource_version = self.store.resource_version
        if _wants(request, "as=Table"):
            return _json_response(build_table(rt, items, resource_version=resource_version,
                                              include_object=query.get("includeObject", "Metadata")))
        return _json_response({"kind": f"{rt.kind}List", "apiVersion": rt.api_version,
                               "metadata": {"resourceVersion": resource_version}, "items": items})

    # ---- watch ---------------------------------------------------------------------------------------

    async def _serve_watch(self, request: web.BaseRequest, rt: ResourceType, namespace: str | None,
                           name: str | None) -> web.StreamResponse:
        query = request.query
        field_selector = query.get("fieldSelector") or ""
        if name is not None:
            field_selector = f"metadata.name={name}" + (f",{field_selector}" if field_selector else "")
        predicate = build_filter(query.get("labelSelector"), field_selector)
        raw_since = query.get("resourceVersion") or "0"
        try:
            since: int | None = None if raw_since == "0" else int(raw_since)
        except ValueError as exc:
            raise bad_request(f"invalid resourceVersion {raw_since!r}") from exc
        send_initial = _true(query.get("sendInitialEvents"))
        if send_initial:
            since = None
        timeout = _int_param(request, "timeoutSeconds")
        bookmarks = _true(query.get("allowWatchBookmarks"))
        as_table = _wants(request, "as=Table")
        include_object = query.get("includeObject", "Metadata")

        response = web.StreamResponse(headers={"Content-Type": _JSON})
        response.enable_chunked_encoding()
        await response.prepare(request)
        registered = self.store.watch(rt, namespace, predicate, since)
        if registered is None:
            gone = APIError(410, "Expired", f"too old resource version: {since} ({self.store.resource_version})")
            await response.write(encode({"type": "ERROR", "object": gone.status()}) + b"\n")
            await response.write_eof()
            return response
        watcher, backlog = registered
        view_id = id(rt)

        def line(delivered: str, event: WatchEvent) -> bytes:
            if as_table:
                table = build_table(rt, [rt.output(event.obj)], resource_version=str(event.resource_version),
                                    include_object=include_object)
                return encode({"type": delivered, "object": table}) + b"\n"
            key = (delivered, view_id)
            encoded = event.encoded.get(key)
            if encoded is None:
                encoded = event.encoded[key] = encode({"type": delivered, "object": rt.output(event.obj)}) + b"\n"
            return encoded

        def bookmark(initial_end: bool = False) -> bytes:
            metadata: dict[str, Any] = {"resourceVersion": self.store.resource_version}
            if initial_end:
                metadata["annotations"] = {"k8s.io/initial-events-end": "true"}
            return encode({"type": "BOOKMARK", "object": {"kind": rt.kind, "apiVersion": rt.api_version,
                                                          "metadata": metadata}}) + b"\n"

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        try:
            chunk = b"".join(line(delivered, event) for delivered, event in backlog)
            if send_initial:
                chunk += bookmark(initial_end=True)
            if chunk:
                await response.write(chunk)
            await self._pump(watcher, response, line, bookmark if bookmarks else None, deadline)
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self.store.unwatch(rt, watcher)
        with contextlib.suppress(ConnectionResetError, ConnectionError):
            await response.write_eof()
        return response

    async def _pump(self, watcher: Watcher, response: web.StreamResponse,
                    line: Callable[[str, WatchEvent], bytes], bookmark: Callable[[], bytes] | None,
                    deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        queue = watcher.queue
        while True:
            wait: float | None = self.bookmark_interval if bookmark is not None else None
            if deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                wait = remaining if wait is None else min(wait, remaining)
            try:
                async with asyncio.timeout(wait):
                    item = await queue.get()
            except TimeoutError:
                if bookmark is not None and (deadline is None or loop.time() < deadline):
                    await response.write(bookmark())
                continue
            if item is None:
                return
            lines = [line(*item)]
            # Send whatever else is already queued in the same write: one syscall for a burst of events.
            while not queue.empty():
                more = queue.get_nowait()
                if more is None:
                    await response.write(b"".join(lines))
                    return
                lines.append(line(*more))
            await response.write(b"".join(lines))

    # ---- logs ----------------------------------------------------------------------------------------

    async def _serve_log(self, request: web.BaseRequest, rt: ResourceType, namespace: str,
                         name: str) -> web.StreamResponse:
        pod = self.store.get(rt, namespace, name)
        containers = [item.get("name") for item in (pod.get("spec") or {}).get("containers") or []]
        containers += [item.get("name") for item in (pod.get("spec") or {}).get("initContainers") or []]
        container = request.query.get("container")
        if not container:
            if len(containers) != 1:
                raise bad_request(f"a container name must be specified for pod {name}, choose one of: "
                                  f"[{' '.join(str(item) for item in containers)}]")
            container = str(containers[0])
        elif container not in containers:
            raise bad_request(f"container {container} is not valid for pod {name}")
        if self.log_provider is None:
            raise bad_request(f'container "{container}" in pod "{name}" is waiting to start: no kubelet serves logs')
        follow = _true(request.query.get("follow"))
        tail_lines = _int_param(request, "tailLines")
        result: Any = self.log_provider(namespace, name, container, follow, tail_lines)
        if inspect.isawaitable(result):
            result = await result
        if result is None:
            raise bad_request(f'container "{container}" in pod "{name}" is waiting to start: ContainerCreating')
        if isinstance(result, str):
            result = result.encode()
        if isinstance(result, bytes):
            return web.Response(body=result, headers={"Content-Type": "text/plain"})
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            async for chunk in result:
                await response.write(chunk.encode() if isinstance(chunk, str) else chunk)
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            close = getattr(result, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
        with contextlib.suppress(ConnectionResetError, ConnectionError):
            await response.write_eof()
        return response


# ---- a server in a background thread ------------------------------------------------------------------


@contextlib.contextmanager
def running_apiserver(
    *,
    crds: str | os.PathLike[str] | None = None,
    kubeconfig: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> Iterator[APIServer]:
    """An APIServer on its own thread and loop for synchronous code: `with running_apiserver() as s: s.url`."""
    ready: concurrent.futures.Future[APIServer] = concurrent.futures.Future()
    stop_event: asyncio.Event | None = None
    loop_holder: list[asyncio.AbstractEventLoop] = []

    async def main() -> None:
        nonlocal stop_event
        stop_event = asyncio.Event()
        loop_holder.append(asyncio.get_running_loop())
        try:
            server = APIServer(**kwargs)
            await server.start()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(server)
        try:
            await stop_event.wait()
        finally:
            await server.stop()

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="apiserver-emulator", daemon=True)
    thread.start()
    server = ready.result(timeout=60)
    try:
        if crds is not None:
            server.install_crds(crds)
        if kubeconfig is not None:
            write_kubeconfig(kubeconfig, server.url)
        yield server
    finally:
        loop = loop_holder[0]
        assert stop_event is not None
        loop.call_soon_threadsafe(stop_event.set)
        thread.join(timeout=30)


def main(argv: list[str] | None = None) -> None:
    """Serve until interrupted: `python -m localcluster.apiserver --port 8001 --crds crds --kubeconfig kc`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--crds", help="a CRD YAML file or a folder of them")
    parser.add_argument("--kubeconfig", help="write a kubeconfig for this server here")
    parser.add_argument("--no-kubelet", action="store_true", help="delete pods at once instead of gracefully")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    async def serve() -> None:
        async with APIServer(port=args.port, kubelet=not args.no_kubelet) as server:
            if args.crds:
                server.install_crds(args.crds)
            if args.kubeconfig:
                write_kubeconfig(args.kubeconfig, server.url)
            print(server.url, flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()

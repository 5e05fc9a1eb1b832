"""A small async Kubernetes API layer on aiohttp: create-if-absent, tolerant deletes, labelled lists, status patches.

It shares kopf's credentials (``kopf.ConnectionInfo``, built here from an explicit kubeconfig or the in-cluster
service account) but keeps its own connection pool, so hundreds of concurrent reconciles do not queue behind
kopf's watch streams. Every request and every failure is counted by verb for the operator's metrics.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import kopf
import yaml

from finetune_operator import constants as c
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.retry_policy import parse_retry_after, request_retry_delay

SERVICE_ACCOUNT_DIR: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount")
DEFAULT_TIMEOUT_SECONDS: Final = 30.0
# Concurrent requests (and so kept-alive TLS connections, each with its buffers) to the API server. 16 move a burst
# of 200 jobs as fast as 64 did (7.1 s against 7.6 s to all Running) with 11 MB less RSS; requests beyond it wait
# their turn in the client, so a 128-node gang never fans out further.
DEFAULT_POOL_SIZE: Final = 16
# Objects per page of a list: a namespace with thousands of pods' events is read in bounded pieces.
LIST_CHUNK: Final = 500
# Lists of jobs return only their metadata: the audit needs names and uids, never specs or statuses.
METADATA_ONLY: Final = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"

# Lists are served from the API server's watch cache as it stands (resourceVersion "0"), as an informer reads:
# at least as new as every watch event the operator has already seen, since both come from that cache. A
# consistent list instead waits for the cache to catch up with etcd after any write (a progress-notify round,
# 60-90 ms measured here), and a reconcile lists right after writes: it doubled job → pods latency.
FROM_WATCH_CACHE: Final = {"resourceVersion": "0"}

_PLURALS: Final = {"Pod": "pods", "Service": "services", "ConfigMap": "configmaps", "Event": "events",
                   "Workload": c.KUEUE_WORKLOADS, c.POD_GROUP_KIND: c.POD_GROUPS}
_KUEUE: Final = f"/apis/{c.KUEUE_API_VERSION}"

Rule = tuple[str, str, str]
"""An RBAC permission: (apiGroup, resource, verb)."""

# Every permission the requests of KubeApi need, kept next to the methods below (each names its rule). With what
# kopf itself needs (handlers.kopf_rbac) it is exactly the chart's RBAC: tests/unit/test_operator_rbac.py records
# the requests reconciles really make and checks both this table and the chart's rendered rules against them.
API_RBAC: Final[frozenset[Rule]] = frozenset({
    (c.GROUP, c.PLURAL, "get"),  # get_job: a job triggered before its watch event arrived, or about to get children
    (c.GROUP, c.PLURAL, "list"),  # list_jobs: which remembered jobs still exist after a watch gap
    (c.GROUP, c.PLURAL, "delete"),  # delete_job: ttlSecondsAfterFinished
    (c.GROUP, f"{c.PLURAL}/status", "patch"),  # patch_job_status: the one status patch of a reconcile
    ("", "pods", "list"),  # list_job_pods
    ("", "pods", "create"),  # create: the gang
    ("", "pods", "get"),  # create: whose is the pod already there under that name?
    ("", "pods", "delete"),  # delete: a failed attempt's gang, cleanPodPolicy
    ("", "services", "create"),  # create: the headless rendezvous Service (garbage-collected with the job)
    ("", "services", "get"),  # create: whose is the Service already there under that name?
    ("", "configmaps", "create"),  # create_or_update_data: the trainer config ...
    ("", "configmaps", "get"),  # create: whose is the ConfigMap already there under that name?
    ("", "configmaps", "patch"),  # ... and its data replaced for each new attempt
    ("", "events", "list"),  # list_pod_events: FailedScheduling / TriggeredScaleUp of unscheduled pods
    ("", "events", "create"),  # create_event: the job's phase changes
})
# With Kueue (spec.queueName), granted by the chart only where Kueue's CRDs exist: the job's Workload and, while
# the gang is created, the flavors it was admitted to and its WorkloadPriorityClass.
KUEUE_API_RBAC: Final[frozenset[Rule]] = frozenset({
    (c.KUEUE_GROUP, c.KUEUE_WORKLOADS, "get"),  # get_workload: each reconcile of a queued job; create: whose is it?
    (c.KUEUE_GROUP, c.KUEUE_WORKLOADS, "create"),  # create: the Workload, one pod set for the whole gang
    (c.KUEUE_GROUP, c.KUEUE_WORKLOADS, "delete"),  # delete_workload: suspended, or the gang changed shape
    (c.KUEUE_GROUP, f"{c.KUEUE_WORKLOADS}/status", "patch"),  # patch_workload_status: Finished, admission cleared
    (c.KUEUE_GROUP, c.KUEUE_RESOURCE_FLAVORS, "get"),  # get_resource_flavor: node labels and tolerations
    (c.KUEUE_GROUP, c.KUEUE_PRIORITY_CLASSES, "get"),  # get_workload_priority_class: the Workload's priority
})
# With gang scheduling (spec.gang), granted by the chart where gangScheduling.volcano / .coscheduling is on: the
# attempt's PodGroup of that scheduler's API group.
def pod_group_rbac(group: str) -> frozenset[Rule]:
    return frozenset({
        (group, c.POD_GROUPS, "list"),  # list_pod_groups: each reconcile of a gang job; 404 means no CRD
        (group, c.POD_GROUPS, "create"),  # create: the attempt's PodGroup, before its pods
        (group, c.POD_GROUPS, "get"),  # create: whose is the PodGroup already there under that name?
        (group, c.POD_GROUPS, "delete"),  # delete_pod_group: an earlier attempt's, or the job has no gang now
    })


VOLCANO_API_RBAC: Final[frozenset[Rule]] = pod_group_rbac(c.VOLCANO_GROUP)
COSCHEDULING_API_RBAC: Final[frozenset[Rule]] = pod_group_rbac(c.COSCHEDULING_GROUP)
# Not a request: every child names its job as controller with blockOwnerDeletion (so a foreground delete of the
# job waits for its pods), and the OwnerReferencesPermissionEnforcement admission plugin (on in OpenShift and in
# the local cluster) lets only someone who may update the owner's finalizers set that flag.
OWNER_RBAC: Final[frozenset[Rule]] = frozenset({(c.GROUP, f"{c.PLURAL}/finalizers", "update")})
# With kopf peering (several replicas): get_peering reads the peering object to pause the resync with kopf.
PEERING_API_GROUP: Final = "kopf.dev"
PEERING_VERSION: Final = "v1"
CLUSTER_PEERINGS: Final = "clusterkopfpeerings"
NAMESPACED_PEERINGS: Final = "kopfpeerings"


def peering_rbac(clusterwide: bool) -> frozenset[Rule]:
    """What get_peering needs: the ClusterKopfPeering in cluster-wide mode, else a KopfPeering per namespace."""
    return frozenset({(PEERING_API_GROUP, CLUSTER_PEERINGS if clusterwide else NAMESPACED_PEERINGS, "get")})


class ApiError(Exception):
    """An API request failed; ``status`` is the HTTP status (0 when the server could not be reached) and
    ``retry_after`` the seconds the server asked to wait before trying again, if it said."""

    def __init__(self, verb: str, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{verb} failed ({status or 'unreachable'}): {message}")
        self.verb = verb
        self.status = status
        self.message = message
        self.retry_after = retry_after


# ---- credentials ------------------------------------------------------------------------------------------


def connection_from_kubeconfig(path: str | os.PathLike[str]) -> kopf.ConnectionInfo:
    """The current context of one kubeconfig file, read now (not at import time like the kubernetes client)."""
    file = Path(path).expanduser()
    try:
        config = yaml.safe_load(file.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise kopf.LoginError(f"cannot read kubeconfig {file}: {exc}") from exc
    name = config.get("current-context")
    contexts = {item["name"]: item.get("context") or {} for item in config.get("contexts") or []}
    clusters = {item["name"]: item.get("cluster") or {} for item in config.get("clusters") or []}
    users = {item["name"]: item.get("user") or {} for item in config.get("users") or []}
    if not name or name not in contexts:
        raise kopf.LoginError(f"kubeconfig {file}: current-context {name!r} is not defined")
    context = contexts[name]
    cluster = clusters.get(context.get("cluster"), {})
    user = users.get(context.get("user"), {})
    if "server" not in cluster:
        raise kopf.LoginError(f"kubeconfig {file}: cluster {context.get('cluster')!r} has no server")
    if user.get("exec") or user.get("auth-provider"):
        return _connection_via_client(file)

    def local(key: str, where: Mapping[str, Any]) -> str | None:
        # Paths in a kubeconfig are relative to the file, as kubectl reads them.
        value = where.get(key)
        return str((file.parent / value).resolve()) if value else None

    token = user.get("token")
    token_file = local("tokenFile", user)
    if not token and token_file:
        token = Path(token_file).read_text().strip()
    return kopf.ConnectionInfo(
        server=str(cluster["server"]),
        ca_path=local("certificate-authority", cluster),
        ca_data=cluster.get("certificate-authority-data"),
        insecure=bool(cluster.get("insecure-skip-tls-verify")),
        certificate_path=local("client-certificate", user),
        certificate_data=user.get("client-certificate-data"),
        private_key_path=local("client-key", user),
        private_key_data=user.get("client-key-data"),
        username=user.get("username"),
        password=user.get("password"),
        token=token or None,
        default_namespace=context.get("namespace"),
        proxy_url=cluster.get("proxy-url"),
    )


def _connection_via_client(file: Path) -> kopf.ConnectionInfo:
    """Exec plugins and auth providers need the kubernetes client's loader (imported only then: it is heavy)."""
    import kubernetes

    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=str(file), client_configuration=configuration)
    header = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
        "authorization"
    )
    scheme, _, token = (header or "").partition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        scheme=scheme or None,
        token=token or None,
    )


def connection_in_cluster(directory: Path = SERVICE_ACCOUNT_DIR) -> kopf.ConnectionInfo | None:
    """The pod's service account (the token file is re-read on every login: kubelet rotates it)."""
    token_file = directory / "token"
    if not token_file.exists():
        return None
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    host = f"[{host}]" if ":" in host else host
    namespace_file = directory / "namespace"
    ca_file = directory / "ca.crt"
    return kopf.ConnectionInfo(
        server=f"https://{host}:{port}",
        ca_path=str(ca_file) if ca_file.exists() else None,
        token=token_file.read_text().strip() or None,
        default_namespace=namespace_file.read_text().strip() if namespace_file.exists() else None,
    )


def load_connection(kubeconfig: str | None = None) -> kopf.ConnectionInfo:
    """An explicit kubeconfig, else the in-cluster service account, else $KUBECONFIG or ~/.kube/config."""
    if kubeconfig:
        return connection_from_kubeconfig(kubeconfig)
    in_cluster = connection_in_cluster()
    if in_cluster is not None:
        return in_cluster
    env = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
    default = Path("~/.kube/config").expanduser()
    if env or default.exists():
        return connection_from_kubeconfig(env or default)
    raise kopf.LoginError("no credentials: pass --kubeconfig, run in a pod, or set KUBECONFIG")


# ---- merge patches --------------------------------------------------------------------------------------


def merge_patch_between(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The RFC 7386 merge patch turning ``old`` into ``new`` (lists replaced whole, removed keys as null)."""
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if before == value and key in old:
            continue
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            patch[key] = merge_patch_between(before, value)
        else:
            patch[key] = value
    return patch


# ---- the client -----------------------------------------------------------------------------------------


class KubeApi:
    """The requests the operator makes; one aiohttp session, re-created with fresh credentials after a 401.

    At most ``pool_size`` requests are in flight at once; a throttled request (429, or 5xx with Retry-After)
    waits as the server asks (``retry_policy``) without holding its place, then tries again.
    """

    def __init__(
        self,
        connect: Callable[[], kopf.ConnectionInfo],
        metrics: OperatorMetrics | None = None,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._connect = connect
        self._metrics = metrics
        self._pool_size = pool_size
        self._in_flight = asyncio.Semaphore(pool_size)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._server = ""
        self._lock = asyncio.Lock()
        self._sleep = sleep
        self._jitter = jitter

    async def _open(self, fresh: bool = False) -> aiohttp.ClientSession:
        async with self._lock:
            if self._session is not None and not fresh and not self._session.closed:
                return self._session
            if self._session is not None:
                await self._session.close()
            info = self._connect()
            self._server = info.server.rstrip("/")
            ssl_context: ssl.SSLContext | bool = info.as_ssl_context() if self._server.startswith("https") else False
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._pool_size, ssl=ssl_context),
                headers={**info.as_http_headers(), "User-Agent": c.MANAGED_BY},
                timeout=self._timeout,
                proxy=info.proxy_url,
            )
            return self._session

    async def close(self) -> None:
        async with self._lock:
            if self._session is not None:
                await self._session.close()
                self._session = None

    def _count(self, verb: str, failed: bool) -> None:
        if self._metrics is not None:
            self._metrics.api_requests.labels(verb=verb).inc()
            if failed:
                self._metrics.api_errors.labels(verb=verb).inc()

    async def _send(
        self, verb: str, method: str, path: str, params: Mapping[str, str] | None, data: bytes | None,
        headers: Mapping[str, str], fresh: bool,
    ) -> tuple[int, bytes, str | None]:
        """One try: (status, raw body, Retry-After header); ApiError when the server could not be reached."""
        async with self._in_flight:
            session = await self._open(fresh=fresh)
            try:
                async with session.request(method, self._server + path, params=params, data=data,
                                           headers=headers) as response:
                    return response.status, await response.read(), response.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self._count(verb, True)
                raise ApiError(verb, 0, f"{method} {path}: {exc!r}") from exc

    async def request(
        self,
        verb: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        accept: str = "application/json",
        ok_statuses: Sequence[int] = (),
    ) -> tuple[int, Any]:
        """(status, parsed body); statuses in ``ok_statuses`` are returned, other errors raise ApiError."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": accept, **({"Content-Type": content_type} if data is not None else {})}
        attempt, relogged = 0, False
        while True:
            attempt += 1
            status, raw, retry_header = await self._send(verb, method, path, params, data, headers, relogged)
            if status == 401 and not relogged:
                # Rotated or expired credentials: log in again once.
                self._count(verb, True)
                relogged = True
                continue
            parsed: Any = None
            if raw:
                try:
                    parsed = json.loads(raw)
                except ValueError:
                    parsed = raw.decode(errors="replace")
            if status < 300 or status in ok_statuses:
                self._count(verb, False)
                return status, parsed
            self._count(verb, True)
            retry_after = parse_retry_after(retry_header)
            delay = request_retry_delay(status, retry_after, attempt, self._jitter())
            if delay is not None:
                await self._sleep(delay)
                continue
            message = parsed.get("message", "") if isinstance(parsed, Mapping) else str(parsed)[:500]
            raise ApiError(verb, status, f"{method} {path}: {message}", retry_after)

    async def list_all(
        self, path: str, params: Mapping[str, str], *, accept: str = "application/json"
    ) -> list[dict[str, Any]]:
        """Every item of a list, read in pages of LIST_CHUNK (a continued page names no resourceVersion)."""
        items: list[dict[str, Any]] = []
        page: dict[str, str] = {**params, "limit": str(LIST_CHUNK)}
        while True:
            _, body = await self.request("list", "GET", path, params=page, accept=accept)
            items.extend((body or {}).get("items") or [])
            token = ((body or {}).get("metadata") or {}).get("continue")
            if not token:
                return items
            page = {key: value for key, value in page.items() if key != "resourceVersion"}
            page["continue"] = str(token)

    # ---- paths --------------------------------------------------------------------------------------

    @staticmethod
    def core_path(namespace: str, plural: str, name: str | None = None) -> str:
        path = f"/api/v1/namespaces/{quote(namespace)}/{plural}"
        return f"{path}/{quote(name)}" if name else path

    @classmethod
    def child_path(cls, kind: str, namespace: str, name: str | None = None, api_version: str = "v1") -> str:
        """A child's collection (or the child): core objects, the job's Kueue Workload, or its PodGroup."""
        if kind in ("Workload", c.POD_GROUP_KIND):
            base = _KUEUE if kind == "Workload" else f"/apis/{api_version}"
            path = f"{base}/namespaces/{quote(namespace)}/{_PLURALS[kind]}"
            return f"{path}/{quote(name)}" if name else path
        return cls.core_path(namespace, _PLURALS[kind], name)

    @staticmethod
    def job_path(namespace: str, name: str | None = None) -> str:
        path = f"/apis/{c.GROUP}/{c.VERSION}/namespaces/{quote(namespace)}/{c.PLURAL}"
        return f"{path}/{quote(name)}" if name else path

    # ---- the operator's requests ---------------------------------------------------------------------

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get(self.job_path(namespace, name))

    async def list_jobs(self, namespace: str | None) -> list[dict[str, Any]]:
        """The metadata of every job in a namespace (None: in all), as etcd holds them now.

        A consistent read, not one from the watch cache: a job missing from it is really gone.
        """
        path = self.job_path(namespace) if namespace else f"/apis/{c.GROUP}/{c.VERSION}/{c.PLURAL}"
        return await self.list_all(path, {}, accept=METADATA_ONLY)

    async def list_job_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        params = {"labelSelector": f"{c.LABEL_JOB_NAME}={job_name}", **FROM_WATCH_CACHE}
        return await self.list_all(self.core_path(namespace, "pods"), params)

    async def list_pod_events(self, namespace: str, pod_names: Sequence[str]) -> list[dict[str, Any]]:
        """Events about these pods: one list of the namespace's pod events, however many pods a gang has (a field
        selector names one object at most)."""
        wanted = set(pod_names)
        params = {"fieldSelector": "involvedObject.kind=Pod", **FROM_WATCH_CACHE}
        events = await self.list_all(self.core_path(namespace, "events"), params)
        return [e for e in events if (e.get("involvedObject") or {}).get("name") in wanted]

    async def create(self, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create a core object; the stored object, or None when this owner's object already existed (409).

        An object of that name whose controller is another (a deleted job of the same name whose children the
        garbage collector has not removed yet, or something that is not ours) is never reused: the garbage
        collector would delete it under the new job. That raises ApiError, and the reconcile retries.
        """
        metadata = body["metadata"]
        namespace, kind, api_version = metadata["namespace"], body["kind"], str(body.get("apiVersion", "v1"))
        collection = self.child_path(kind, namespace, api_version=api_version)
        status, created = await self.request("create", "POST", collection, body=body, ok_statuses=(409,))
        if status != 409:
            return dict(created or {})
        owner = controller_of(body)
        if owner is None:
            return None
        path = self.child_path(kind, namespace, metadata["name"], api_version)
        found, existing = await self.request("get", "GET", path, ok_statuses=(404,))
        if found == 404:
            raise ApiError("create", 409, f"{body['kind']} {namespace}/{metadata['name']} was being deleted; retrying")
        theirs = controller_of(existing)
        if theirs is not None and theirs.get("uid") == owner.get("uid"):
            return None
        whose = (f"{theirs.get('kind')} {theirs.get('name')} uid {theirs.get('uid')}" if theirs is not None
                 else "no controller")
        raise ApiError(
            "create", 409,
            f"{body['kind']} {namespace}/{metadata['name']} already exists and belongs to {whose}, not to this job "
            f"(uid {owner.get('uid')}); waiting until it is removed (the garbage collector removes a deleted job's)",
        )

    async def create_or_update_data(self, body: Mapping[str, Any]) -> bool:
        """Create a ConfigMap, or replace the data of the existing one; True when created."""
        if await self.create(body) is not None:
            return True
        metadata = body["metadata"]
        await self.request(
            "patch",
            "PATCH",
            self.core_path(metadata["namespace"], _PLURALS[body["kind"]], metadata["name"]),
            body={"data": body.get("data") or {}},
            content_type="application/merge-patch+json",
        )
        return False

    async def delete(self, kind: str, namespace: str, name: str) -> bool:
        """Delete a core object; True when deleted now, False when it was already gone (404)."""
        status, _ = await self.request(
            "delete", "DELETE", self.core_path(namespace, _PLURALS[kind], name), ok_statuses=(404,)
        )
        return status != 404

    async def delete_job(self, namespace: str, name: str) -> bool:
        status, _ = await self.request(
            "delete", "DELETE", self.job_path(namespace, name),
            body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
            ok_statuses=(404,),
        )
        return status != 404

    async def patch_job_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the status subresource; None when the job is gone."""
        status, body = await self.request(
            "patch_status",
            "PATCH",
            self.job_path(namespace, name) + "/status",
            body={"status": patch},
            content_type="application/merge-patch+json",
            ok_statuses=(404,),
        )
        return None if status == 404 else dict(body)

    async def create_event(self, body: Mapping[str, Any]) -> None:
        await self.create(body)

    async def get_workload(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The job's Workload; None when there is none. ApiError 404 when the API server does not serve Workloads
        at all (Kueue's CRD is not installed): a missing object's NotFound names its kind, an unserved path's not."""
        path = self.child_path("Workload", namespace, name)
        status, body = await self.request("get", "GET", path, ok_statuses=(404,))
        if status != 404:
            return dict(body or {})
        details = body.get("details") if isinstance(body, Mapping) else None
        if isinstance(details, Mapping) and details.get("kind") == c.KUEUE_WORKLOADS:
            return None
        raise ApiError("get", 404, f"GET {path}: {c.KUEUE_API_VERSION} {c.KUEUE_WORKLOADS} are not served")

    async def serves(self, api_version: str, plural: str) -> bool:
        """Whether the API server serves ``plural`` in ``api_version``, from its discovery document (readable by
        every authenticated client): a forbidden request is refused before routing, so its 403 cannot tell."""
        status, body = await self.request("discover", "GET", f"/apis/{api_version}", ok_statuses=(404,))
        resources = (body or {}).get("resources") if status == 200 and isinstance(body, Mapping) else None
        return any(item.get("name") == plural for item in resources or ())

    async def delete_workload(self, namespace: str, name: str) -> bool:
        status, _ = await self.request("delete", "DELETE", self.child_path("Workload", namespace, name),
                                       ok_statuses=(404,))
        return status != 404

    async def patch_workload_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> bool:
        """Merge-patch a Workload's status subresource; False when it is gone. A patch carrying a resourceVersion
        that is no longer current fails with 409 (the reconcile retries on fresh data)."""
        status, _ = await self.request(
            "patch_status", "PATCH", self.child_path("Workload", namespace, name) + "/status", body=patch,
            content_type="application/merge-patch+json", ok_statuses=(404,),
        )
        return status != 404

    async def list_pod_groups(self, namespace: str, job_name: str, api_version: str) -> list[dict[str, Any]] | None:
        """The job's PodGroups of one API; None when the cluster does not serve that API (its CRD is missing)."""
        path = self.child_path(c.POD_GROUP_KIND, namespace, api_version=api_version)
        params = {"labelSelector": f"{c.LABEL_JOB_NAME}={job_name}", **FROM_WATCH_CACHE}
        status, body = await self.request("list", "GET", path, params=params, ok_statuses=(404,))
        return None if status == 404 else list((body or {}).get("items") or [])

    async def delete_pod_group(self, namespace: str, api_version: str, name: str) -> bool:
        path = self.child_path(c.POD_GROUP_KIND, namespace, name, api_version)
        status, _ = await self.request("delete", "DELETE", path, ok_statuses=(404,))
        return status != 404

    async def get_resource_flavor(self, name: str) -> dict[str, Any] | None:
        return await self._get(f"{_KUEUE}/{c.KUEUE_RESOURCE_FLAVORS}/{quote(name)}")

    async def get_workload_priority_class(self, name: str) -> dict[str, Any] | None:
        return await self._get(f"{_KUEUE}/{c.KUEUE_PRIORITY_CLASSES}/{quote(name)}")

    async def _get(self, path: str) -> dict[str, Any] | None:
        """One object, or None when it does not exist."""
        status, body = await self.request("get", "GET", path, ok_statuses=(404,))
        return None if status == 404 else dict(body or {})

    async def get_peering(self, namespace: str | None, name: str) -> dict[str, Any] | None:
        """kopf's peering object (cluster-wide when ``namespace`` is None); None when it does not exist."""
        base = f"/apis/{PEERING_API_GROUP}/{PEERING_VERSION}"
        if namespace is None:
            path = f"{base}/{CLUSTER_PEERINGS}/{quote(name)}"
        else:
            path = f"{base}/namespaces/{quote(namespace)}/{NAMESPACED_PEERINGS}/{quote(name)}"
        status, body = await self.request("get", "GET", path, ok_statuses=(404,))
        return None if status == 404 else dict(body or {})


def controller_of(obj: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The owner reference marked ``controller``, if any."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((ref for ref in refs if ref.get("controller")), None)


async def gather_actions(coroutines: Sequence[Awaitable[Any]]) -> list[BaseException]:
    """Run requests concurrently; the errors, so one failed create does not hide the others' results."""
    results = await asyncio.gather(*coroutines, return_exceptions=True)
    return [r for r in results if isinstance(r, BaseException)]

"""The chart's RBAC is exactly what the operator uses: recorded from real reconciles, not from a hand-written list.

A real ``KubeApi`` (only its HTTP transport replaced by an in-memory API) runs the reconciles of a whole job life:
create, capacity check, a failed attempt and the next one, success, deletion after the TTL; the peering check reads
both kinds of peering object. Every request is turned into the RBAC rule it needs. That set must equal the table
``api.API_RBAC`` (+ the peering read), and the chart's rendered Roles/ClusterRoles must equal it plus kopf's needs
(``handlers.required_rbac``) for each way the chart can be installed.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from chart_render import of_kind, render
from operator_factories import at, make_job, make_pod
from test_chart import rule_set

from finetune_operator import constants as c
from finetune_operator import handlers
from finetune_operator.api import (
    API_RBAC,
    COSCHEDULING_API_RBAC,
    KUEUE_API_RBAC,
    VOLCANO_API_RBAC,
    ApiError,
    KubeApi,
    Rule,
    peering_rbac,
)
from finetune_operator.metrics import OperatorMetrics
from finetune_operator.peering import PeeringCheck
from finetune_operator.reconcile import Reconciler
from finetune_operator.settings import Settings, load_settings

CORE = re.compile(r"^/api/v1/namespaces/[^/]+/(?P<plural>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$")
GROUPED = re.compile(r"^/apis/(?P<group>[^/]+)/[^/]+(?:/namespaces/[^/]+)?/(?P<plural>[^/]+)"
                     r"(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$")
# Resources only a ClusterRole can grant.
CLUSTER_SCOPED = {"customresourcedefinitions", "clusterkopfpeerings", "namespaces", "resourceflavors",
                  "workloadpriorityclasses"}


def rule_of(method: str, path: str, params: Mapping[str, str] | None) -> Rule:
    """The RBAC rule an API request needs, as the API server's authorizer derives it."""
    match = CORE.match(path) or GROUPED.match(path)
    assert match is not None, path
    parts = match.groupdict()
    group = parts.get("group") or ""
    resource = parts["plural"] + (f"/{parts['sub']}" if parts.get("sub") else "")
    named = parts.get("name") is not None
    verb = {
        "GET": "get" if named else ("watch" if (params or {}).get("watch") else "list"),
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if named else "deletecollection",
    }[method]
    return group, resource, verb


def merge(target: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


class InMemoryApi(KubeApi):
    """KubeApi with its HTTP requests answered from dicts; records each request and each method called."""

    def __init__(self) -> None:
        super().__init__(lambda: pytest.fail("no connection is ever opened"))
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}  # (collection path, name) -> body
        self.requests: list[tuple[str, str, Mapping[str, str] | None]] = []
        self.methods: set[str] = set()
        for name in public_methods():
            self._record(name)

    def _record(self, name: str) -> None:
        method = getattr(self, name)

        async def recorded(*args: Any, **kwargs: Any) -> Any:
            self.methods.add(name)
            return await method(*args, **kwargs)

        setattr(self, name, recorded)

    def put(self, collection: str, body: dict[str, Any]) -> None:
        self.objects[(collection, body["metadata"]["name"])] = copy.deepcopy(body)

    def items(self, collection: str) -> dict[str, dict[str, Any]]:
        return {name: body for (where, name), body in self.objects.items() if where == collection}

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
        self.requests.append((method, path, params))
        match = CORE.match(path) or GROUPED.match(path)
        assert match is not None, path
        name, sub = match.group("name"), match.group("sub")
        collection = path[: match.start("name") - 1] if name else path
        status, answer = self._answer(method, collection, name, sub, params or {}, body)
        assert status < 300 or status in ok_statuses, f"{method} {path}: {status}"
        return status, answer

    def _answer(self, method: str, collection: str, name: str | None, sub: str | None,
                params: Mapping[str, str], body: Any) -> tuple[int, Any]:
        key = (collection, name or "")
        if method == "GET" and name is None:
            items = list(self.items(collection).values())
            if "labelSelector" in params:
                label, value = params["labelSelector"].split("=")
                items = [i for i in items if (i["metadata"].get("labels") or {}).get(label) == value]
            if "fieldSelector" in params:
                fields = dict(term.split("=") for term in params["fieldSelector"].split(","))
                items = [i for i in items if all(i.get("involvedObject", {}).get(f.split(".")[1]) == v
                                                 for f, v in fields.items())]
            return 200, {"items": copy.deepcopy(items)}
        if method == "POST":
            new = copy.deepcopy(body)
            new["metadata"].setdefault("name", new["metadata"].get("generateName", "") + str(len(self.objects)))
            if (collection, new["metadata"]["name"]) in self.objects:
                return 409, {"message": "already exists"}
            self.put(collection, new)
            return 201, copy.deepcopy(new)
        if key not in self.objects:
            # As the API server answers for a missing object of a served resource: the details name both.
            plural = collection.rsplit("/", 1)[-1]
            return 404, {"kind": "Status", "reason": "NotFound", "message": f'{plural} "{name}" not found',
                         "details": {"name": name, "kind": plural}}
        if method == "GET":
            return 200, copy.deepcopy(self.objects[key])
        if method == "PATCH":
            return 200, copy.deepcopy(merge(self.objects[key], body))
        if method == "DELETE":
            del self.objects[key]
            return 200, {}
        raise AssertionError(f"unexpected {method} {collection}/{name}/{sub}")


def public_methods() -> list[str]:
    """The KubeApi requests the operator makes (transport, paths and lifecycle left out)."""
    return [name for name, member in inspect.getmembers(KubeApi, inspect.iscoroutinefunction)
            if not name.startswith("_") and name not in {"request", "close"}]


JOBS = "/apis/finetune.dev/v1alpha1/namespaces/ns/finetunejobs"
PODS = "/api/v1/namespaces/ns/pods"
SERVICES = "/api/v1/namespaces/ns/services"
EVENTS = "/api/v1/namespaces/ns/events"


def run_life_of_a_job() -> InMemoryApi:
    api = InMemoryApi()
    job = make_job(spec__distributed__nodes=2, spec__backoffLimit=3, spec__ttlSecondsAfterFinished=0,
                   spec__restartBackoff={"initialSeconds": 0, "maxSeconds": 0})
    api.put(JOBS, job)
    clock = [0.0]
    reconciler = Reconciler(api, Settings(trainer_image="img"), OperatorMetrics(), clock=lambda: at(clock[0]))

    def set_pod(attempt: int, rank: int, **kwargs: Any) -> None:
        name = f"job-a{attempt}-n{rank}"
        api.objects[(PODS, name)]["status"] = make_pod(rank, attempt, **kwargs)["status"]

    async def step() -> None:
        clock[0] += 1
        # No body: the first pass reads the job (a reconcile triggered before the job's watch event).
        await reconciler.reconcile("ns", "job")
        stored = api.objects.get((JOBS, "job"))
        if stored is not None:
            reconciler.job_seen(stored)

    async def life() -> None:
        # A job of the same name was deleted and this one created: its Service and a pod are still there,
        # waiting for the garbage collector. Neither is reused (the collector would delete it under this job).
        predecessor = {"metadata": {"ownerReferences": [
            {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "job", "uid": "old",
             "controller": True}]}}
        api.put(SERVICES, merge({"metadata": {"name": "job"}}, predecessor))
        api.put(PODS, merge({"metadata": {"name": "job-a0-n0"}}, predecessor))
        with pytest.raises(ApiError, match="belongs to FineTuneJob job uid old"):
            await step()
        del api.objects[(SERVICES, "job")]
        with pytest.raises(ApiError, match="Pod ns/job-a0-n0 already exists"):
            await step()
        del api.objects[(PODS, "job-a0-n0")]
        await step()  # the gang of attempt 0; its pods are unscheduled ...
        assert sorted(api.items(PODS)) == ["job-a0-n0", "job-a0-n1"]
        api.put(EVENTS, {"metadata": {"name": "e1"}, "involvedObject": {"kind": "Pod", "name": "job-a0-n0"},
                         "reason": "FailedScheduling", "message": "0/3 nodes are available", "type": "Warning",
                         "lastTimestamp": "2025-01-01T00:00:01Z"})
        await step()  # ... so their events are read (WaitingForCapacity)
        set_pod(0, 0, phase="Running", node="n1")
        set_pod(0, 1, phase="Failed", node="n2", exit_code=1)
        for _ in range(3):  # the failed attempt's pods go, attempt 1 gets its pods and a new config
            await step()
        assert sorted(api.items(PODS)) == ["job-a1-n0", "job-a1-n1"]
        set_pod(1, 0, phase="Succeeded", node="n1", exit_code=0)
        set_pod(1, 1, phase="Running", node="n2")
        for _ in range(3):  # Succeeded, then deleted at once (ttlSecondsAfterFinished 0)
            await step()
        assert (JOBS, "job") not in api.objects
        # Which remembered jobs still exist (after a watch gap), cluster-wide and in a watched namespace.
        await reconciler.audit_jobs()
        await Reconciler(api, Settings(namespaces=("ns",)), OperatorMetrics()).audit_jobs()
        for namespaces in ((), ("team-a",)):
            await PeeringCheck(api, "peering", namespaces, "me", 1)()
        await reconciler.close()

    asyncio.run(life())
    return api


WORKLOADS = "/apis/kueue.x-k8s.io/v1beta2/namespaces/ns/workloads"
FLAVORS = "/apis/kueue.x-k8s.io/v1beta2/resourceflavors"
PRIORITY_CLASSES = "/apis/kueue.x-k8s.io/v1beta2/workloadpriorityclasses"


def run_life_of_a_queued_job() -> InMemoryApi:
    """A job in a Kueue queue: Workload created (its priority read), deleted on suspend and created again on
    resume, admitted (its flavor read), evicted and admitted again, finished (Workload Finished)."""
    api = InMemoryApi()
    api.put(JOBS, make_job(spec__queueName="team-a", spec__workloadPriorityClass="high",
                           spec__restartBackoff={"initialSeconds": 0, "maxSeconds": 0}))
    api.put(PRIORITY_CLASSES, {"metadata": {"name": "high"}, "value": 1000})
    api.put(FLAVORS, {"metadata": {"name": "a100"}, "spec": {"nodeLabels": {"pool": "a100"}}})
    clock = [0.0]
    reconciler = Reconciler(api, Settings(trainer_image="img"), OperatorMetrics(), clock=lambda: at(clock[0]))

    def workload_conditions(*true: str) -> None:
        workload = api.objects[(WORKLOADS, "finetunejob-job")]
        workload["metadata"]["resourceVersion"] = str(clock[0])
        workload["status"] = {"conditions": [{"type": kind, "status": "True", "reason": kind, "message": kind}
                                             for kind in true]}
        if "Admitted" in true:
            workload["status"]["admission"] = {"clusterQueue": "cq", "podSetAssignments": [
                {"name": "trainer", "flavors": {"cpu": "a100"}, "count": 1}]}

    async def step() -> None:
        clock[0] += 1
        await reconciler.reconcile("ns", "job", api.objects.get((JOBS, "job")))

    def edit_spec(**spec: Any) -> None:
        job = api.objects[(JOBS, "job")]
        job["metadata"]["generation"] += 1
        job["spec"].update(spec)

    async def life() -> None:
        await step()  # the Workload, with the WorkloadPriorityClass's value
        assert api.objects[(WORKLOADS, "finetunejob-job")]["spec"]["priority"] == 1000
        edit_spec(suspend=True)
        await step()  # suspended: the Workload goes ...
        assert (WORKLOADS, "finetunejob-job") not in api.objects
        edit_spec(suspend=False)
        await step()  # ... and comes back on resume
        workload_conditions("QuotaReserved", "Admitted")
        await step()  # admitted: the gang, on the flavor's nodes
        assert api.objects[(PODS, "job-a0-n0")]["spec"]["nodeSelector"] == {"pool": "a100"}
        workload_conditions("QuotaReserved", "Admitted", "Evicted")
        await step()  # evicted: the pods go ...
        await step()  # ... then the admission
        assert "admission" not in api.objects[(WORKLOADS, "finetunejob-job")]["status"]
        workload_conditions("QuotaReserved", "Admitted")
        await step()
        api.objects[(PODS, "job-a1-n0")]["status"] = make_pod(0, 1, phase="Succeeded", exit_code=0)["status"]
        await step()  # Succeeded: the Workload is Finished
        conditions = api.objects[(WORKLOADS, "finetunejob-job")]["status"]["conditions"]
        assert {"type": "Finished", "status": "True"}.items() <= conditions[-1].items()
        await reconciler.close()

    asyncio.run(life())
    return api


class KueuelessApi(InMemoryApi):
    """A cluster without Kueue whose RBAC grants nothing on its group: the authorizer refuses a Workload request
    (403) before routing, and discovery (readable by every authenticated client) does not know the group (404)."""

    async def request(self, verb: str, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        if not path.startswith(f"/apis/{c.KUEUE_GROUP}/"):
            return await super().request(verb, method, path, **kwargs)
        self.requests.append((method, path, kwargs.get("params")))
        if path == f"/apis/{c.KUEUE_API_VERSION}":
            assert 404 in kwargs.get("ok_statuses", ())
            return 404, {"kind": "Status", "reason": "NotFound", "message": "the server could not find it"}
        raise ApiError(verb, 403, f"{method} {path}: forbidden")


def run_life_of_a_queued_job_without_kueue() -> InMemoryApi:
    """A job in a Kueue queue on a cluster without Kueue: it fails at once, saying the CRD is not installed."""
    api = KueuelessApi()
    api.put(JOBS, make_job(spec__queueName="team-a"))
    reconciler = Reconciler(api, Settings(trainer_image="img"), OperatorMetrics(), clock=lambda: at(1))

    async def life() -> None:
        await reconciler.reconcile("ns", "job", api.objects.get((JOBS, "job")))
        await reconciler.close()

    asyncio.run(life())
    status = api.objects[(JOBS, "job")]["status"]
    assert (status["phase"], status["conditions"][-1]["reason"]) == ("Failed", "WorkloadAPIUnavailable"), status
    assert "the CRD workloads.kueue.x-k8s.io is not installed" in status["message"]
    assert not api.items(PODS)
    return api


def run_life_of_a_gang_job(scheduler: str) -> InMemoryApi:
    """A gang job: a deleted job's PodGroup of the same name is not reused; the attempt's PodGroup comes before its
    pods, the next attempt gets a new one (the old one goes), and the last goes when the job succeeds."""
    api = InMemoryApi()
    api.put(JOBS, make_job(spec__distributed__nodes=2, spec__gang={"scheduler": scheduler},
                           spec__restartBackoff={"initialSeconds": 0, "maxSeconds": 0}))
    groups = f"/apis/{c.POD_GROUP_API_VERSIONS[scheduler]}/namespaces/ns/podgroups"
    reconciler = Reconciler(api, Settings(trainer_image="img"), OperatorMetrics(), clock=lambda: at(1))

    async def step() -> None:
        await reconciler.reconcile("ns", "job", api.objects.get((JOBS, "job")))

    async def life() -> None:
        api.put(groups, {"metadata": {"name": "job-a0", "labels": {"finetune.dev/job-name": "job"},
                                      "ownerReferences": [{"kind": "FineTuneJob", "name": "job", "uid": "old",
                                                           "controller": True}]}})
        with pytest.raises(ApiError, match="PodGroup ns/job-a0 already exists"):
            await step()
        del api.objects[(groups, "job-a0")]
        await step()
        assert sorted(api.items(groups)) == ["job-a0"] and len(api.items(PODS)) == 2
        api.objects[(PODS, "job-a0-n1")]["status"] = make_pod(1, 0, phase="Failed", exit_code=1)["status"]
        for _ in range(3):  # the failed attempt's pods and PodGroup go, attempt 1 gets its own
            await step()
        assert sorted(api.items(groups)) == ["job-a1"]
        api.objects[(PODS, "job-a1-n0")]["status"] = make_pod(0, 1, phase="Succeeded", exit_code=0)["status"]
        for _ in range(2):
            await step()
        assert api.items(groups) == {}
        await reconciler.close()

    asyncio.run(life())
    return api


def test_every_request_the_operator_makes_is_in_the_api_rbac_table_and_nothing_else() -> None:
    plain, queued = run_life_of_a_job(), run_life_of_a_queued_job()
    volcano, coscheduling = run_life_of_a_gang_job("volcano"), run_life_of_a_gang_job("coscheduling")
    kueueless = run_life_of_a_queued_job_without_kueue()
    assert plain.methods | queued.methods | volcano.methods | kueueless.methods == set(public_methods()), (
        "every request is exercised")
    # Discovery needs no rule of the chart's (system:discovery grants it to every authenticated client).
    discovery = f"/apis/{c.KUEUE_API_VERSION}"
    assert discovery in {path for _, path, _ in kueueless.requests}
    assert {rule_of(method, path, params) for method, path, params in kueueless.requests
            if path != discovery} - API_RBAC == {(c.KUEUE_GROUP, c.KUEUE_WORKLOADS, "get")}
    used = {rule_of(method, path, params) for method, path, params in plain.requests}
    assert used == API_RBAC | peering_rbac(clusterwide=True) | peering_rbac(clusterwide=False)
    used_queued = {rule_of(method, path, params) for method, path, params in queued.requests}
    assert used_queued - API_RBAC == KUEUE_API_RBAC
    for life, rules in ((volcano, VOLCANO_API_RBAC), (coscheduling, COSCHEDULING_API_RBAC)):
        assert {rule_of(method, path, params) for method, path, params in life.requests} - API_RBAC == rules


def test_rule_of_maps_requests_as_the_authorizer_does() -> None:
    assert rule_of("GET", "/api/v1/namespaces/a/pods", {"labelSelector": "x=y"}) == ("", "pods", "list")
    assert rule_of("GET", "/api/v1/namespaces/a/pods", {"watch": "1"}) == ("", "pods", "watch")
    assert rule_of("PATCH", JOBS + "/j/status", None) == ("finetune.dev", "finetunejobs/status", "patch")
    assert rule_of("GET", "/apis/kopf.dev/v1/clusterkopfpeerings/p", None) == (
        "kopf.dev", "clusterkopfpeerings", "get")
    assert rule_of("DELETE", JOBS + "/j", None) == ("finetune.dev", "finetunejobs", "delete")


def test_kopf_rbac_covers_every_watched_resource() -> None:
    registry = handlers.build_registry(Settings())
    watched = {(h.selector.group, h.selector.any_name) for h in registry._watching.get_all_handlers()}
    assert watched == {("finetune.dev", "finetunejobs"), ("", "pods"), ("kueue.x-k8s.io", "workloads")}
    for group, resource in watched:
        rules = handlers.KOPF_KUEUE_RBAC if group == "kueue.x-k8s.io" else handlers.KOPF_RBAC
        assert {(group, resource, "list"), (group, resource, "watch")} <= rules


KUEUE_API = "kueue.x-k8s.io/v1beta2"
# (chart values, how the operator runs with them)
INSTALLS: dict[str, list[str]] = {
    "cluster scope, every namespace": [],
    "cluster scope, every namespace, 3 replicas": ["--set", "replicaCount=3"],
    "cluster scope, listed namespaces, 2 replicas": ["--set", "watchNamespaces={team-a}", "--set", "replicaCount=2"],
    "namespace scope": ["--set", "rbac.scope=namespace", "--set", "watchNamespaces={team-a,team-b}"],
    "namespace scope, 3 replicas": ["--set", "rbac.scope=namespace", "--set", "replicaCount=3"],
    "cluster scope, Kueue installed": ["--api-versions", KUEUE_API],
    "cluster scope, Kueue enabled before it is installed": ["--set", "kueue.enabled=true"],
    "namespace scope, Kueue installed": ["--set", "rbac.scope=namespace", "--set", "watchNamespaces={team-a}",
                                         "--api-versions", KUEUE_API],
    "cluster scope, Volcano": ["--set", "gangScheduling.volcano=true"],
    "cluster scope, both gang schedulers": ["--set", "gangScheduling.volcano=true",
                                            "--set", "gangScheduling.coscheduling=true"],
    "namespace scope, coscheduling": ["--set", "rbac.scope=namespace", "--set", "gangScheduling.coscheduling=true"],
}


@pytest.mark.parametrize("install", sorted(INSTALLS))
def test_the_chart_grants_exactly_what_the_operator_uses(helm_bin: Path, install: str) -> None:  # noqa: F811
    docs = render(helm_bin, *INSTALLS[install])
    (deployment,) = of_kind(docs, "Deployment")
    env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    settings = load_settings([], environ=env)
    needed = handlers.required_rbac(clusterwide=settings.clusterwide, peering=settings.peering is not None,
                                    kueue=bool({KUEUE_API, "kueue.enabled=true"} & set(INSTALLS[install])),
                                    volcano="gangScheduling.volcano=true" in INSTALLS[install],
                                    coscheduling="gangScheduling.coscheduling=true" in INSTALLS[install])
    namespaced = {rule for rule in needed if rule[1] not in CLUSTER_SCOPED}
    if "namespace scope" in install:
        roles = of_kind(docs, "Role")
        assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(settings.namespaces)
        for role in roles:
            assert rule_set(role) == namespaced
        (crds,) = of_kind(docs, "ClusterRole")
        assert rule_set(crds) == needed - namespaced
    else:
        (cluster_role,) = of_kind(docs, "ClusterRole")
        assert rule_set(cluster_role) == needed

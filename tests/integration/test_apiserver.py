"""The API server emulator seen through real clients: raw HTTP, the kubernetes client, kubectl 1.32 and kopf."""

from __future__ import annotations

import http.client
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes
import pytest
import yaml

from localcluster.apiserver import APIServer, running_apiserver, write_kubeconfig

pytestmark = pytest.mark.integration

REPO = pathlib.Path(__file__).resolve().parents[2]

# A small CRD of our own: a schema with a default, a CEL rule, a transition rule, printer columns and status.
WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.test"},
    "spec": {
        "group": "example.test",
        "scope": "Namespaced",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget", "shortNames": ["wd"],
                  "categories": ["all"]},
        "versions": [{
            "name": "v1",
            "served": True,
            "storage": True,
            "subresources": {"status": {}},
            "additionalPrinterColumns": [
                {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            ],
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {
                    "apiVersion": {"type": "string"},
                    "kind": {"type": "string"},
                    "metadata": {"type": "object"},
                    "spec": {
                        "type": "object",
                        "required": ["size"],
                        "x-kubernetes-validations": [
                            {"rule": "self.size <= 10", "message": "size cannot exceed 10", "fieldPath": ".size"},
                        ],
                        "properties": {
                            "size": {"type": "integer", "minimum": 1},
                            "color": {"type": "string", "enum": ["red", "blue"], "default": "red",
                                      "x-kubernetes-validations": [
                                          {"rule": "self == oldSelf", "message": "color is immutable"},
                                      ]},
                        },
                    },
                    "status": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                        "properties": {
                            "phase": {"type": "string"},
                            "conditions": {"type": "array", "items": {
                                "type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                        },
                    },
                },
            }},
        }],
    },
}
WIDGETS = "/apis/example.test/v1/namespaces/default/widgets"
CONFIGMAPS = "/api/v1/namespaces/default/configmaps"
PODS = "/api/v1/namespaces/default/pods"


class RawClient:
    """Plain HTTP against the server, to see exactly what any client would see."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)

    def request(self, method: str, path: str, body: Any = None, *, content_type: str = "application/json",
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            payload = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
            connection.request(method, path, body=payload,
                               headers={"Content-Type": content_type, **(headers or {})})
            response = connection.getresponse()
            data = response.read()
            return response.status, json.loads(data) if data else None
        finally:
            connection.close()

    def ok(self, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        status, result = self.request(method, path, body, **kwargs)
        assert 200 <= status < 300, (status, result)
        return result

    def watch(self, path: str, *, until: Callable[[list[dict[str, Any]]], bool], timeout: float = 10
              ) -> list[dict[str, Any]]:
        """Watch events until `until(events)` holds, the server ends the stream, or the timeout passes."""
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        events: list[dict[str, Any]] = []
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            assert response.status == 200, response.read()
            deadline = time.monotonic() + timeout
            while not until(events) and time.monotonic() < deadline:
                line = response.readline()
                if not line:
                    break
                events.append(json.loads(line))
        finally:
            connection.close()
        return events


class Cluster:
    """A running server with every way in: raw HTTP, the kubernetes client and kubectl."""

    def __init__(self, server: APIServer, tmp_path: pathlib.Path) -> None:
        self.server = server
        self.kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server.url)
        self.cache_dir = tmp_path / "kubectl-cache"
        self.raw = RawClient(server.url)
        self.api_client = kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))
        self.core = kubernetes.client.CoreV1Api(self.api_client)
        self.custom = kubernetes.client.CustomObjectsApi(self.api_client)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig), "--cache-dir", str(self.cache_dir), *args],
            input=input, capture_output=True, text=True, timeout=timeout,
        )
        if check:
            assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result

    def install_widgets(self) -> None:
        self.raw.ok("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", WIDGET_CRD)

    def close(self) -> None:
        self.api_client.close()


def _cluster(tmp_path: pathlib.Path, **kwargs: Any) -> Iterator[Cluster]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    with running_apiserver(**kwargs) as server:
        cluster = Cluster(server, tmp_path)
        try:
            yield cluster
        finally:
            cluster.close()


@pytest.fixture
def cluster(tmp_path: pathlib.Path) -> Iterator[Cluster]:
    """A server whose pods go at once when deleted (no kubelet), with the Widget CRD installed."""
    for cluster in _cluster(tmp_path, kubelet=False):
        cluster.install_widgets()
        yield cluster


@pytest.fixture
def kubelet_cluster(tmp_path: pathlib.Path) -> Iterator[Cluster]:
    """A server that leaves deleted pods to a kubelet (played by the test)."""
    yield from _cluster(tmp_path, kubelet=True)


def widget(name: str, size: int = 3, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "example.test/v1", "kind": "Widget", "metadata": {"name": name},
            "spec": {"size": size, **spec}}


def configmap(name: str, labels: dict[str, str] | None = None, **metadata: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "labels": labels or {}, **metadata}, "data": {"k": "v"}}


def pod(name: str, labels: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}},
            "spec": {"containers": [{"name": "main", "image": "python", "command": ["sleep", "1"]}], **spec}}


def owner_ref(obj: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def names(listing: dict[str, Any]) -> list[str]:
    return [item["metadata"]["name"] for item in listing["items"]]


def wait_for(condition: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# ---- object metadata -----------------------------------------------------------------------------------


def test_server_assigns_uid_versions_generation_and_generated_names(cluster: Cluster) -> None:
    first = cluster.raw.ok("POST", CONFIGMAPS, configmap("first"))
    second = cluster.raw.ok("POST", CONFIGMAPS, configmap("", generateName="job-"))
    meta1, meta2 = first["metadata"], second["metadata"]
    assert len(meta1["uid"]) == 36 and meta1["uid"] != meta2["uid"]
    assert int(meta2["resourceVersion"]) > int(meta1["resourceVersion"])
    assert meta1["creationTimestamp"].endswith("Z") and meta1["generation"] == 1
    assert meta2["name"].startswith("job-") and len(meta2["name"]) == len("job-") + 5

    created = cluster.raw.ok("POST", WIDGETS, widget("w"))
    assert created["spec"]["color"] == "red", "the schema default is applied on create"
    labelled = cluster.raw.ok("PATCH", f"{WIDGETS}/w", {"metadata": {"labels": {"a": "b"}}},
                              content_type="application/merge-patch+json")
    assert labelled["metadata"]["generation"] == 1, "metadata changes leave the generation alone"
    assert int(labelled["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    with_status = cluster.raw.ok("PATCH", f"{WIDGETS}/w/status", {"status": {"phase": "Ready"}},
                                 content_type="application/merge-patch+json")
    assert with_status["metadata"]["generation"] == 1, "status changes leave the generation alone"
    resized = cluster.raw.ok("PATCH", f"{WIDGETS}/w", {"spec": {"size": 4}},
                             content_type="application/merge-patch+json")
    assert resized["metadata"]["generation"] == 2, "a spec change bumps the generation"
    again = cluster.raw.ok("PATCH", f"{WIDGETS}/w", {"spec": {"size": 4}},
                           content_type="application/merge-patch+json")
    assert again["metadata"]["resourceVersion"] == resized["metadata"]["resourceVersion"], "no-op writes are free"

    listing = cluster.raw.ok("GET", CONFIGMAPS)
    assert listing["kind"] == "ConfigMapList" and listing["apiVersion"] == "v1"
    assert int(listing["metadata"]["resourceVersion"]) >= int(again["metadata"]["resourceVersion"])


def test_conflicts_and_missing_things_answer_like_the_real_server(cluster: Cluster) -> None:
    created = cluster.raw.ok("POST", CONFIGMAPS, configmap("cm"))
    status, body = cluster.raw.request("POST", CONFIGMAPS, configmap("cm"))
    assert (status, body["kind"], body["reason"]) == (409, "Status", "AlreadyExists")
    assert body["message"] == 'configmaps "cm" already exists'

    stale = {**created, "data": {"k": "stale"}}
    cluster.raw.ok("PUT", f"{CONFIGMAPS}/cm", {**created, "data": {"k": "fresh"}})
    status, body = cluster.raw.request("PUT", f"{CONFIGMAPS}/cm", stale)
    assert (status, body["reason"]) == (409, "Conflict")
    assert cluster.raw.ok("GET", f"{CONFIGMAPS}/cm")["data"] == {"k": "fresh"}

    status, body = cluster.raw.request("POST", "/api/v1/namespaces/nowhere/configmaps", configmap("x"))
    assert (status, body["reason"], body["message"]) == (404, "NotFound", 'namespaces "nowhere" not found')
    status, body = cluster.raw.request("GET", f"{WIDGETS}/ghost")
    assert (status, body["message"]) == (404, 'widgets.example.test "ghost" not found')

    with pytest.raises(kubernetes.client.ApiException) as raised:
        cluster.core.create_namespaced_config_map("default", configmap("cm"))
    assert raised.value.status == 409


def test_status_subresource_separates_status_from_spec(cluster: Cluster) -> None:
    cluster.raw.ok("POST", WIDGETS, {**widget("w"), "status": {"phase": "Forged"}})
    assert "status" not in cluster.raw.ok("GET", f"{WIDGETS}/w"), "status on create is dropped"
    cluster.raw.ok("PATCH", f"{WIDGETS}/w/status", {"spec": {"size": 9}, "status": {"phase": "Ready"}},
                   content_type="application/merge-patch+json")
    current = cluster.raw.ok("GET", f"{WIDGETS}/w")
    assert current["spec"]["size"] == 3 and current["status"]["phase"] == "Ready"

    cluster.raw.ok("PUT", f"{WIDGETS}/w", {**current, "spec": {**current["spec"], "size": 5},
                                            "status": {"phase": "Hacked"}})
    current = cluster.raw.ok("GET", f"{WIDGETS}/w")
    assert current["spec"]["size"] == 5 and current["status"]["phase"] == "Ready"

    # Pods too: the kubelet's status writes go through /status, the operator's spec writes cannot touch it.
    cluster.raw.ok("POST", PODS, pod("p"))
    cluster.raw.ok("PATCH", f"{PODS}/p", {"status": {"phase": "Running"}},
                   content_type="application/merge-patch+json")
    assert cluster.raw.ok("GET", f"{PODS}/p")["status"]["phase"] == "Pending"
    cluster.core.patch_namespaced_pod_status("p", "default", {"status": {"phase": "Running"}})
    assert cluster.core.read_namespaced_pod("p", "default").status.phase == "Running"


# ---- selectors and watches ---------------------------------------------------------------------------


def test_label_and_field_selectors_on_lists(cluster: Cluster) -> None:
    cluster.raw.ok("POST", "/api/v1/namespaces", {"metadata": {"name": "other"}})
    for name, labels in [("a", {"app": "x", "tier": "web"}), ("b", {"app": "y"}), ("c", {})]:
        cluster.raw.ok("POST", CONFIGMAPS, configmap(name, labels))
    cluster.raw.ok("POST", "/api/v1/namespaces/other/configmaps", configmap("d", {"app": "x"}))

    def select(selector: str, path: str = CONFIGMAPS) -> list[str]:
        return names(cluster.raw.ok("GET", f"{path}?labelSelector={selector}"))

    assert select("app%3Dx") == ["a"] and select("app%3D%3Dx") == ["a"]
    assert select("app!%3Dx") == ["b", "c"]
    assert select("app%20in%20(x,y)") == ["a", "b"]
    assert select("app%20notin%20(x)") == ["b", "c"]
    assert select("tier") == ["a"] and select("!app") == ["c"]
    assert select("app%3Dx,tier%3Dweb") == ["a"]
    assert select("app%3Dx", "/api/v1/configmaps") == ["a", "d"], "cluster-wide lists cover all namespaces"
    assert names(cluster.raw.ok("GET", f"{CONFIGMAPS}?fieldSelector=metadata.name%3Db")) == ["b"]
    assert names(cluster.raw.ok("GET", "/api/v1/configmaps?fieldSelector=metadata.namespace%3Dother")) == ["d"]
    status, body = cluster.raw.request("GET", f"{CONFIGMAPS}?labelSelector=app%20in%20x")
    assert (status, body["reason"]) == (400, "BadRequest")

    cluster.raw.ok("POST", PODS, pod("on-node", nodeName="node-1"))
    cluster.raw.ok("POST", PODS, pod("unscheduled"))
    cluster.raw.ok("PATCH", f"{PODS}/on-node/status", {"status": {"phase": "Running"}},
                   content_type="application/merge-patch+json")
    pods = cluster.core.list_pod_for_all_namespaces(field_selector="spec.nodeName=node-1")
    assert [item.metadata.name for item in pods.items] == ["on-node"]
    pods = cluster.core.list_namespaced_pod("default", field_selector="status.phase!=Running")
    assert [item.metadata.name for item in pods.items] == ["unscheduled"]


def test_watch_with_selector_sees_objects_enter_change_and_leave(cluster: Cluster) -> None:
    start = cluster.raw.ok("POST", CONFIGMAPS, configmap("before", {"app": "x"}))["metadata"]["resourceVersion"]
    cluster.raw.ok("POST", CONFIGMAPS, configmap("other", {"app": "y"}))
    cluster.raw.ok("PATCH", f"{CONFIGMAPS}/before", {"data": {"k": "2"}},
                   content_type="application/merge-patch+json")
    cluster.raw.ok("PATCH", f"{CONFIGMAPS}/before", {"metadata": {"labels": {"app": "gone"}}},
                   content_type="application/merge-patch+json")
    cluster.raw.ok("PATCH", f"{CONFIGMAPS}/other", {"metadata": {"labels": {"app": "x"}}},
                   content_type="application/merge-patch+json")
    cluster.raw.ok("DELETE", f"{CONFIGMAPS}/other")
    events = cluster.raw.watch(
        f"{CONFIGMAPS}?watch=true&labelSelector=app%3Dx&resourceVersion={start}&timeoutSeconds=2",
        until=lambda events: len(events) >= 4,
    )
    assert [(event["type"], event["object"]["metadata"]["name"]) for event in events] == [
        ("MODIFIED", "before"), ("DELETED", "before"), ("ADDED", "other"), ("DELETED", "other"),
    ]
    versions = [int(event["object"]["metadata"]["resourceVersion"]) for event in events]
    assert versions == sorted(versions) and versions[0] > int(start)

    # Without a resourceVersion, a watch starts with the current objects as ADDED events.
    initial = cluster.raw.watch(f"{CONFIGMAPS}?watch=true&timeoutSeconds=1", until=lambda events: False)
    assert [(event["type"], event["object"]["metadata"]["name"]) for event in initial] == [("ADDED", "before")]


def test_watch_from_a_too_old_version_is_gone_and_timeouts_end_streams(tmp_path: pathlib.Path) -> None:
    for cluster in _cluster(tmp_path, kubelet=False, history_limit=5, bookmark_interval=0.3):
        first = cluster.raw.ok("POST", CONFIGMAPS, configmap("cm-0"))["metadata"]["resourceVersion"]
        for index in range(1, 10):
            cluster.raw.ok("POST", CONFIGMAPS, configmap(f"cm-{index}"))
        events = cluster.raw.watch(f"{CONFIGMAPS}?watch=true&resourceVersion={first}", until=lambda e: bool(e))
        assert events[0]["type"] == "ERROR"
        assert (events[0]["object"]["code"], events[0]["object"]["reason"]) == (410, "Expired")

        started = time.monotonic()
        recent = cluster.raw.ok("GET", CONFIGMAPS)["metadata"]["resourceVersion"]
        events = cluster.raw.watch(f"{CONFIGMAPS}?watch=true&resourceVersion={recent}&timeoutSeconds=1",
                                   until=lambda e: False)
        assert events == [] and 0.9 < time.monotonic() - started < 5

        # Idle watches that allow bookmarks get them (kopf reconnects after 70 s without any event).
        events = cluster.raw.watch(f"{CONFIGMAPS}?watch=true&resourceVersion={recent}&allowWatchBookmarks=true",
                                   until=lambda e: len(e) >= 2)
        assert [event["type"] for event in events] == ["BOOKMARK", "BOOKMARK"]
        assert events[0]["object"]["metadata"]["resourceVersion"] == recent

        # sendInitialEvents: the current objects, then a bookmark that marks their end.
        events = cluster.raw.watch(
            f"{CONFIGMAPS}?watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan"
            "&allowWatchBookmarks=true", until=lambda e: bool(e) and e[-1]["type"] == "BOOKMARK")
        assert [event["type"] for event in events] == ["ADDED"] * 10 + ["BOOKMARK"]
        assert events[-1]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}

        # The kubernetes client turns the in-stream 410 into an ApiException, as with a real cluster.
        watch = kubernetes.watch.Watch()
        with pytest.raises(kubernetes.client.ApiException) as raised:
            for _ in watch.stream(cluster.core.list_namespaced_config_map, "default", resource_version=first,
                                  timeout_seconds=2):
                pass
        assert raised.value.status == 410


# ---- writes --------------------------------------------------------------------------------------------


def test_patch_flavours(cluster: Cluster) -> None:
    cluster.raw.ok("POST", CONFIGMAPS, configmap("cm"))
    merged = cluster.raw.ok("PATCH", f"{CONFIGMAPS}/cm", {"data": {"k": None, "new": "1"}},
                            content_type="application/merge-patch+json")
    assert merged["data"] == {"new": "1"}
    rv = merged["metadata"]["resourceVersion"]
    patched = cluster.raw.ok("PATCH", f"{CONFIGMAPS}/cm", [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/metadata/finalizers", "value": ["example.test/keep"]},
    ], content_type="application/json-patch+json")
    assert patched["metadata"]["finalizers"] == ["example.test/keep"]
    status, body = cluster.raw.request("PATCH", f"{CONFIGMAPS}/cm", [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "remove", "path": "/metadata/finalizers"},
    ], content_type="application/json-patch+json")
    assert status == 422, "kopf relies on a failed JSON-patch test being 422"

    # Strategic merge patches (the kubernetes client's default for built-in kinds) merge containers by name.
    cluster.raw.ok("POST", PODS, pod("p"))
    cluster.core.patch_namespaced_pod("p", "default", {"spec": {"containers": [{"name": "main", "image": "new"}]}})
    container = cluster.raw.ok("GET", f"{PODS}/p")["spec"]["containers"][0]
    assert container == {"name": "main", "image": "new", "command": ["sleep", "1"]}
    status, body = cluster.raw.request("PATCH", f"{PODS}/p", {"spec": {"restartPolicy": "Never"}},
                                       content_type="application/merge-patch+json")
    assert (status, body["reason"]) == (422, "Invalid"), "pod specs are immutable apart from images"


def test_finalizers_hold_deletion_until_removed(cluster: Cluster) -> None:
    cluster.raw.ok("POST", CONFIGMAPS, configmap("held", finalizers=["example.test/keep"]))
    deleting = cluster.raw.ok("DELETE", f"{CONFIGMAPS}/held")
    assert deleting["metadata"]["deletionTimestamp"]
    assert cluster.raw.ok("GET", f"{CONFIGMAPS}/held")["metadata"]["finalizers"] == ["example.test/keep"]
    status, body = cluster.raw.request("PATCH", f"{CONFIGMAPS}/held", {"metadata": {"finalizers": ["a", "b"]}},
                                       content_type="application/merge-patch+json")
    assert status == 422, "no new finalizers once deletion started"
    rv = deleting["metadata"]["resourceVersion"]
    cluster.raw.ok("PATCH", f"{CONFIGMAPS}/held", {"metadata": {"finalizers": None}},
                   content_type="application/merge-patch+json")
    assert cluster.raw.request("GET", f"{CONFIGMAPS}/held")[0] == 404
    events = cluster.raw.watch(f"{CONFIGMAPS}?watch=true&resourceVersion={rv}", until=lambda e: bool(e))
    assert events[0]["type"] == "DELETED"

    # deletecollection takes a selector.
    for name in ("x1", "x2", "y1"):
        cluster.raw.ok("POST", CONFIGMAPS, configmap(name, {"group": name[0]}))
    cluster.raw.ok("DELETE", f"{CONFIGMAPS}?labelSelector=group%3Dx")
    assert names(cluster.raw.ok("GET", CONFIGMAPS)) == ["y1"]


def test_pods_wait_for_the_kubelet_when_deleted(kubelet_cluster: Cluster, tmp_path: pathlib.Path) -> None:
    raw = kubelet_cluster.raw
    raw.ok("POST", PODS, pod("p", terminationGracePeriodSeconds=7))
    deleting = raw.ok("DELETE", f"{PODS}/p")
    assert deleting["metadata"]["deletionGracePeriodSeconds"] == 7 and deleting["metadata"]["deletionTimestamp"]
    assert raw.request("GET", f"{PODS}/p")[0] == 200, "the pod stays until the kubelet has stopped it"
    shorter = raw.ok("DELETE", f"{PODS}/p?gracePeriodSeconds=2")
    assert shorter["metadata"]["deletionGracePeriodSeconds"] == 2
    raw.ok("DELETE", f"{PODS}/p", {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0})
    assert raw.request("GET", f"{PODS}/p")[0] == 404

    # Without a kubelet, pods go at once.
    for cluster in _cluster(tmp_path / "no-kubelet", kubelet=False):
        cluster.raw.ok("POST", PODS, pod("p"))
        cluster.raw.ok("DELETE", f"{PODS}/p")
        assert cluster.raw.request("GET", f"{PODS}/p")[0] == 404


def test_garbage_collection_follows_owner_references(cluster: Cluster) -> None:
    owner = cluster.raw.ok("POST", WIDGETS, widget("owner"))
    survivor = cluster.raw.ok("POST", WIDGETS, widget("survivor"))
    child = cluster.raw.ok("POST", CONFIGMAPS, configmap("child", ownerReferences=[owner_ref(owner)]))
    cluster.raw.ok("POST", PODS, {**pod("grandchild"), "metadata": {
        "name": "grandchild", "ownerReferences": [owner_ref(child)]}})
    cluster.raw.ok("POST", CONFIGMAPS, configmap("shared", ownerReferences=[owner_ref(owner), owner_ref(survivor)]))
    cluster.raw.ok("POST", CONFIGMAPS, configmap("unrelated"))

    cluster.raw.ok("DELETE", f"{WIDGETS}/owner")
    assert names(cluster.raw.ok("GET", CONFIGMAPS)) == ["shared", "unrelated"]
    assert names(cluster.raw.ok("GET", PODS)) == [], "dependents of dependents go too"
    shared = cluster.raw.ok("GET", f"{CONFIGMAPS}/shared")
    assert [ref["name"] for ref in shared["metadata"]["ownerReferences"]] == ["survivor"]

    # An owner reference to something that does not exist makes the object garbage.
    dangling = {**owner_ref(owner), "uid": "00000000-0000-0000-0000-000000000000"}
    cluster.raw.ok("POST", CONFIGMAPS, configmap("orphan", ownerReferences=[dangling]))
    wait_for(lambda: cluster.raw.request("GET", f"{CONFIGMAPS}/orphan")[0] == 404, 5, "the orphan to go")

    # propagationPolicy=Orphan keeps the dependents and drops their references.
    cluster.raw.ok("POST", CONFIGMAPS, configmap("kept", ownerReferences=[owner_ref(survivor)]))
    cluster.raw.ok("DELETE", f"{WIDGETS}/survivor", {"propagationPolicy": "Orphan"})
    assert cluster.raw.ok("GET", f"{CONFIGMAPS}/kept")["metadata"].get("ownerReferences", []) == []


def test_namespaces_take_their_contents_with_them(cluster: Cluster) -> None:
    cluster.core.create_namespace({"metadata": {"name": "team"}})
    cluster.core.create_namespaced_config_map("team", configmap("cm"))
    cluster.core.delete_namespace("team")
    with pytest.raises(kubernetes.client.ApiException) as raised:
        cluster.core.read_namespace("team")
    assert raised.value.status == 404
    assert cluster.raw.ok("GET", "/api/v1/configmaps?fieldSelector=metadata.namespace%3Dteam")["items"] == []
    assert cluster.raw.request("POST", "/api/v1/namespaces/team/configmaps", configmap("again"))[0] == 404
    assert cluster.raw.request("DELETE", "/api/v1/namespaces/default")[0] == 403


def test_events_of_both_apis_share_one_store(cluster: Cluster) -> None:
    cluster.raw.ok("POST", "/apis/events.k8s.io/v1/namespaces/default/events", {
        "apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "new-style"},
        "eventTime": "2024-01-01T00:00:00.000000Z", "reportingController": "test", "reportingInstance": "t",
        "action": "Testing", "reason": "Tested", "note": "from events.k8s.io", "type": "Normal",
        "regarding": {"kind": "Widget", "name": "w", "namespace": "default"},
    })
    core = cluster.raw.ok("GET", "/api/v1/namespaces/default/events?fieldSelector=involvedObject.name%3Dw")
    assert [(item["reason"], item["message"]) for item in core["items"]] == [("Tested", "from events.k8s.io")]
    new = cluster.raw.ok("GET", "/apis/events.k8s.io/v1/namespaces/default/events/new-style")
    assert new["note"] == "from events.k8s.io" and new["regarding"]["name"] == "w"


# ---- validation ----------------------------------------------------------------------------------------


def test_invalid_custom_objects_get_422_with_the_field_path(cluster: Cluster) -> None:
    status, body = cluster.raw.request("POST", WIDGETS, widget("big", size=11))
    assert (status, body["kind"], body["reason"], body["code"]) == (422, "Status", "Invalid", 422)
    assert body["message"].startswith('Widget.example.test "big" is invalid: spec.size: Invalid value: ')
    assert "size cannot exceed 10" in body["message"]
    assert body["details"]["name"] == "big" and body["details"]["group"] == "example.test"
    assert body["details"]["kind"] == "Widget"
    assert [(cause["reason"], cause["field"]) for cause in body["details"]["causes"]] == [
        ("FieldValueInvalid", "spec.size")]

    status, body = cluster.raw.request("POST", WIDGETS, {**widget("nosize"), "spec": {}})
    assert status == 422 and body["details"]["causes"][0] == {
        "reason": "FieldValueRequired", "message": "Required value", "field": "spec.size"}

    cluster.raw.ok("POST", WIDGETS, widget("w", color="blue"))
    status, body = cluster.raw.request("PATCH", f"{WIDGETS}/w", {"spec": {"color": "red"}},
                                       content_type="application/merge-patch+json")
    assert status == 422 and "color is immutable" in body["message"], "transition rules see oldSelf"
    assert body["details"]["causes"][0]["field"] == "spec.color"

    # The kubernetes client surfaces it as an ApiException with the same Status.
    with pytest.raises(kubernetes.client.ApiException) as raised:
        cluster.custom.create_namespaced_custom_object("example.test", "v1", "default", "widgets",
                                                       widget("zero", size=0))
    assert raised.value.status == 422 and "spec.size" in json.loads(raised.value.body)["message"]


# ---- kubectl -------------------------------------------------------------------------------------------


def test_kubectl_get_apply_describe_wait_delete(cluster: Cluster) -> None:
    manifest = yaml.safe_dump(widget("w", size=2))
    assert cluster.kubectl("apply", "-f", "-", input=manifest).stdout.strip() == "widget.example.test/w created"
    assert cluster.kubectl("apply", "-f", "-", input=manifest).stdout.strip() == "widget.example.test/w unchanged"
    changed = yaml.safe_dump(widget("w", size=4))
    assert cluster.kubectl("apply", "-f", "-", input=changed).stdout.strip() == "widget.example.test/w configured"
    assert cluster.raw.ok("GET", f"{WIDGETS}/w")["metadata"]["generation"] == 2

    rejected = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(widget("bad", size=50)), check=False)
    assert rejected.returncode != 0 and "spec.size" in rejected.stderr and "size cannot exceed 10" in rejected.stderr

    table = cluster.kubectl("get", "wd").stdout.splitlines()
    assert table[0].split() == ["NAME", "SIZE", "PHASE", "AGE"]
    assert table[1].split()[:2] == ["w", "4"] and len(table[1].split()) == 3, "no phase yet: a blank cell"
    as_json = json.loads(cluster.kubectl("get", "widgets", "w", "-o", "json").stdout)
    assert as_json["spec"] == {"size": 4, "color": "red"}
    assert "widget.example.test/w" in cluster.kubectl("get", "all", "-o", "name").stdout

    # A controller reports through status and events; kubectl shows both.
    current = cluster.custom.get_namespaced_custom_object("example.test", "v1", "default", "widgets", "w")
    cluster.core.create_namespaced_event("default", {
        "metadata": {"generateName": "w."}, "reason": "Assembled", "message": "all parts in place",
        "type": "Normal", "source": {"component": "widget-controller"}, "count": 1,
        "firstTimestamp": current["metadata"]["creationTimestamp"],
        "lastTimestamp": current["metadata"]["creationTimestamp"],
        "involvedObject": {"apiVersion": "example.test/v1", "kind": "Widget", "name": "w", "namespace": "default",
                           "uid": current["metadata"]["uid"]},
    })
    waiter = subprocess.Popen(
        ["kubectl", "--kubeconfig", str(cluster.kubeconfig), "--cache-dir", str(cluster.cache_dir), "wait",
         "widget/w", "--for=jsonpath={.status.phase}=Ready", "--timeout=30s"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    time.sleep(0.5)
    cluster.custom.patch_namespaced_custom_object_status("example.test", "v1", "default", "widgets", "w", {
        "status": {"phase": "Ready", "conditions": [{"type": "Ready", "status": "True", "reason": "Assembled",
                                                      "message": "ok", "lastTransitionTime": "2024-01-01T00:00:00Z"}]}
    })
    out, err = waiter.communicate(timeout=40)
    assert waiter.returncode == 0, err
    assert out.strip() == "widget.example.test/w condition met"
    assert cluster.kubectl("wait", "widget/w", "--for=condition=Ready", "--timeout=10s").returncode == 0
    assert cluster.kubectl("get", "wd").stdout.splitlines()[1].split()[:3] == ["w", "4", "Ready"]
    described = cluster.kubectl("describe", "widget", "w").stdout
    assert "Size:   4" in described or "Size:  4" in described
    assert "Assembled" in described and "all parts in place" in described, described

    cluster.raw.ok("POST", PODS, pod("p"))
    pods = cluster.kubectl("get", "pods").stdout.splitlines()
    assert pods[0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert pods[1].split()[:4] == ["p", "0/1", "Pending", "0"]
    assert "Image:" in cluster.kubectl("describe", "pod", "p").stdout

    deleted = cluster.kubectl("delete", "widget", "w", "--wait=true", "--timeout=30s")
    assert deleted.stdout.strip() == 'widget.example.test "w" deleted'
    assert cluster.raw.request("GET", f"{WIDGETS}/w")[0] == 404
    assert "No resources found" in cluster.kubectl("get", "wd").stderr


def test_kubectl_wait_for_delete_and_logs_from_the_kubelet_hook(kubelet_cluster: Cluster) -> None:
    cluster = kubelet_cluster
    cluster.raw.ok("POST", PODS, pod("p"))
    no_logs = cluster.kubectl("logs", "p", check=False)
    assert no_logs.returncode != 0, "without a kubelet there are no logs"

    calls: list[tuple[str, str, str, bool, int | None]] = []

    def provider(namespace: str, name: str, container: str, follow: bool, tail_lines: int | None) -> bytes:
        calls.append((namespace, name, container, follow, tail_lines))
        return b"line one\nline two\n"

    cluster.server.set_log_provider(provider)
    assert cluster.kubectl("logs", "p", "--tail=5").stdout == "line one\nline two\n"
    assert calls == [("default", "p", "main", False, 5)]

    # `kubectl delete` waits until the kubelet (here: the test) has finished the pod.
    deleting = subprocess.Popen(
        ["kubectl", "--kubeconfig", str(cluster.kubeconfig), "--cache-dir", str(cluster.cache_dir), "delete",
         "pod", "p", "--timeout=30s"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wait_for(lambda: cluster.raw.ok("GET", f"{PODS}/p")["metadata"].get("deletionTimestamp"), 20,
             "the pod to be marked for deletion")
    assert deleting.poll() is None, "kubectl is still waiting for the pod to go"
    cluster.raw.ok("DELETE", f"{PODS}/p?gracePeriodSeconds=0")
    out, err = deleting.communicate(timeout=30)
    assert deleting.returncode == 0, err
    assert out.strip() == 'pod "p" deleted'


def test_kubectl_create_generators_work_despite_their_protobuf_bodies(cluster: Cluster) -> None:
    assert cluster.kubectl("create", "namespace", "team").stdout.strip() == "namespace/team created"
    cluster.kubectl("create", "secret", "generic", "s3-credentials", "-n", "team",
                    "--from-literal=AWS_ACCESS_KEY_ID=key", "--from-literal=AWS_SECRET_ACCESS_KEY=secret")
    cluster.kubectl("create", "configmap", "settings", "--from-literal=a=b", "-n", "team")
    secret = cluster.core.read_namespaced_secret("s3-credentials", "team")
    assert secret.data == {"AWS_ACCESS_KEY_ID": "a2V5", "AWS_SECRET_ACCESS_KEY": "c2VjcmV0"}
    assert secret.type == "Opaque"
    assert cluster.core.read_namespaced_config_map("settings", "team").data == {"a": "b"}
    assert cluster.core.read_namespace("team").status.phase == "Active"


def test_crds_of_the_repository_are_served_with_discovery(tmp_path: pathlib.Path) -> None:
    for cluster in _cluster(tmp_path, kubelet=False):
        assert cluster.server.install_crds(REPO / "crds") == ["finetunejobs.finetune.dev"]
        resources = cluster.raw.ok("GET", "/apis/finetune.dev/v1alpha1")["resources"]
        assert {entry["name"] for entry in resources} >= {"finetunejobs", "finetunejobs/status"}
        assert "ftj" in cluster.kubectl("api-resources", "--api-group=finetune.dev").stdout
        header = cluster.kubectl("get", "ftj", "-A").stderr
        assert "No resources found" in header
        assert cluster.kubectl("version", "-o", "json").returncode == 0


# ---- kopf ----------------------------------------------------------------------------------------------

OPERATOR = textwrap.dedent('''
    """A tiny operator: each Widget gets an adopted ConfigMap and a Ready phase."""
    from typing import Any

    import kopf
    import kubernetes


    @kopf.on.startup()
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="example.test")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="example.test")
        settings.posting.level = 0
        kubernetes.config.load_kube_config()


    @kopf.on.create("example.test", "v1", "widgets")
    def create_configmap(spec: kopf.Spec, name: str, namespace: str, body: kopf.Body, patch: kopf.Patch,
                         **_: Any) -> None:
        configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-parts"},
                     "data": {"size": str(spec["size"])}}
        kopf.adopt(configmap)
        kubernetes.client.CoreV1Api().create_namespaced_config_map(namespace, configmap)
        patch.status["phase"] = "Ready"
        kopf.info(body, reason="Assembled", message=f"configmap {name}-parts created")


    @kopf.on.delete("example.test", "v1", "widgets")
    def goodbye(name: str, logger: kopf.Logger, **_: Any) -> None:
        logger.info("widget %s is going", name)
''')


def test_kopf_operator_adopts_children_and_patches_status(cluster: Cluster, tmp_path: pathlib.Path) -> None:
    operator = tmp_path / "operator.py"
    operator.write_text(OPERATOR)
    log = (tmp_path / "kopf.log").open("w")
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    process = subprocess.Popen(
        [sys.executable, "-m", "kopf", "run", "--standalone", "--namespace=default", "--verbose", str(operator)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(widget("gadget", size=5)))

        def phase() -> Any:
            return cluster.raw.ok("GET", f"{WIDGETS}/gadget").get("status", {}).get("phase") == "Ready"

        wait_for(phase, 60, "kopf to mark the widget Ready")
        parts = cluster.raw.ok("GET", f"{CONFIGMAPS}/gadget-parts")
        gadget = cluster.raw.ok("GET", f"{WIDGETS}/gadget")
        assert parts["data"] == {"size": "5"}
        assert parts["metadata"]["ownerReferences"][0]["uid"] == gadget["metadata"]["uid"]
        assert gadget["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
        assert any(key.startswith("example.test/") for key in gadget["metadata"]["annotations"]), "kopf's progress"
        described = wait_for(lambda: (out := cluster.kubectl("describe", "widget", "gadget").stdout)
                             and "Assembled" in out and out, 30, "kopf's event")
        assert "configmap gadget-parts created" in described

        cluster.kubectl("delete", "widget", "gadget", "--timeout=60s")
        assert cluster.raw.request("GET", f"{WIDGETS}/gadget")[0] == 404, "kopf released its finalizer"
        assert cluster.raw.request("GET", f"{CONFIGMAPS}/gadget-parts")[0] == 404, "the child was collected"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    output = (tmp_path / "kopf.log").read_text()
    assert "Handler 'create_configmap' succeeded" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]

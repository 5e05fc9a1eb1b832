"""Kueue admits FineTuneJobs as whole gangs: the real Kueue manager (built from its Go module), the real control plane
and the real operator with the chart's RBAC (rendered for a cluster that has Kueue's CRDs).

No scheduler and no kubelet run: the tests set pod phases as a kubelet would (and the topology test registers Node
objects as kubelets would), and every quota, admission, topology, preemption and release decision is Kueue's own.
Each test makes its own ResourceFlavor and ClusterQueue, so none depends on another's quota.
"""

from __future__ import annotations

import datetime
import pathlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from test_operator import Client, phase_is, pods_are

from localcluster.chart import install_chart
from localcluster.controlplane import ControlPlane
from localcluster.kueue import Kueue
from localcluster.operator_process import OperatorProcess
from localcluster.pytest_plugin import wait_until

pytestmark = pytest.mark.integration

REPO = pathlib.Path(__file__).resolve().parents[2]
KUEUE = "/apis/kueue.x-k8s.io/v1beta2"
TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# Each job's gang: 2 pods of 2 CPUs (test_operator.BASE_SPEC).
GANG_CPUS = 4


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlPlane, pathlib.Path, Kueue]]:
    """The control plane, Kueue on it, then the chart installed for a cluster that serves Kueue's API."""
    work = tmp_path_factory.mktemp("kueue")
    with ControlPlane(work / "control-plane", scheduler=False) as control_plane:
        with Kueue(control_plane, work / "kueue") as kueue:
            kubeconfig = install_chart(control_plane, work / "operator.kubeconfig",
                                       api_versions=("kueue.x-k8s.io/v1beta2",))
            yield control_plane, kubeconfig, kueue


@pytest.fixture(scope="module")
def operator_kubeconfig(plane: tuple[ControlPlane, pathlib.Path, Kueue]) -> pathlib.Path:
    return plane[1]


@pytest.fixture
def client(plane: tuple[ControlPlane, pathlib.Path, Kueue], operator: OperatorProcess) -> Iterator[Client]:
    yield Client(plane[0])
    if not operator.running:
        pytest.fail(f"the operator died:\n{operator.log_tail()}")
    if plane[2].process is None or plane[2].process.poll() is not None:
        pytest.fail(f"kueue died:\n{plane[2].log_tail()}")


class Queue:
    """A ResourceFlavor, a ClusterQueue with ``cpus`` of it and a LocalQueue in ``ns``, all named for one test."""

    def __init__(self, client: Client, ns: str, cpus: int, preemption: bool = False,
                 topology: str | None = None) -> None:
        self.client, self.ns = client, ns
        self.flavor = self.cluster_queue = f"q-{uuid.uuid4().hex[:8]}"
        self.local_queue = "team"
        flavor: dict[str, Any] = {"nodeLabels": {"pool": self.flavor}, "tolerations": [TOLERATION]}
        if topology is not None:
            flavor["topologyName"] = topology
        client.call("POST", f"{KUEUE}/resourceflavors", {
            "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ResourceFlavor", "metadata": {"name": self.flavor},
            "spec": flavor})
        spec: dict[str, Any] = {"namespaceSelector": {}, "resourceGroups": [self._group(cpus)]}
        if preemption:
            spec["preemption"] = {"withinClusterQueue": "LowerPriority"}
        client.call("POST", f"{KUEUE}/clusterqueues", {
            "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": self.cluster_queue},
            "spec": spec})
        client.call("POST", f"{KUEUE}/namespaces/{ns}/localqueues", {
            "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
            "metadata": {"name": self.local_queue, "namespace": ns}, "spec": {"clusterQueue": self.cluster_queue}})

    def _group(self, cpus: int) -> dict[str, Any]:
        return {"coveredResources": ["cpu", "memory"], "flavors": [{"name": self.flavor, "resources": [
            {"name": "cpu", "nominalQuota": str(cpus)}, {"name": "memory", "nominalQuota": "64Gi"}]}]}

    def set_cpus(self, cpus: int) -> None:
        self.client.call("PATCH", f"{KUEUE}/clusterqueues/{self.cluster_queue}",
                         {"spec": {"resourceGroups": [self._group(cpus)]}}, "application/merge-patch+json")

    def workload(self, job: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.client.call(
            "GET", f"{KUEUE}/namespaces/{self.ns}/workloads/finetunejob-{job}")
        return found


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((item for item in status.get("conditions") or [] if item["type"] == kind), {})


def workload_condition(workload: dict[str, Any] | None, kind: str) -> str | None:
    return condition((workload or {}).get("status") or {}, kind).get("status")


def run_gang(client: Client, ns: str, job: str, attempt: int = 0) -> None:
    names = [f"{job}-a{attempt}-n0", f"{job}-a{attempt}-n1"]
    wait_until(lambda: all(name in client.pod_names(ns) for name in names), what=f"pods {names}")
    for index, name in enumerate(names):
        client.run_pod(ns, name, ip=f"10.0.0.{index + 1}")
    wait_until(phase_is(client, ns, job, "Running"), what=f"{job} Running")


def test_a_job_is_queued_without_quota_and_starts_on_the_flavors_nodes_once_admitted(client: Client) -> None:
    ns = client.create_namespace()
    queue = Queue(client, ns, cpus=0)
    client.create_job(ns, "llm", queueName=queue.local_queue)
    status = wait_until(lambda: (s := client.status(ns, "llm")).get("phase") == "Queued"
                        and "insufficient quota" in condition(s, "Queued").get("message", "") and s,
                        what="Queued with Kueue's reason")
    assert condition(status, "Queued")["status"] == "True"
    assert client.pod_names(ns) == []
    workload = queue.workload("llm")
    assert workload is not None
    job = client.job(ns, "llm")
    assert job is not None
    assert workload["spec"]["podSets"][0]["count"] == 2
    assert workload["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert workload["metadata"]["ownerReferences"][0]["controller"] is True

    queue.set_cpus(GANG_CPUS)
    wait_until(pods_are(client, ns, ["llm-a0-n0", "llm-a0-n1"]), what="the gang, once admitted")
    for pod in client.items(ns, "pods"):
        assert pod["spec"]["nodeSelector"] == {"pool": queue.flavor}
        assert TOLERATION in pod["spec"]["tolerations"]
    status = wait_until(phase_is(client, ns, "llm", "Pending"), what="Pending")
    assert condition(status, "Queued")["status"] == "False"
    assert condition(status, "Queued")["reason"] == "Admitted"


def test_a_second_job_waits_for_the_first_and_starts_when_it_finishes(client: Client) -> None:
    ns = client.create_namespace()
    queue = Queue(client, ns, cpus=GANG_CPUS)
    client.create_job(ns, "first", queueName=queue.local_queue)
    run_gang(client, ns, "first")
    client.create_job(ns, "second", queueName=queue.local_queue, startupDeadlineSeconds=1)
    wait_until(phase_is(client, ns, "second", "Queued"), what="the second job Queued")
    assert not [name for name in client.pod_names(ns) if name.startswith("second")]

    client.end_pod(ns, "first-a0-n0", 0)
    wait_until(phase_is(client, ns, "first", "Succeeded"), what="the first job Succeeded")
    wait_until(lambda: workload_condition(queue.workload("first"), "Finished") == "True",
               what="the first Workload Finished (its quota released)")
    run_gang(client, ns, "second")
    status = client.status(ns, "second")
    assert (status["phase"], status["countedFailures"]) == ("Running", 0)


def test_a_preempted_gang_restarts_from_its_checkpoint_without_counting_a_failure(client: Client) -> None:
    ns = client.create_namespace()
    queue = Queue(client, ns, cpus=GANG_CPUS, preemption=True)
    for name, value in ((f"{queue.flavor}-low", 100), (f"{queue.flavor}-high", 1000)):
        client.call("POST", f"{KUEUE}/workloadpriorityclasses", {
            "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "WorkloadPriorityClass", "metadata": {"name": name},
            "value": value})
    client.create_job(ns, "low", queueName=queue.local_queue, workloadPriorityClass=f"{queue.flavor}-low",
                      backoffLimit=0)
    run_gang(client, ns, "low")
    client.create_job(ns, "high", queueName=queue.local_queue, workloadPriorityClass=f"{queue.flavor}-high")

    status = wait_until(phase_is(client, ns, "low", "Queued"), what="the low-priority job evicted")
    assert (status["attempt"], status["restarts"], status["countedFailures"]) == (1, 1, 0)
    assert condition(status, "Queued")["reason"] == "Preempted"
    run_gang(client, ns, "high")
    assert not [name for name in client.pod_names(ns) if name.startswith("low")]

    client.end_pod(ns, "high-a0-n0", 0)
    run_gang(client, ns, "low", attempt=1)
    status = client.status(ns, "low")
    assert (status["attempt"], status["countedFailures"]) == (1, 0)
    assert "Evicted" in client.event_reasons(ns, "low")


def test_suspend_while_queued_leaves_the_queue_and_a_resize_queues_the_new_shape(client: Client) -> None:
    ns = client.create_namespace()
    queue = Queue(client, ns, cpus=0)
    client.create_job(ns, "llm", queueName=queue.local_queue)
    wait_until(phase_is(client, ns, "llm", "Queued"), what="Queued")
    assert queue.workload("llm") is not None

    client.patch_job(ns, "llm", {"spec": {"suspend": True}})
    wait_until(phase_is(client, ns, "llm", "Suspended"), what="Suspended")
    wait_until(lambda: queue.workload("llm") is None, what="the Workload deleted")
    assert condition(client.status(ns, "llm"), "Queued")["status"] == "False"

    client.patch_job(ns, "llm", {"spec": {"distributed": {"nodes": 1}}})
    client.patch_job(ns, "llm", {"spec": {"suspend": False}})
    wait_until(phase_is(client, ns, "llm", "Queued"), what="Queued again")
    workload = wait_until(lambda: queue.workload("llm"), what="a new Workload")
    assert workload["spec"]["podSets"][0]["count"] == 1
    queue.set_cpus(GANG_CPUS)
    wait_until(pods_are(client, ns, ["llm-a0-n0"]), what="the one-pod gang")


def test_the_kueue_example_works_as_written(client: Client, plane: tuple[ControlPlane, pathlib.Path, Kueue]) -> None:
    control_plane = plane[0]
    control_plane.kubectl("create", "namespace", "team-a")
    control_plane.kubectl("apply", "-f", str(REPO / "examples" / "kueue.yaml"))
    wait_until(pods_are(client, "team-a", ["mistral-7b-qa-a0-n0", "mistral-7b-qa-a0-n1"]),
               what="the example's gang, admitted to a100-on-demand", timeout=60)
    for pod in client.items("team-a", "pods"):
        assert pod["spec"]["nodeSelector"] == {"finetune.dev/pool": "gpu-a100",
                                               "karpenter.sh/capacity-type": "on-demand"}
        assert TOLERATION in pod["spec"]["tolerations"]
    workload = client.call("GET", f"{KUEUE}/namespaces/team-a/workloads/finetunejob-mistral-7b-qa")
    assert workload["spec"]["priority"] == 1000


RACK = "cloud.provider.com/topology-rack"
HOSTNAME = "kubernetes.io/hostname"


def add_ready_node(client: Client, name: str, labels: dict[str, str]) -> None:
    """A Node as its kubelet would report it: 2 CPUs (one pod of the gang), Ready. No kubelet runs: the test is
    over well before the node lifecycle controller would miss its heartbeats."""
    client.call("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                          "metadata": {"name": name, "labels": {HOSTNAME: name, **labels}}})
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    amounts = {"cpu": "2", "memory": "8Gi", "pods": "110"}
    client.call("PATCH", f"/api/v1/nodes/{name}/status", {"status": {
        "capacity": amounts, "allocatable": amounts,
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "ready",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}]}}, "application/merge-patch+json")


def test_a_required_topology_puts_the_whole_gang_in_the_one_rack_kueue_chose(client: Client) -> None:
    """Kueue's topology-aware scheduling: one node in rack r1, two in r2, one pod per node. Kueue admits the gang
    into r2, the only rack that takes both pods, and its topology ungater gives each gated pod the nodeSelector
    of its node, then lifts the gate. No scheduler runs: binding the pods to those nodes is the scheduler's part."""
    ns = client.create_namespace()
    tag = uuid.uuid4().hex[:8]
    topology = f"racks-{tag}"
    client.call("POST", f"{KUEUE}/topologies", {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Topology", "metadata": {"name": topology},
        "spec": {"levels": [{"nodeLabel": RACK}, {"nodeLabel": HOSTNAME}]}})
    queue = Queue(client, ns, cpus=GANG_CPUS, topology=topology)
    nodes = {f"{tag}-a": f"{tag}-r1", f"{tag}-b": f"{tag}-r2", f"{tag}-c": f"{tag}-r2"}
    for name, rack in nodes.items():
        add_ready_node(client, name, {"pool": queue.flavor, RACK: rack})

    client.create_job(ns, "llm", queueName=queue.local_queue, topology={"required": RACK})
    workload = wait_until(lambda: queue.workload("llm"), what="the Workload")
    assert workload["spec"]["podSets"][0]["topologyRequest"] == {"required": RACK,
                                                                 "podIndexLabel": "finetune.dev/node-rank"}
    wait_until(pods_are(client, ns, ["llm-a0-n0", "llm-a0-n1"]), what="the gang, once admitted")

    def ungated() -> list[dict[str, Any]] | None:
        pods = client.items(ns, "pods")
        return pods if all(not pod["spec"].get("schedulingGates") for pod in pods) else None

    pods = wait_until(ungated, what="Kueue's topology ungater to lift the gates")
    selectors = [pod["spec"]["nodeSelector"] for pod in pods]
    # The assignment names the lowest level only (a node implies its rack).
    assert sorted(selector[HOSTNAME] for selector in selectors) == [f"{tag}-b", f"{tag}-c"]
    assert {nodes[selector[HOSTNAME]] for selector in selectors} == {f"{tag}-r2"}
    assert all(selector["pool"] == queue.flavor for selector in selectors)
    for pod in pods:
        assert pod["metadata"]["annotations"]["kueue.x-k8s.io/podset-required-topology"] == RACK


def test_an_invalid_edit_fails_the_job_and_finishes_its_workload_so_the_next_job_is_admitted(client: Client) -> None:
    """The grace period (120 s by default) must be shorter than activeDeadlineSeconds: a check only the operator
    makes, so the API server accepts the edit and the job fails with InvalidSpec. Its Workload is marked Finished
    as Kueue's own integrations do, and Kueue gives the quota to the next job at once."""
    ns = client.create_namespace()
    queue = Queue(client, ns, cpus=GANG_CPUS)
    client.create_job(ns, "first", queueName=queue.local_queue)
    run_gang(client, ns, "first")
    client.create_job(ns, "second", queueName=queue.local_queue)
    wait_until(phase_is(client, ns, "second", "Queued"), what="the second job Queued")

    client.patch_job(ns, "second", {"spec": {"activeDeadlineSeconds": 60}})
    status = wait_until(phase_is(client, ns, "second", "Failed"), what="the queued job Failed")
    assert condition(status, "InvalidSpec")["message"].startswith("spec.checkpoint.gracePeriodSeconds: ")
    assert condition(status, "Queued")["status"] == "False"
    wait_until(lambda: workload_condition(queue.workload("second"), "Finished") == "True",
               what="the queued job's Workload Finished")

    client.create_job(ns, "third", queueName=queue.local_queue)
    wait_until(phase_is(client, ns, "third", "Queued"), what="the third job Queued behind the first")
    client.patch_job(ns, "first", {"spec": {"activeDeadlineSeconds": 60}})
    status = wait_until(phase_is(client, ns, "first", "Failed"), what="the running job Failed")
    assert condition(status, "Failed")["reason"] == "InvalidSpec"
    workload = wait_until(lambda: (w := queue.workload("first")) and workload_condition(w, "Finished") == "True"
                          and w, what="the running job's Workload Finished")
    finished = condition(workload["status"], "Finished")
    assert finished["reason"] == "Failed" and finished["message"].startswith("spec.checkpoint.gracePeriodSeconds")
    run_gang(client, ns, "third")
    assert not [name for name in client.pod_names(ns) if name.startswith(("first", "second"))]

    # Corrected, the first job starts over with a new Workload: its Finished one still says Admitted, but that
    # quota is the third job's now, so it queues.
    old_uid = workload["metadata"]["uid"]
    client.patch_job(ns, "first", {"spec": {"activeDeadlineSeconds": 3600}})
    wait_until(lambda: (w := queue.workload("first")) is not None and w["metadata"]["uid"] != old_uid,
               what="a new Workload for the corrected job")
    # Kueue's words: "insufficient unused quota for cpu in flavor ...": the third job holds it.
    status = wait_until(lambda: (s := client.status(ns, "first")).get("phase") == "Queued"
                        and "insufficient unused quota" in condition(s, "Queued").get("message", "") and s,
                        what="the corrected job Queued behind the third")
    assert condition(status, "Failed")["status"] == "False"
    assert not [name for name in client.pod_names(ns) if name.startswith("first")]


def test_a_local_queue_that_does_not_exist_is_named_in_the_queued_condition_until_it_is_created(
    client: Client,
) -> None:
    ns = client.create_namespace()
    queue = Queue(client, ns, cpus=GANG_CPUS)
    client.create_job(ns, "llm", queueName="missing")
    status = wait_until(lambda: (s := client.status(ns, "llm")).get("phase") == "Queued"
                        and condition(s, "Queued").get("reason") == "Inadmissible" and s,
                        what="Queued with Kueue's Inadmissible reason")
    assert condition(status, "Queued")["message"] == "LocalQueue missing doesn't exist"
    assert status["message"] == "Queued: LocalQueue missing doesn't exist"
    assert client.pod_names(ns) == []

    client.call("POST", f"{KUEUE}/namespaces/{ns}/localqueues", {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
        "metadata": {"name": "missing", "namespace": ns}, "spec": {"clusterQueue": queue.cluster_queue}})
    wait_until(pods_are(client, ns, ["llm-a0-n0", "llm-a0-n1"]), what="the gang, once the LocalQueue exists")
    assert condition(client.status(ns, "llm"), "Queued")["reason"] == "Admitted"

"""Gang scheduling on the real control plane: the real operator with the chart's RBAC (gangScheduling.volcano and
.coscheduling on) creates each attempt's PodGroup as the real API server stores it under the schedulers' own CRDs
(scheduler-plugins' as its module ships it, Volcano's generated from its API types), and deletes it.

What is and is not tested: no Volcano or scheduler-plugins scheduler runs here (no scheduler at all, as in
test_operator), so nothing binds the pods and no gang is really held back. The tests check the operator's side
while the pods are Pending (the PodGroup exists with minMember and the summed minResources, owned by the job; the
pods name the scheduler and the group), then play the scheduler and the kubelet by setting pod phases, as
test_operator does, to reach a restart and the job's end, and check that the PodGroups go with their attempt and
with the job. Without the PodGroup CRD the real API server answers 404, and the job fails saying so.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
from test_operator import Client, phase_is, pods_are

from localcluster.chart import install_chart
from localcluster.controlplane import ControlPlane
from localcluster.operator_process import OperatorProcess
from localcluster.podgroups import install_podgroup_crds
from localcluster.pytest_plugin import wait_until

pytestmark = pytest.mark.integration

REPO = pathlib.Path(__file__).resolve().parents[2]
VOLCANO = "/apis/scheduling.volcano.sh/v1beta1"
COSCHEDULING = "/apis/scheduling.x-k8s.io/v1alpha1"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlPlane, pathlib.Path]]:
    """The control plane without a scheduler, both PodGroup CRDs, the chart with both gang switches on."""
    work = tmp_path_factory.mktemp("gang")
    with ControlPlane(work / "control-plane", scheduler=False) as control_plane:
        install_podgroup_crds(control_plane)
        kubeconfig = install_chart(control_plane, work / "operator.kubeconfig",
                                   values=("gangScheduling.volcano=true", "gangScheduling.coscheduling=true"))
        yield control_plane, kubeconfig


@pytest.fixture(scope="module")
def operator_kubeconfig(plane: tuple[ControlPlane, pathlib.Path]) -> pathlib.Path:
    return plane[1]


@pytest.fixture
def client(plane: tuple[ControlPlane, pathlib.Path], operator: OperatorProcess) -> Iterator[Client]:
    yield Client(plane[0])
    if operator.process is not None and not operator.running:
        pytest.fail(f"the operator died:\n{operator.log_tail()}")


def pod_group(client: Client, api: str, ns: str, name: str) -> dict[str, Any] | None:
    found: dict[str, Any] | None = client.call("GET", f"{api}/namespaces/{ns}/podgroups/{name}")
    return found


def pod_group_names(client: Client, api: str, ns: str) -> list[str]:
    return sorted(item["metadata"]["name"] for item in client.call("GET", f"{api}/namespaces/{ns}/podgroups")["items"])


def pods_by_name(client: Client, ns: str) -> dict[str, dict[str, Any]]:
    return {pod["metadata"]["name"]: pod for pod in client.items(ns, "pods")}


def check_pod_group_is_the_jobs(client: Client, group: dict[str, Any], ns: str, job: str) -> None:
    """Owned by the job as its controller, and created no later than the attempt's pods."""
    body = client.job(ns, job)
    assert body is not None
    (owner,) = group["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "FineTuneJob", job, body["metadata"]["uid"], True)
    created = int(group["metadata"]["resourceVersion"])
    pods = pods_by_name(client, ns)
    assert all(int(pod["metadata"]["resourceVersion"]) > created for pod in pods.values()), "PodGroup before pods"


def test_a_volcano_gang_has_its_pod_group_before_its_pods_and_loses_it_when_the_job_succeeds(client: Client) -> None:
    ns = client.create_namespace()
    client.create_job(ns, "llm", gang={"scheduler": "volcano", "queue": "research"},
                      resources={"cpu": "2", "memory": "4Gi", "ephemeralStorage": "10Gi"},
                      topology={"required": "cloud.provider.com/topology-rack"})
    wait_until(pods_are(client, ns, ["llm-a0-n0", "llm-a0-n1"]), what="two pending pods")
    group = pod_group(client, VOLCANO, ns, "llm-a0")
    assert group is not None
    assert group["spec"] == {
        "minMember": 2, "queue": "research",
        "minResources": {"cpu": "4", "memory": "8Gi", "ephemeral-storage": "20Gi"},
        "networkTopology": {"mode": "hard", "highestTierName": "cloud.provider.com/topology-rack"},
    }
    check_pod_group_is_the_jobs(client, group, ns, "llm")
    for pod in pods_by_name(client, ns).values():
        assert pod["status"]["phase"] == "Pending" and "nodeName" not in pod["spec"]
        assert pod["spec"]["schedulerName"] == "volcano"
        assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "llm-a0"
        assert "affinity" not in pod["spec"], "Volcano's networkTopology places the gang, not pod affinity"

    for index, name in enumerate(["llm-a0-n0", "llm-a0-n1"]):
        client.run_pod(ns, name, ip=f"10.0.0.{index + 1}")
    wait_until(phase_is(client, ns, "llm", "Running"), what="Running")
    client.end_pod(ns, "llm-a0-n0", 0)
    wait_until(phase_is(client, ns, "llm", "Succeeded"), what="Succeeded")
    wait_until(lambda: pod_group_names(client, VOLCANO, ns) == [], what="the PodGroup deleted at the end")


def test_a_coscheduling_gang_gets_a_new_pod_group_per_attempt_and_the_garbage_collector_takes_the_last(
    client: Client,
) -> None:
    ns = client.create_namespace()
    client.create_job(ns, "llm", gang={"scheduler": "coscheduling", "scheduleTimeoutSeconds": 120},
                      topology={"preferred": "topology.kubernetes.io/zone"})
    wait_until(pods_are(client, ns, ["llm-a0-n0", "llm-a0-n1"]), what="two pending pods")
    group = pod_group(client, COSCHEDULING, ns, "llm-a0")
    assert group is not None
    assert group["spec"] == {"minMember": 2, "minResources": {"cpu": "4", "memory": "8Gi"},
                             "scheduleTimeoutSeconds": 120}
    check_pod_group_is_the_jobs(client, group, ns, "llm")
    for pod in pods_by_name(client, ns).values():
        assert pod["spec"]["schedulerName"] == "scheduler-plugins-scheduler"
        assert pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "llm-a0"
        (term,) = pod["spec"]["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert term["podAffinityTerm"]["topologyKey"] == "topology.kubernetes.io/zone"

    client.run_pod(ns, "llm-a0-n0")
    client.end_pod(ns, "llm-a0-n1", 1, "CUDA error")
    wait_until(pods_are(client, ns, ["llm-a1-n0", "llm-a1-n1"]), what="attempt 1's pods")
    assert pod_group_names(client, COSCHEDULING, ns) == ["llm-a1"]
    assert pods_by_name(client, ns)["llm-a1-n0"]["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "llm-a1"

    client.delete_job(ns, "llm")
    wait_until(lambda: pod_group_names(client, COSCHEDULING, ns) == [] and not client.items(ns, "pods"),
               what="the PodGroup and pods garbage-collected with the job")


def test_the_volcano_example_works_as_written(client: Client, plane: tuple[ControlPlane, pathlib.Path]) -> None:
    """examples/gang-volcano.yaml applied whole (its Volcano Queue and its job): the PodGroup its comment describes,
    waiting in that Queue, before four pods that name Volcano and the group."""
    plane[0].kubectl("create", "namespace", "team-a")
    plane[0].kubectl("apply", "-f", str(REPO / "examples" / "gang-volcano.yaml"))
    assert client.call("GET", f"{VOLCANO}/queues/research")["spec"]["capability"] == {"nvidia.com/gpu": 64}
    names = [f"llama-8b-chat-a0-n{rank}" for rank in range(4)]
    wait_until(pods_are(client, "team-a", names), what="the example's four pods", timeout=60)
    group = pod_group(client, VOLCANO, "team-a", "llama-8b-chat-a0")
    assert group is not None
    assert group["spec"] == {
        "minMember": 4, "queue": "research",
        "minResources": {"cpu": "384", "memory": "4Ti", "nvidia.com/gpu": "32"},
        "networkTopology": {"mode": "hard", "highestTierName": "cloud.provider.com/topology-rack"},
    }
    check_pod_group_is_the_jobs(client, group, "team-a", "llama-8b-chat")
    for pod in pods_by_name(client, "team-a").values():
        assert pod["spec"]["schedulerName"] == "volcano"
        assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "llama-8b-chat-a0"


def test_without_the_pod_group_crd_the_job_fails_naming_it_and_creates_no_pod(
    client: Client, plane: tuple[ControlPlane, pathlib.Path]
) -> None:
    """Last in this module: it removes the coscheduling CRD (the tests above need it)."""
    plane[0].kubectl("delete", "crd", "podgroups.scheduling.x-k8s.io", "--wait=true")
    ns = client.create_namespace()
    client.create_job(ns, "llm", gang={"scheduler": "coscheduling"})
    status = wait_until(phase_is(client, ns, "llm", "Failed"), what="Failed")
    assert "the CRD podgroups.scheduling.x-k8s.io is not installed" in status["message"]
    failed = next(item for item in status["conditions"] if item["type"] == "Failed")
    assert failed["reason"] == "PodGroupAPIUnavailable"
    assert client.pod_names(ns) == []

"""Gang scheduling and topology as builders: the PodGroup of each scheduler, what the pods carry for it, and who
keeps the gang in one topology domain for every combination of Kueue, gang scheduler and topology."""

from __future__ import annotations

from typing import Any

import pytest
from operator_factories import make_job

from finetune_operator.builders import build_pod_group, build_worker_pod, build_workload
from finetune_operator.gang import multiply_quantity, observe_pod_groups, topology_route
from finetune_operator.spec import parse_job

RESOURCES = {"gpus": 8, "cpu": "7500m", "memory": "64Gi", "ephemeralStorage": "100Gi"}


def gang_job(**paths: Any) -> Any:
    return parse_job(make_job({"spec.distributed.nodes": 2, "spec.resources": RESOURCES}, **paths))


@pytest.mark.parametrize(("quantity", "times", "expected"), [
    pytest.param("8", 2, "16", id="integer"),
    pytest.param("7500m", 2, "15000m", id="milli"),
    pytest.param("64Gi", 2, "128Gi", id="binary-suffix"),
    pytest.param("1.5", 3, "4.5", id="decimal"),
    pytest.param("0.5", 2, "1", id="decimal-to-integer"),
    pytest.param("1e3", 2, "2e3", id="exponent"),
    pytest.param("100M", 1, "100M", id="once"),
])
def test_quantities_multiply_in_their_own_unit(quantity: str, times: int, expected: str) -> None:
    assert multiply_quantity(quantity, times) == expected


def test_volcano_pod_group_holds_min_member_the_summed_requests_queue_and_priority() -> None:
    job = gang_job(spec__gang={"scheduler": "volcano", "queue": "research"}, spec__priorityClassName="high")
    group = build_pod_group(job)
    assert group is not None
    assert (group["apiVersion"], group["kind"], group["metadata"]["name"]) == (
        "scheduling.volcano.sh/v1beta1", "PodGroup", "job-a0")
    assert group["metadata"]["labels"]["finetune.dev/attempt"] == "0"
    (owner,) = group["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("FineTuneJob", "uid-1", True)
    assert group["spec"] == {
        "minMember": 2,
        "minResources": {"cpu": "15000m", "memory": "128Gi", "nvidia.com/gpu": "16", "ephemeral-storage": "200Gi"},
        "queue": "research",
        "priorityClassName": "high",
    }


def test_coscheduling_pod_group_holds_its_schedule_timeout_and_a_smaller_min_member_sums_fewer_pods() -> None:
    job = parse_job(make_job({"spec.distributed.nodes": 3, "spec.resources": {"cpu": "4", "memory": "16Gi"}},
                             spec__gang={"scheduler": "coscheduling", "minMember": 2,
                                         "scheduleTimeoutSeconds": 120}, status={"attempt": 4}))
    group = build_pod_group(job)
    assert group is not None
    assert (group["apiVersion"], group["metadata"]["name"]) == ("scheduling.x-k8s.io/v1alpha1", "job-a4")
    assert group["spec"] == {"minMember": 2, "minResources": {"cpu": "8", "memory": "32Gi"},
                             "scheduleTimeoutSeconds": 120}


def test_no_gang_no_pod_group_and_a_gang_without_requests_has_no_min_resources() -> None:
    assert build_pod_group(parse_job(make_job())) is None
    group = build_pod_group(parse_job(make_job(spec__gang={"scheduler": "coscheduling"})))
    assert group is not None and group["spec"] == {"minMember": 1, "scheduleTimeoutSeconds": 300}


@pytest.mark.parametrize(("scheduler", "scheduler_name", "expected_name", "labels", "annotations"), [
    pytest.param(None, None, None, {}, {}, id="no-gang"),
    pytest.param(None, "custom", "custom", {}, {}, id="no-gang-own-scheduler"),
    pytest.param("volcano", None, "volcano", {}, {"scheduling.k8s.io/group-name": "job-a0"}, id="volcano"),
    pytest.param("volcano", "vc-gpu", "vc-gpu", {}, {"scheduling.k8s.io/group-name": "job-a0"},
                 id="volcano-renamed"),
    pytest.param("coscheduling", None, "scheduler-plugins-scheduler", {"scheduling.x-k8s.io/pod-group": "job-a0"},
                 {}, id="coscheduling"),
    pytest.param("coscheduling", "sp", "sp", {"scheduling.x-k8s.io/pod-group": "job-a0"}, {},
                 id="coscheduling-renamed"),
])
def test_pods_name_their_scheduler_and_pod_group(scheduler: str | None, scheduler_name: str | None,
                                                 expected_name: str | None, labels: dict[str, str],
                                                 annotations: dict[str, str]) -> None:
    paths: dict[str, Any] = {}
    if scheduler:
        paths["spec.gang"] = {"scheduler": scheduler}
    if scheduler_name:
        paths["spec.schedulerName"] = scheduler_name
    pod = build_worker_pod(gang_job(**{k.replace(".", "__"): v for k, v in paths.items()}), 1, "img")
    assert pod["spec"].get("schedulerName") == expected_name
    gang_labels = {k: v for k, v in pod["metadata"]["labels"].items() if k.startswith("scheduling.")}
    gang_annotations = {k: v for k, v in pod["metadata"]["annotations"].items() if k.startswith("scheduling.")}
    assert (gang_labels, gang_annotations) == (labels, annotations)


REQUIRED = {"required": "cloud.provider.com/topology-rack"}
PREFERRED = {"preferred": "topology.kubernetes.io/zone"}
TERM = {"labelSelector": {"matchLabels": {"finetune.dev/job-name": "job", "finetune.dev/attempt": "0"}}}
KUEUE_POD = ({"kueue.x-k8s.io/podset": "trainer"}, True)


def placement(queue: bool, scheduler: str | None, topology: dict[str, str] | None) -> dict[str, Any]:
    """What each place that can carry the topology carries for one combination."""
    paths: dict[str, Any] = {}
    if queue:
        paths["spec.queueName"] = "team-a"
    if scheduler:
        paths["spec.gang"] = {"scheduler": scheduler}
    if topology:
        paths["spec.topology"] = topology
    job = gang_job(**{k.replace(".", "__"): v for k, v in paths.items()})
    pod = build_worker_pod(job, 0, "img")
    group = build_pod_group(job)
    workload = build_workload(job, "img") if queue else None
    pod_set = workload["spec"]["podSets"][0] if workload else {}
    return {
        "route": topology_route(job.spec),
        "podAffinity": (pod["spec"].get("affinity") or {}).get("podAffinity"),
        "kueueAnnotations": {k: v for k, v in pod["metadata"]["annotations"].items() if k.startswith("kueue")},
        "kueuePod": ({k: v for k, v in pod["metadata"]["labels"].items() if k.startswith("kueue")},
                     "schedulingGates" in pod["spec"]),
        "topologyRequest": pod_set.get("topologyRequest"),
        "templateAnnotations": ((pod_set.get("template") or {}).get("metadata") or {}).get("annotations"),
        "networkTopology": (group or {}).get("spec", {}).get("networkTopology"),
    }


NOTHING = {"route": None, "podAffinity": None, "kueueAnnotations": {}, "kueuePod": ({}, False),
           "topologyRequest": None, "templateAnnotations": None, "networkTopology": None}


def kueue_expected(kind: str, level: str) -> dict[str, Any]:
    annotation = f"kueue.x-k8s.io/podset-{kind}-topology"
    return {**NOTHING, "route": "kueue",
            "kueueAnnotations": {annotation: level, "kueue.x-k8s.io/workload": "finetunejob-job"},
            "kueuePod": KUEUE_POD, "topologyRequest": {kind: level, "podIndexLabel": "finetune.dev/node-rank"},
            "templateAnnotations": {annotation: level}}


def affinity_expected(topology: dict[str, str]) -> dict[str, Any]:
    kind, level = next(iter(topology.items()))
    term = {**TERM, "topologyKey": level}
    if kind == "required":
        pod_affinity: dict[str, Any] = {"requiredDuringSchedulingIgnoredDuringExecution": [term]}
    else:
        pod_affinity = {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "podAffinityTerm": term}]}
    return {**NOTHING, "route": "affinity", "podAffinity": pod_affinity}


def volcano_expected(mode: str, level: str) -> dict[str, Any]:
    return {**NOTHING, "route": "volcano", "networkTopology": {"mode": mode, "highestTierName": level}}


RACK, ZONE = REQUIRED["required"], PREFERRED["preferred"]
COMBINATIONS = [
    # (Kueue, gang scheduler, topology) -> where the topology goes
    (False, None, None, NOTHING),
    (False, None, REQUIRED, affinity_expected(REQUIRED)),
    (False, None, PREFERRED, affinity_expected(PREFERRED)),
    (False, "volcano", None, NOTHING),
    (False, "volcano", REQUIRED, volcano_expected("hard", RACK)),
    (False, "volcano", PREFERRED, volcano_expected("soft", ZONE)),
    (False, "coscheduling", None, NOTHING),
    (False, "coscheduling", REQUIRED, affinity_expected(REQUIRED)),
    (False, "coscheduling", PREFERRED, affinity_expected(PREFERRED)),
    (True, None, None, NOTHING),
    (True, None, REQUIRED, kueue_expected("required", RACK)),
    (True, None, PREFERRED, kueue_expected("preferred", ZONE)),
    (True, "volcano", None, NOTHING),
    (True, "volcano", REQUIRED, kueue_expected("required", RACK)),
    (True, "volcano", PREFERRED, kueue_expected("preferred", ZONE)),
    (True, "coscheduling", None, NOTHING),
    (True, "coscheduling", REQUIRED, kueue_expected("required", RACK)),
    (True, "coscheduling", PREFERRED, kueue_expected("preferred", ZONE)),
]


@pytest.mark.parametrize(("queue", "scheduler", "topology", "expected"), [
    pytest.param(*case, id=f"{'kueue' if case[0] else 'no-queue'}-{case[1] or 'default-scheduler'}-"
                           f"{next(iter(case[2])) if case[2] else 'no-topology'}")
    for case in COMBINATIONS
])
def test_topology_goes_to_kueue_else_volcano_else_pod_affinity(
    queue: bool, scheduler: str | None, topology: dict[str, str] | None, expected: dict[str, Any]
) -> None:
    assert placement(queue, scheduler, topology) == expected


def test_topology_pod_affinity_joins_the_users_own_pod_affinity() -> None:
    own = {"labelSelector": {"matchLabels": {"app": "cache"}}, "topologyKey": "kubernetes.io/hostname"}
    affinity = {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [own]},
                "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}
    job = gang_job(spec__affinity=affinity, spec__topology=REQUIRED)
    pod = build_worker_pod(job, 0, "img")
    assert pod["spec"]["affinity"]["nodeAffinity"] == affinity["nodeAffinity"]
    assert pod["spec"]["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"] == [
        own, {**TERM, "topologyKey": RACK}]
    assert job.spec.affinity == affinity, "the spec is not changed"


def test_the_workload_template_has_no_per_pod_gate_or_names() -> None:
    workload = build_workload(gang_job(spec__queueName="team-a", spec__topology=REQUIRED), "img")
    template = workload["spec"]["podSets"][0]["template"]
    assert not {"schedulingGates", "hostname", "subdomain"} & set(template["spec"])


def test_observed_pod_groups_carry_their_attempt() -> None:
    views = observe_pod_groups([
        {"metadata": {"name": "job-a3", "labels": {"finetune.dev/attempt": "3"}}},
        {"metadata": {"name": "stray", "deletionTimestamp": "2025-01-01T00:00:00Z"}},
    ])
    assert [(v.name, v.attempt, v.deleting) for v in views] == [("job-a3", 3, False), ("stray", None, True)]

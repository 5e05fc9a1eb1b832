"""Kueue admission: no pods before the Workload is admitted, Kueue's words while queued, an eviction restarts the gang
uncounted and releases the admission once the pods are gone, a finished job frees its quota, a suspended one leaves
the queue."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from operator_factories import (
    TWO_NODES,
    FakeSettings,
    apply_policy,
    at,
    described,
    make_job,
    make_pod,
    make_workload,
    running_status,
    ts,
)

from finetune_operator.api import ApiError
from finetune_operator.decide import EventToEmit, decide
from finetune_operator.decision import PatchWorkloadStatus
from finetune_operator.queue_policy import release_workload, wait_for_admission, workload_unavailable_message
from finetune_operator.reconcile import observe_queue
from finetune_operator.workload import Placement, QueueObservation, observe_workload

QUEUED = {**TWO_NODES, "spec.queueName": "team-a"}
NO_QUOTA = ("Pending", "couldn't assign flavors to pod set trainer: insufficient quota for nvidia.com/gpu in "
                       "flavor a100, 16 more needed")
PREEMPTED = ("Preempted", "Preempted to accommodate a workload (UID: u2) due to prioritization in the ClusterQueue")
GANG = [make_pod(0, 0, "Running"), make_pod(1, 0, "Running")]
CREATED = "waiting for Kueue to admit the gang of 2 pod(s) in LocalQueue team-a"


def queue_of(workload: dict[str, Any] | None = None, **extra: Any) -> QueueObservation:
    return QueueObservation(observe_workload(workload), **extra)


def queued_condition(reason: str, message: str, status: str = "True", since: float = 100) -> dict[str, Any]:
    return {"type": "Queued", "status": status, "reason": reason, "message": message,
            "lastTransitionTime": ts(since), "observedGeneration": 1}


def queued_status(reason: str, message: str) -> dict[str, Any]:
    return {"phase": "Queued", "attempt": 0, "restarts": 0, "countedFailures": 0, "message": f"Queued: {message}",
            "observedGeneration": 1, "conditions": [queued_condition(reason, message, since=40)]}


@pytest.mark.parametrize(
    ("status", "pods", "queue", "expected_status", "actions", "events"),
    [
        pytest.param({}, [], queue_of(), {
            "phase": "Queued", "attempt": 0, "restarts": 0, "countedFailures": 0, "message": f"Queued: {CREATED}",
            "observedGeneration": 1, "conditions": [queued_condition("WorkloadCreated", CREATED)],
        }, ["create Workload finetunejob-job"], (EventToEmit("Normal", "WorkloadCreated", f"Queued: {CREATED}"),),
            id="new-job-gets-its-workload-and-no-pod"),
        pytest.param(queued_status("WorkloadCreated", CREATED), [],
                     queue_of(make_workload(reasons={"QuotaReserved": NO_QUOTA})), {
            "phase": "Queued", "attempt": 0, "restarts": 0, "countedFailures": 0, "message": f"Queued: {NO_QUOTA[1]}",
            "observedGeneration": 1, "conditions": [queued_condition(*NO_QUOTA, since=40)],
        }, [], (), id="waiting-shows-kueues-reason-quietly"),
        pytest.param({}, [], queue_of(priority_class_missing=True), {
            "phase": "Queued", "attempt": 0, "restarts": 0, "countedFailures": 0,
            "message": "Queued: WorkloadPriorityClass None does not exist", "observedGeneration": 1,
            "conditions": [queued_condition("WorkloadPriorityClassNotFound",
                                            "WorkloadPriorityClass None does not exist")],
        }, [], (EventToEmit("Normal", "WorkloadPriorityClassNotFound",
                            "Queued: WorkloadPriorityClass None does not exist"),), id="missing-priority-class-waits"),
        pytest.param(running_status(), GANG, queue_of(make_workload("QuotaReserved", "Admitted", "Evicted",
                                                                    reasons={"Evicted": PREEMPTED})), {
            **running_status(startTime=None), "phase": "Queued", "attempt": 1, "restarts": 1,
            "message": f"Queued: evicted by Kueue (Preempted): {PREEMPTED[1]}",
            "conditions": [{**running_status()["conditions"][0], "status": "False", "reason": "Queued",
                            "message": "the job is queued", "lastTransitionTime": ts(100)},
                           queued_condition("Preempted", f"evicted by Kueue (Preempted): {PREEMPTED[1]}")],
        }, ["delete Pod job-a0-n0", "delete Pod job-a0-n1"],
            (EventToEmit("Warning", "Evicted", f"Queued: evicted by Kueue (Preempted): {PREEMPTED[1]}"),),
            id="preempted-gang-stops-uncounted-as-the-next-attempt"),
        pytest.param(running_status(attempt=1, startTime=None), [make_pod(0, 0, "Failed", exit_code=75)],
                     queue_of(make_workload("QuotaReserved", "Admitted", "Evicted")), None,
                     ["patch Workload finetunejob-job status"], None, id="admission-released-once-the-pods-stopped"),
        pytest.param(running_status(attempt=1), [make_pod(0, 0, "Running", deleting=True)],
                     queue_of(make_workload("QuotaReserved", "Admitted", "Evicted")), None, [], None,
                     id="admission-kept-while-the-old-gang-checkpoints"),
        pytest.param(queued_status("WorkloadCreated", CREATED), [], queue_of(make_workload(count=1)), None,
                     ["delete Workload finetunejob-job"], (), id="resized-gang-replaces-its-workload"),
    ],
)
def test_a_queued_job_has_no_pods_until_admitted(
    status: dict[str, Any], pods: list[dict[str, Any]], queue: QueueObservation,
    expected_status: dict[str, Any] | None, actions: list[str], events: tuple[EventToEmit, ...] | None,
) -> None:
    status = {key: value for key, value in status.items() if value is not None}
    if expected_status is not None:
        expected_status = {key: value for key, value in expected_status.items() if value is not None}
    completed, decision = apply_policy(wait_for_admission, make_job({**QUEUED, "status": status}), pods,
                                       queue=queue)
    assert completed is True
    if expected_status is not None:
        assert decision.status == expected_status
    assert described(decision) == actions
    if events is not None:
        assert decision.events_to_emit == events
    assert decision.status["countedFailures"] == 0
    assert not any(a.body["kind"] == "Pod" for a in decision.actions if hasattr(a, "body"))


def test_the_eviction_release_clears_the_admission_as_kueues_integrations_do() -> None:
    workload = make_workload("QuotaReserved", "Admitted", "Evicted", reasons={"Evicted": PREEMPTED})
    _, decision = apply_policy(wait_for_admission, make_job({**QUEUED, "status": running_status(attempt=1)}),
                               queue=queue_of(workload))
    (patch,) = [a for a in decision.actions if isinstance(a, PatchWorkloadStatus)]
    assert patch.patch["metadata"] == {"resourceVersion": "42"}
    assert patch.patch["status"]["admission"] is None
    conditions = {item["type"]: (item["status"], item["reason"]) for item in patch.patch["status"]["conditions"]}
    assert conditions == {"QuotaReserved": ("False", "Pending"), "Admitted": ("False", "NoReservation"),
                          "Evicted": ("True", "Preempted"), "Requeued": ("True", "Preempted")}


def test_an_admitted_workload_lets_the_gang_start() -> None:
    status = queued_status(*NO_QUOTA)
    completed, decision = apply_policy(wait_for_admission, make_job({**QUEUED, "status": status}),
                                       queue=queue_of(make_workload("QuotaReserved", "Admitted")))
    assert completed is False
    assert decision.actions == ()
    assert decision.status["conditions"] == [queued_condition("Admitted", "admitted by ClusterQueue cq", "False")]


def test_a_job_without_a_queue_is_left_alone() -> None:
    completed, decision = apply_policy(wait_for_admission, make_job(TWO_NODES), GANG)
    assert (completed, decision.actions) == (False, ())


@pytest.mark.parametrize(
    ("paths", "workload", "actions"),
    [
        pytest.param({"status": {"phase": "Succeeded", "message": "Model written"}},
                     make_workload("QuotaReserved", "Admitted"), ["patch Workload finetunejob-job status"],
                     id="finished-job-frees-its-quota"),
        pytest.param({"status": {"phase": "Failed", "message": "boom"}},
                     make_workload("QuotaReserved", "Admitted", "Finished"), [], id="already-finished-is-quiet"),
        pytest.param({"spec.suspend": True, "status": queued_status(*NO_QUOTA)}, make_workload(),
                     ["delete Workload finetunejob-job"], id="suspended-job-leaves-its-queue"),
        pytest.param({"spec.suspend": True}, make_workload(deletionTimestamp=ts(1)), [], id="already-going"),
        pytest.param({"status": queued_status(*NO_QUOTA)}, make_workload(), [], id="queued-job-keeps-it"),
    ],
)
def test_the_workload_follows_the_job(paths: dict[str, Any], workload: dict[str, Any], actions: list[str]) -> None:
    def release(observed: Any, draft: Any) -> bool:
        release_workload(observed, draft)
        return True

    _, decision = apply_policy(release, make_job({**QUEUED, **paths}), queue=queue_of(workload))
    assert described(decision) == actions
    finish = [a for a in decision.actions if isinstance(a, PatchWorkloadStatus)]
    for action in finish:
        assert {"type": "Finished", "status": "True", "reason": "Succeeded",
                "message": "Model written"}.items() <= action.patch["status"]["conditions"][-1].items()
    if paths.get("spec.suspend"):
        assert all(item["status"] == "False" for item in decision.status.get("conditions", [])
                   if item["type"] == "Queued")


def test_admission_creates_the_gang_on_the_admitted_flavors_nodes() -> None:
    job = make_job({**QUEUED, "spec.tolerations": [{"key": "team", "operator": "Exists"}],
                    "status": queued_status(*NO_QUOTA)})
    placement = Placement({"pool": "a100"}, ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},))
    queue = QueueObservation(observe_workload(make_workload("QuotaReserved", "Admitted")), placement)
    decision = decide(job, [], [], at(100), FakeSettings(), queue=queue)
    pods = [a.body for a in decision.actions if getattr(a, "kind", None) == "Pod"]
    assert [pod["metadata"]["name"] for pod in pods] == ["job-a0-n0", "job-a0-n1"]
    for pod in pods:
        assert pod["spec"]["nodeSelector"] == {"pool": "a100"}
        assert pod["spec"]["tolerations"] == [{"key": "team", "operator": "Exists"}, dict(placement.tolerations[0])]
    assert decision.status["phase"] == "Pending"
    assert decision.events_to_emit[0] == EventToEmit("Normal", "Admitted",
                                                     "Admitted: attempt 0 with 2 pod(s) is starting")


# ---- edge cases: an invalid spec, a job started again, no Workload API, a LocalQueue that does not exist ----------

INADMISSIBLE = ("Inadmissible", "LocalQueue team-a doesn't exist")
# Valid when queued; the grace period (default 120 s) must be shorter than the deadline, which only the operator
# checks.
INVALID_EDIT = {"spec.activeDeadlineSeconds": 60, "metadata.generation": 2}
NOT_SERVED = "spec.queueName needs Kueue's Workloads (kueue.x-k8s.io/v1beta2), but ..."


def types_of(decision: Any, kind: str) -> list[tuple[str, str]]:
    return [(item["status"], item["reason"]) for item in decision.status.get("conditions", []) if item["type"] == kind]


@pytest.mark.parametrize(
    ("paths", "pods", "queue", "phase", "actions", "queued"),
    [
        pytest.param({**INVALID_EDIT, "status": queued_status(*NO_QUOTA)}, [], queue_of(make_workload()),
                     "Failed", ["patch Workload finetunejob-job status"], [("False", "Finished")],
                     id="invalid-edit-while-queued-finishes-the-workload"),
        pytest.param({**INVALID_EDIT, "spec.suspend": True, "status": queued_status(*NO_QUOTA)}, [],
                     queue_of(make_workload("QuotaReserved", "Admitted")), "Failed",
                     ["patch Workload finetunejob-job status"], [("False", "Finished")],
                     id="invalid-edit-while-admitted-frees-the-quota"),
        pytest.param({**INVALID_EDIT, "status": {**running_status(), "observedGeneration": 1}}, GANG,
                     queue_of(make_workload("QuotaReserved", "Admitted")), "Failed",
                     ["delete Pod job-a0-n0", "delete Pod job-a0-n1", "patch Workload finetunejob-job status"], [],
                     id="invalid-edit-while-running-stops-the-gang-and-frees-the-quota"),
        pytest.param({**INVALID_EDIT, "status": queued_status(*NO_QUOTA)}, [],
                     queue_of(make_workload("QuotaReserved", "Admitted", "Finished")), "Failed", [],
                     [("False", "Finished")], id="workload-already-finished-is-left"),
        pytest.param({**INVALID_EDIT, "status": queued_status(*NO_QUOTA)}, [], None, "Failed", [],
                     [("False", "Finished")], id="no-workload-nothing-to-release"),
        pytest.param({"metadata.generation": 2, "status": {
            "phase": "Failed", "attempt": 0, "restarts": 0, "countedFailures": 0, "message": "spec.x: bad",
            "conditions": [{"type": "InvalidSpec", "status": "True", "reason": "InvalidSpec", "message": "bad",
                            "lastTransitionTime": ts(50), "observedGeneration": 1}]}},
            [], queue_of(make_workload("QuotaReserved", "Admitted", "Finished")), "Queued",
            ["delete Workload finetunejob-job"], [("True", "WorkloadCreated")],
            id="corrected-spec-replaces-the-finished-workload-not-admitted-again"),
        pytest.param({"status": queued_status(*NO_QUOTA)}, [],
                     queue_of(make_workload(reasons={"QuotaReserved": INADMISSIBLE})), "Queued", [],
                     [("True", "Inadmissible")], id="missing-local-queue-shows-kueues-reason"),
        pytest.param({}, [], queue_of(unavailable=NOT_SERVED), "Failed", [], [],
                     id="no-workload-api-fails-before-any-pod"),
        pytest.param({"status": queued_status(*NO_QUOTA)}, [], queue_of(unavailable=NOT_SERVED), "Failed", [],
                     [("False", "Finished")], id="queued-job-loses-the-workload-api"),
        pytest.param({"status": running_status()}, GANG, queue_of(unavailable=NOT_SERVED), "Running", [], [],
                     id="running-gang-trains-on-without-the-workload-api"),
    ],
)
def test_a_queued_job_at_the_edges(
    paths: dict[str, Any], pods: list[dict[str, Any]], queue: QueueObservation | None, phase: str,
    actions: list[str], queued: list[tuple[str, str]],
) -> None:
    decision = decide(make_job({**QUEUED, **paths}), pods, [], at(100), FakeSettings(), queue=queue)
    assert decision.status["phase"] == phase
    assert described(decision) == actions
    assert types_of(decision, "Queued") == queued
    assert not any(getattr(a, "kind", None) == "Pod" for a in decision.actions)
    for action in decision.actions:
        if isinstance(action, PatchWorkloadStatus):
            finished = action.patch["status"]["conditions"][-1]
            assert (finished["type"], finished["status"], finished["reason"]) == ("Finished", "True", "Failed")
            assert finished["message"].startswith("spec.checkpoint.gracePeriodSeconds: ")


def test_a_cluster_without_the_workload_api_fails_the_job_naming_the_crd_or_the_chart_value() -> None:
    decision = decide(make_job(QUEUED), [], [], at(100), FakeSettings(),
                      queue=queue_of(unavailable=workload_unavailable_message(404)))
    assert types_of(decision, "Failed") == [("True", "WorkloadAPIUnavailable")]
    assert "the CRD workloads.kueue.x-k8s.io is not installed" in decision.status["message"]
    assert decision.events_to_emit[0].reason == "WorkloadAPIUnavailable"
    assert decision.events_to_emit[0].type == "Warning"
    forbidden = workload_unavailable_message(403, "cannot get resource")
    assert "(HTTP 403)" in forbidden and "kueue.enabled=true" in forbidden and forbidden.endswith("cannot get resource")


class WorkloadReader:
    """The requests observe_queue makes for a job without a WorkloadPriorityClass, answered as the API server would:
    the Workload, None (404 naming it), or an error; after a 403, whether discovery lists Workloads."""

    def __init__(self, answer: dict[str, Any] | None | ApiError, served: bool = True) -> None:
        self.answer, self.served = answer, served

    async def get_workload(self, namespace: str, name: str) -> dict[str, Any] | None:
        assert (namespace, name) == ("ns", "finetunejob-job")
        if isinstance(self.answer, ApiError):
            raise self.answer
        return self.answer

    async def serves(self, api_version: str, plural: str) -> bool:
        assert (api_version, plural) == ("kueue.x-k8s.io/v1beta2", "workloads")
        return self.served


FORBIDDEN = ApiError("get", 403, 'workloads.kueue.x-k8s.io "finetunejob-job" is forbidden: User "op" cannot get')


@pytest.mark.parametrize(("answer", "served", "workload", "words"), [
    pytest.param(make_workload(), True, "finetunejob-job", None, id="found"),
    pytest.param(None, True, None, None, id="none-yet"),
    pytest.param(ApiError("get", 404, "workloads are not served"), True, None,
                 "the CRD workloads.kueue.x-k8s.io is not installed", id="not-served"),
    pytest.param(FORBIDDEN, True, None, "install the chart with kueue.enabled=true", id="forbidden"),
    pytest.param(FORBIDDEN, False, None, "the CRD workloads.kueue.x-k8s.io is not installed",
                 id="forbidden-and-not-served"),
])
def test_observe_queue_reads_the_workload_or_says_why_it_cannot(
    answer: Any, served: bool, workload: str | None, words: str | None,
) -> None:
    queue = asyncio.run(observe_queue(WorkloadReader(answer, served), make_job(QUEUED), []))  # type: ignore[arg-type]
    assert queue is not None
    assert (queue.workload.name if queue.workload else None) == workload
    assert (queue.unavailable is None) == (words is None)
    if words is not None:
        assert words in (queue.unavailable or "")


def test_observe_queue_raises_other_errors() -> None:
    with pytest.raises(ApiError):
        asyncio.run(observe_queue(WorkloadReader(ApiError("get", 500, "etcd timeout")),  # type: ignore[arg-type]
                                  make_job(QUEUED), []))

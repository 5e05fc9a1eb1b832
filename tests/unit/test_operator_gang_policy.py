"""Gang scheduling in the decision: the attempt's PodGroup is created before its pods and only when missing; other
attempts' PodGroups go, and the current one once the job has no gang; a missing or forbidden PodGroup API fails the
job with a condition that names the CRD."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from operator_factories import (
    TWO_NODES,
    FakeSettings,
    at,
    described,
    make_job,
    make_pod,
    make_workload,
    running_status,
)

from finetune_operator.api import ApiError
from finetune_operator.decide import decide
from finetune_operator.gang import GangObservation, PodGroupView
from finetune_operator.gang_policy import unavailable_message
from finetune_operator.reconcile import observe_gang
from finetune_operator.workload import QueueObservation, observe_workload

VOLCANO = "scheduling.volcano.sh/v1beta1"
GANG = {**TWO_NODES, "spec.gang": {"scheduler": "volcano"}}
SUCCEEDED = {"phase": "Succeeded", "attempt": 0, "completionTime": "2025-01-01T00:00:50Z"}


def groups(*names_and_attempts: tuple[str, int], unavailable: str | None = None) -> GangObservation:
    return GangObservation(VOLCANO, tuple(PodGroupView(name, attempt) for name, attempt in names_and_attempts),
                           unavailable)


def decide_gang(paths: dict[str, Any], gang: GangObservation | None, pods: list[dict[str, Any]] | None = None,
                queue: QueueObservation | None = None) -> Any:
    return decide(make_job(paths), pods or [], [], at(100), FakeSettings(), None, queue, gang)


@pytest.mark.parametrize(("paths", "gang", "pods", "queue", "actions"), [
    pytest.param(GANG, groups(), [], None, [
        "create Service job", "apply ConfigMap job-config", "create PodGroup job-a0", "create Pod job-a0-n0",
        "create Pod job-a0-n1"], id="new-gang-pod-group-before-its-pods"),
    pytest.param(GANG, groups(("job-a0", 0)), [make_pod(0, 0)], None, [
        "create Service job", "apply ConfigMap job-config", "create Pod job-a0-n1"],
        id="existing-pod-group-is-not-created-again"),
    pytest.param({**GANG, "status": running_status(1)}, groups(("job-a0", 0), ("job-a1", 1)),
                 [make_pod(0, 1, "Running"), make_pod(1, 1, "Running")], None, ["delete PodGroup job-a0"],
                 id="earlier-attempts-pod-group-goes"),
    pytest.param({**GANG, "status": SUCCEEDED}, groups(("job-a0", 0)), [], None, ["delete PodGroup job-a0"],
                 id="finished-job-deletes-its-pod-group"),
    pytest.param({**GANG, "status": SUCCEEDED}, groups(), [], None, [], id="finished-job-without-pod-group-rests"),
    pytest.param({**GANG, "spec.suspend": True, "status": running_status(0)}, groups(("job-a0", 0)),
                 [make_pod(0, 0, "Running"), make_pod(1, 0, "Running")], None,
                 ["delete Pod job-a0-n0", "delete Pod job-a0-n1", "delete PodGroup job-a0"],
                 id="suspended-job-deletes-its-pod-group"),
    pytest.param({**GANG, "spec.queueName": "team-a"}, groups(), [],
                 QueueObservation(observe_workload(make_workload("QuotaReserved"))), [],
                 id="queued-job-gets-no-pod-group-before-admission"),
    pytest.param({**GANG, "spec.queueName": "team-a"}, groups(), [],
                 QueueObservation(observe_workload(make_workload("QuotaReserved", "Admitted"))), [
        "create Service job", "apply ConfigMap job-config", "create PodGroup job-a0", "create Pod job-a0-n0",
        "create Pod job-a0-n1"], id="admitted-job-gets-its-pod-group-with-its-pods"),
    pytest.param({**GANG, "spec.training.maxSteps": 0, "status": running_status(0)}, groups(("job-a0", 0)), [],
                 None, ["delete PodGroup job-a0"], id="invalid-spec-deletes-the-pod-group"),
])
def test_pod_groups_follow_the_job(paths: dict[str, Any], gang: GangObservation, pods: list[dict[str, Any]],
                                   queue: QueueObservation | None, actions: list[str]) -> None:
    assert described(decide_gang(paths, gang, pods, queue)) == actions


def test_a_missing_pod_group_api_fails_the_job_before_any_pod_is_created() -> None:
    message = unavailable_message("volcano", VOLCANO, 404)
    decision = decide_gang(GANG, groups(unavailable=message))
    assert described(decision) == []
    status = decision.status
    assert (status["phase"], status["message"]) == ("Failed", message)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert (failed["reason"], failed["message"]) == ("PodGroupAPIUnavailable", message)
    assert decision.events_to_emit[0].reason == "PodGroupAPIUnavailable"
    again = decide(make_job({**GANG, "status": status}), [], [], at(200), FakeSettings(), None, None,
                   groups(unavailable=message))
    assert (described(again), again.status) == ([], status), "a failed job stays failed, no loop"


def test_a_running_gang_trains_on_when_the_pod_group_api_goes_away() -> None:
    message = unavailable_message("volcano", VOLCANO, 403, "forbidden")
    running = [make_pod(0, 0, "Running"), make_pod(1, 0, "Running")]
    decision = decide_gang({**GANG, "status": running_status(0)}, groups(unavailable=message), running)
    assert (described(decision), decision.status["phase"]) == ([], "Running")


def test_a_job_without_gang_is_not_touched_by_the_gang_steps() -> None:
    decision = decide_gang(TWO_NODES, None)
    assert "create PodGroup job-a0" not in described(decision)


@pytest.mark.parametrize(("scheduler", "api_version", "status", "words"), [
    pytest.param("volcano", VOLCANO, 404, ["podgroups.scheduling.volcano.sh is not installed", "remove spec.gang"],
                 id="volcano-crd-missing"),
    pytest.param("coscheduling", "scheduling.x-k8s.io/v1alpha1", 404, ["podgroups.scheduling.x-k8s.io"],
                 id="coscheduling-crd-missing"),
    pytest.param("coscheduling", "scheduling.x-k8s.io/v1alpha1", 403,
                 ["may not use podgroups.scheduling.x-k8s.io", "gangScheduling.coscheduling=true"],
                 id="coscheduling-forbidden"),
])
def test_unavailable_message_says_what_to_install_or_grant(scheduler: str, api_version: str, status: int,
                                                           words: list[str]) -> None:
    message = unavailable_message(scheduler, api_version, status)
    assert message.startswith(f"spec.gang.scheduler {scheduler}")
    for word in words:
        assert word in message


class PodGroupLister:
    """The requests observe_gang makes, answered as the API server would: items, 404 (None) or an error; after a
    403, whether discovery lists the resource (``served``)."""

    def __init__(self, answer: list[dict[str, Any]] | None | ApiError, served: bool = True) -> None:
        self.answer, self.served = answer, served
        self.asked: list[tuple[str, str, str]] = []

    async def serves(self, api_version: str, plural: str) -> bool:
        assert (api_version, plural) == (VOLCANO, "podgroups")
        return self.served

    async def list_pod_groups(self, namespace: str, job_name: str, api_version: str) -> list[dict[str, Any]] | None:
        self.asked.append((namespace, job_name, api_version))
        if isinstance(self.answer, ApiError):
            raise self.answer
        return self.answer


def observe(answer: list[dict[str, Any]] | None | ApiError, served: bool = True,
            **paths: Any) -> tuple[Any, PodGroupLister]:
    lister = PodGroupLister(answer, served)
    body = make_job({**GANG, **paths})
    return asyncio.run(observe_gang(lister, body)), lister  # type: ignore[arg-type]


def test_observe_gang_reads_the_jobs_own_pod_groups_of_its_schedulers_api() -> None:
    theirs = {"metadata": {"name": "job-a0", "labels": {"finetune.dev/attempt": "0"},
                           "ownerReferences": [{"uid": "old", "controller": True}]}}
    ours = {"metadata": {"name": "job-a1", "labels": {"finetune.dev/attempt": "1"},
                         "ownerReferences": [{"uid": "uid-1", "controller": True}]}}
    gang, lister = observe([theirs, ours])
    assert lister.asked == [("ns", "job", VOLCANO)]
    assert gang == GangObservation(VOLCANO, (PodGroupView("job-a1", 1),)), "a deleted job's PodGroup is left alone"


FORBIDDEN = ApiError("list", 403, 'podgroups.scheduling.volcano.sh is forbidden: User "op" cannot list')


@pytest.mark.parametrize(("answer", "served", "words"), [
    pytest.param(None, True, "the CRD podgroups.scheduling.volcano.sh is not installed", id="not-served"),
    pytest.param(FORBIDDEN, True, "gangScheduling.volcano=true", id="forbidden"),
    # The authorizer refuses before routing: discovery says the CRD is missing as well.
    pytest.param(FORBIDDEN, False, "the CRD podgroups.scheduling.volcano.sh is not installed",
                 id="forbidden-and-not-served"),
])
def test_observe_gang_says_why_the_pod_group_api_cannot_be_used(answer: Any, served: bool, words: str) -> None:
    gang, _ = observe(answer, served)
    assert gang is not None and gang.pod_groups == () and words in (gang.unavailable or "")


def test_observe_gang_asks_nothing_for_a_job_without_gang_and_raises_other_errors() -> None:
    lister = PodGroupLister([])
    assert asyncio.run(observe_gang(lister, make_job())) is None  # type: ignore[arg-type]
    assert lister.asked == []
    with pytest.raises(ApiError):
        observe(ApiError("list", 500, "etcd timeout"))

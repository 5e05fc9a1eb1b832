"""The reconcile decision, phase by phase and transition by transition, on whole statuses and exact actions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
from operator_factories import (
    DELETE,
    TWO_NODES,
    FakeSettings,
    at,
    condition,
    described,
    make_event,
    make_job,
    make_pod,
    running_status,
    ts,
)

from finetune_operator.decide import (
    CreateChild,
    Decision,
    EventToEmit,
    decide,
)
from finetune_operator.pod_creation import record_create_refusal
from finetune_operator.progress import ProgressSample


def run(
    job: dict[str, Any],
    pods: Sequence[dict[str, Any]] = (),
    events: Sequence[dict[str, Any]] = (),
    now: float = 100,
    sample: ProgressSample | None = None,
) -> Decision:
    return decide(job, list(pods), list(events), at(now), FakeSettings(), sample)


def running_job(**paths: Any) -> dict[str, Any]:
    return make_job({**TWO_NODES, "status": running_status()}, **paths)


GANG = [make_pod(0, 0, "Running"), make_pod(1, 0, "Running")]


# ---- creating the gang ----------------------------------------------------------------------------------


def test_new_job_creates_service_config_and_pods_and_enters_pending() -> None:
    decision = run(make_job(TWO_NODES))
    assert described(decision) == [
        "create Service job",
        "apply ConfigMap job-config",
        "create Pod job-a0-n0",
        "create Pod job-a0-n1",
    ]
    assert decision.status == {
        "attempt": 0,
        "restarts": 0,
        "countedFailures": 0,
        "phase": "Pending",
        "message": "Attempt 0: 0 of 2 pod(s) running",
        "observedGeneration": 1,
    }
    assert decision.events_to_emit == (
        EventToEmit("Normal", "Created", "Created: attempt 0 with 2 pod(s) is starting"),
    )
    assert decision.requeue_after is None


def test_created_pods_are_the_builders_pods_for_the_current_attempt() -> None:
    decision = run(make_job({"spec.distributed.nodes": 3}))
    pods = [a.body for a in decision.actions if isinstance(a, CreateChild) and a.kind == "Pod"]
    assert [p["metadata"]["labels"]["finetune.dev/node-rank"] for p in pods] == ["0", "1", "2"]
    assert {p["spec"]["containers"][0]["image"] for p in pods} == {"trainer:test"}


@pytest.mark.parametrize(
    ("pods", "expected_actions", "message"),
    [
        pytest.param([make_pod(0), make_pod(1)], [], "Attempt 0: 0 of 2 pod(s) running", id="all-pending"),
        pytest.param([make_pod(0, phase="Running"), make_pod(1)], [], "Attempt 0: 1 of 2 pod(s) running",
                     id="one-running"),
        pytest.param([make_pod(0)], ["create Service job", "apply ConfigMap job-config", "create Pod job-a0-n1"],
                     "Attempt 0: 0 of 2 pod(s) running", id="one-missing-before-start-is-recreated"),
    ],
)
def test_pending_job(pods: list[dict[str, Any]], expected_actions: list[str], message: str) -> None:
    job = make_job({**TWO_NODES, "status": {"phase": "Pending", "attempt": 0, "restarts": 0, "countedFailures": 0,
                                            "message": "Created: attempt 0 with 2 pod(s) is starting"}})
    decision = run(job, pods)
    assert described(decision) == expected_actions
    assert decision.status["phase"] == "Pending"
    assert decision.status["message"] == message
    assert decision.events_to_emit == ()


def test_operator_restarted_before_writing_status_does_not_recreate_existing_pods() -> None:
    decision = run(make_job(TWO_NODES), [make_pod(0), make_pod(1)])
    assert described(decision) == []
    assert decision.status["phase"] == "Pending"
    assert decision.events_to_emit[0].reason == "Created"


def test_pods_of_a_newer_attempt_than_the_status_say_win_over_a_lost_status_write() -> None:
    job = make_job({**TWO_NODES, "status": running_status(attempt=0)})
    decision = run(job, [make_pod(0, 0, "Failed", exit_code=1), make_pod(0, 1), make_pod(1, 1)])
    assert described(decision) == ["delete Pod job-a0-n0"]
    assert decision.status["attempt"] == 1


# ---- running --------------------------------------------------------------------------------------------


def test_all_pods_running_enters_running_with_start_time() -> None:
    job = make_job({**TWO_NODES, "status": {"phase": "Pending", "attempt": 0, "restarts": 0, "countedFailures": 0,
                                            "message": "x", "observedGeneration": 1}})
    decision = run(job, GANG, now=42)
    assert described(decision) == []
    assert decision.status == {
        "phase": "Running",
        "attempt": 0,
        "restarts": 0,
        "countedFailures": 0,
        "message": "Attempt 0: all 2 pod(s) running",
        "observedGeneration": 1,
        "startTime": ts(42),
        "conditions": [{"type": "Running", "status": "True", "reason": "AllPodsRunning",
                        "message": "attempt 0: all pods running", "lastTransitionTime": ts(42),
                        "observedGeneration": 1}],
    }
    assert decision.events_to_emit == (EventToEmit("Normal", "AllPodsRunning", "Attempt 0: all 2 pod(s) running"),)


def test_running_steady_state_changes_nothing() -> None:
    job = running_job()
    decision = run(job, GANG, now=500)
    assert decision.actions == ()
    assert decision.status == job["status"]
    assert decision.events_to_emit == ()


def test_start_time_is_kept_when_a_later_attempt_runs() -> None:
    status = running_status(attempt=1)
    status.update(phase="Pending", message="Restarted")
    job = make_job({**TWO_NODES, "status": status})
    decision = run(job, [make_pod(0, 1, "Running"), make_pod(1, 1, "Running")], now=900)
    assert decision.status["phase"] == "Running"
    assert decision.status["startTime"] == ts(10)


def test_a_running_pod_being_deleted_by_someone_else_waits_for_its_exit() -> None:
    decision = run(running_job(), [make_pod(0, 0, "Running"), make_pod(1, 0, "Running", deleting=True)])
    assert decision.actions == ()
    assert decision.status["phase"] == "Running"


def test_generation_change_updates_observed_generation_everywhere() -> None:
    job = running_job(metadata__generation=4)
    decision = run(job, GANG)
    assert decision.status["observedGeneration"] == 4
    assert [c["observedGeneration"] for c in decision.status["conditions"]] == [4]
    assert condition(decision, "Running")["lastTransitionTime"] == ts(10)


# ---- success --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "deleted"),
    [
        pytest.param("All", ["delete Pod job-a0-n0", "delete Pod job-a0-n1"], id="All"),
        pytest.param("Running", ["delete Pod job-a0-n1"], id="Running"),
        pytest.param("None", [], id="None"),
    ],
)
def test_rank0_succeeded_finishes_the_job_and_cleans_pods_by_policy(policy: str, deleted: list[str]) -> None:
    job = running_job(spec__cleanPodPolicy=policy)
    decision = run(job, [make_pod(0, 0, "Succeeded", exit_code=0), make_pod(1, 0, "Running")], now=1000)
    assert described(decision) == deleted
    status = decision.status
    assert status["phase"] == "Succeeded"
    assert status["completionTime"] == ts(1000)
    assert status["model"] == {"uri": "s3://out/job/model/", "export": "full"}
    assert status["message"] == "Model written to s3://out/job/model/"
    assert condition(decision, "Succeeded") == {
        "type": "Succeeded", "status": "True", "reason": "Succeeded", "message": "Model written to s3://out/job/model/",
        "lastTransitionTime": ts(1000), "observedGeneration": 1,
    }
    assert condition(decision, "Running")["status"] == "False"
    assert decision.events_to_emit == (EventToEmit("Normal", "Succeeded", "Model written to s3://out/job/model/"),)


def test_success_of_rank0_wins_over_a_failed_peer() -> None:
    decision = run(running_job(), [make_pod(0, 0, "Succeeded", exit_code=0), make_pod(1, 0, "Failed", exit_code=1)])
    assert decision.status["phase"] == "Succeeded"


def test_a_peer_finishing_before_rank0_is_not_success() -> None:
    decision = run(running_job(), [make_pod(0, 0, "Running"), make_pod(1, 0, "Succeeded", exit_code=0)])
    assert decision.status["phase"] == "Running"
    assert decision.actions == ()


@pytest.mark.parametrize(
    ("training", "output", "export"),
    [
        pytest.param({"method": "lora", "maxSteps": 5}, {"uri": "s3://out/j"}, "adapter", id="lora-default"),
        pytest.param({"method": "lora", "maxSteps": 5}, {"uri": "s3://out/j", "export": "merged"}, "merged",
                     id="lora-merged"),
    ],
)
def test_success_reports_the_exported_kind(training: dict[str, Any], output: dict[str, Any], export: str) -> None:
    job = running_job(spec__training=training, spec__output=output)
    decision = run(job, [make_pod(0, 0, "Succeeded", exit_code=0)])
    assert decision.status["model"] == {"uri": "s3://out/j/model/", "export": export}


# ---- gang failure ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pods", "reason", "counted"),
    [
        pytest.param([make_pod(0, 0, "Running"), make_pod(1, 0, "Failed", exit_code=1)], "PodFailed", True,
                     id="crash-counted"),
        pytest.param([make_pod(0, 0, "Running"), make_pod(1, 0, "Failed", exit_code=137,
                                                          termination_reason="OOMKilled")],
                     "PodFailed", True, id="oom-counted"),
        pytest.param([make_pod(0, 0, "Running"), make_pod(1, 0, "Failed", exit_code=75)], "Preempted", False,
                     id="preempted-exit-code"),
        pytest.param([make_pod(0, 0, "Running"), make_pod(1, 0, "Failed", exit_code=134)], "RetryableExitCode",
                     False, id="retryable-exit-code"),
        pytest.param([make_pod(0, 0, "Running"), make_pod(1, 0, "Failed", pod_reason="Evicted")], "PodDisrupted",
                     False, id="evicted"),
        pytest.param([make_pod(0, 0, "Running"), make_pod(1, 0, "Failed", pod_reason="NodeLost")], "PodDisrupted",
                     False, id="node-lost"),
        pytest.param([make_pod(0, 0, "Failed", exit_code=1), make_pod(1, 0, "Running", disrupted=True)],
                     "PodDisrupted", False, id="peer-crash-after-disruption-not-counted"),
    ],
)
def test_a_failed_pod_restarts_the_gang(pods: list[dict[str, Any]], reason: str, counted: bool) -> None:
    job = running_job(spec__retryableExitCodes=[134])
    decision = run(job, pods, now=1000)
    assert described(decision) == ["delete Pod job-a0-n0", "delete Pod job-a0-n1"]
    status = decision.status
    assert status["phase"] == "Restarting"
    assert status["attempt"] == 1
    assert status["restarts"] == 1
    assert status["countedFailures"] == (1 if counted else 0)
    assert status["restartAfter"] == ts(1010)
    assert condition(decision, "Running")["status"] == "False"
    assert condition(decision, "Running")["reason"] == reason
    (event,) = decision.events_to_emit
    assert (event.type, event.reason) == ("Warning", reason)
    assert event.message == status["message"]
    assert decision.requeue_after == 10


def test_restart_message_names_the_pod_exit_code_and_termination_message() -> None:
    pods = [make_pod(0, 0, "Running"),
            make_pod(1, 0, "Failed", exit_code=137, termination_reason="OOMKilled", termination_message="killed")]
    decision = run(running_job(), pods, now=1000)
    assert decision.status["message"] == (
        "Attempt 0 failed: pod job-a0-n1 exited with code 137 (OOMKilled): killed (counted: 1/3 failures); "
        "attempt 1 starts in 10s"
    )


def test_invalid_exit_code_fails_the_job_at_once_with_the_termination_message() -> None:
    pods = [make_pod(0, 0, "Failed", exit_code=64, termination_message="dataset.uri: no such key"),
            make_pod(1, 0, "Running")]
    decision = run(running_job(), pods, now=1000)
    message = ("pod job-a0-n0 exited with code 64: dataset.uri: no such key (permanent error: the config or the "
               "data is wrong; not retried)")
    assert decision.status["phase"] == "Failed"
    assert decision.status["message"] == message
    assert decision.status["completionTime"] == ts(1000)
    assert decision.status["countedFailures"] == 0
    assert condition(decision, "Failed") == {
        "type": "Failed", "status": "True", "reason": "PermanentError", "message": message,
        "lastTransitionTime": ts(1000), "observedGeneration": 1,
    }
    assert described(decision) == ["delete Pod job-a0-n0", "delete Pod job-a0-n1"]
    assert decision.events_to_emit == (EventToEmit("Warning", "PermanentError", message),)


def test_counted_failures_beyond_backoff_limit_fail_the_job() -> None:
    job = make_job({**TWO_NODES, "spec.backoffLimit": 1, "status": running_status(countedFailures=1)})
    decision = run(job, [make_pod(0, 0, "Running"), make_pod(1, 0, "Failed", exit_code=1)])
    assert (decision.status["phase"], condition(decision, "Failed")["reason"]) == ("Failed", "BackoffLimitExceeded")
    assert "restartAfter" not in decision.status


def test_a_pod_vanishing_while_running_restarts_the_gang_uncounted() -> None:
    decision = run(running_job(), [make_pod(0, 0, "Running")], now=1000)
    assert decision.status["phase"] == "Restarting"
    assert decision.status["countedFailures"] == 0
    assert decision.events_to_emit[0].reason == "PodMissing"
    assert described(decision) == ["delete Pod job-a0-n0"]


# ---- restarting -----------------------------------------------------------------------------------------


def restarting_job(**paths: Any) -> dict[str, Any]:
    status = running_status(attempt=1, phase="Restarting", restartAfter=ts(1010), message="Attempt 0 failed")
    status["conditions"][0].update(status="False", reason="PodFailed")
    return make_job({**TWO_NODES, "status": status}, **paths)


def test_restarting_waits_for_the_backoff() -> None:
    decision = run(restarting_job(), [], now=1004)
    assert decision.actions == ()
    assert decision.status["phase"] == "Restarting"
    assert decision.requeue_after == 6


def test_restarting_waits_for_the_old_gang_to_stop() -> None:
    old = [make_pod(0, 0, "Running", deleting=True), make_pod(1, 0, "Failed", exit_code=1, deleting=True)]
    decision = run(restarting_job(), old, now=1020)
    assert decision.actions == ()
    assert decision.status["phase"] == "Restarting"


def test_restarting_after_backoff_starts_the_next_attempt() -> None:
    decision = run(restarting_job(), [make_pod(1, 0, "Failed", exit_code=1)], now=1020)
    assert described(decision) == [
        "delete Pod job-a0-n1",
        "create Service job",
        "apply ConfigMap job-config",
        "create Pod job-a1-n0",
        "create Pod job-a1-n1",
    ]
    assert decision.status["phase"] == "Pending"
    assert "restartAfter" not in decision.status
    assert decision.events_to_emit == (
        EventToEmit("Normal", "Restarted", "Restarted: attempt 1 with 2 pod(s) is starting"),
    )
    config_map = next(a.body for a in decision.actions if isinstance(a, CreateChild) and a.kind == "ConfigMap")
    assert json.loads(config_map["data"]["config.json"])["job"] == {"name": "job", "namespace": "ns", "attempt": 1}


# ---- suspend --------------------------------------------------------------------------------------------


def test_job_created_suspended_gets_no_pods() -> None:
    decision = run(make_job(spec__suspend=True))
    assert decision.actions == ()
    assert decision.status == {
        "attempt": 0,
        "restarts": 0,
        "countedFailures": 0,
        "phase": "Suspended",
        "message": "Suspended: the job has no pods until resumed",
        "observedGeneration": 1,
        "conditions": [{"type": "Suspended", "status": "True", "reason": "Suspended", "message": "spec.suspend is true",
                        "lastTransitionTime": ts(100), "observedGeneration": 1}],
    }
    assert decision.events_to_emit[0].reason == "Suspended"


def test_suspending_a_running_job_deletes_the_gang_and_moves_to_a_new_attempt() -> None:
    decision = run(running_job(spec__suspend=True), GANG)
    assert described(decision) == ["delete Pod job-a0-n0", "delete Pod job-a0-n1"]
    status = decision.status
    assert (status["phase"], status["attempt"], status["restarts"]) == ("Suspended", 1, 1)
    assert "startTime" not in status
    assert condition(decision, "Running")["status"] == "False"
    assert condition(decision, "Suspended")["status"] == "True"


def test_suspending_while_restarting_cancels_the_pending_restart() -> None:
    decision = run(restarting_job(spec__suspend=True), [], now=1004)
    assert decision.status["phase"] == "Suspended"
    assert decision.status["attempt"] == 1
    assert "restartAfter" not in decision.status


def suspended_job(**paths: Any) -> dict[str, Any]:
    status = {"phase": "Suspended", "attempt": 1, "restarts": 1, "countedFailures": 0, "message": "Suspended",
              "conditions": [{"type": "Suspended", "status": "True", "reason": "Suspended",
                              "message": "spec.suspend is true", "lastTransitionTime": ts(50)}]}
    return make_job({**TWO_NODES, "status": status}, **paths)


def test_suspended_steady_state_changes_nothing() -> None:
    decision = run(suspended_job(spec__suspend=True))
    assert decision.actions == ()
    assert decision.events_to_emit == ()


def test_resume_starts_the_current_attempt() -> None:
    decision = run(suspended_job(spec__suspend=False), now=200)
    assert described(decision) == [
        "create Service job", "apply ConfigMap job-config", "create Pod job-a1-n0", "create Pod job-a1-n1",
    ]
    assert decision.status["phase"] == "Pending"
    assert condition(decision, "Suspended") == {
        "type": "Suspended", "status": "False", "reason": "Resumed", "message": "spec.suspend is false",
        "lastTransitionTime": ts(200), "observedGeneration": 1,
    }
    assert decision.events_to_emit == (
        EventToEmit("Normal", "Resumed", "Resumed: attempt 1 with 2 pod(s) is starting"),
    )


def test_resume_waits_for_the_suspended_gang_to_stop() -> None:
    decision = run(suspended_job(), [make_pod(0, 0, "Running", deleting=True)])
    assert decision.actions == ()
    assert decision.status["phase"] == "Suspended"


def test_suspend_is_ignored_once_finished() -> None:
    job = make_job({"spec.suspend": True, "status": {"phase": "Succeeded", "completionTime": ts(50)}})
    decision = run(job)
    assert decision.status["phase"] == "Succeeded"
    assert decision.actions == ()


# ---- deadlines ------------------------------------------------------------------------------------------


def test_active_deadline_fails_the_job() -> None:
    decision = run(running_job(spec__activeDeadlineSeconds=3600), GANG, now=3610)
    assert decision.status["phase"] == "Failed"
    assert condition(decision, "Failed")["reason"] == "DeadlineExceeded"
    assert described(decision) == ["delete Pod job-a0-n0", "delete Pod job-a0-n1"]


def test_active_deadline_not_reached_requeues_for_it() -> None:
    decision = run(running_job(spec__activeDeadlineSeconds=3600), GANG, now=600)
    assert decision.status["phase"] == "Running"
    assert decision.requeue_after == 3010


@pytest.mark.parametrize(
    ("pod", "reason", "detail"),
    [
        pytest.param(make_pod(1, node="n1", scheduled_at=5, waiting="ImagePullBackOff",
                              waiting_message="Back-off pulling image"),
                     "ImagePullBackOff", "ImagePullBackOff: Back-off pulling image", id="image-pull-backoff"),
        pytest.param(make_pod(1, node="n1", scheduled_at=5), "ContainerCreating", "ContainerCreating",
                     id="stuck-creating"),
    ],
)
def test_startup_deadline_fails_a_scheduled_pod_that_cannot_start(pod: dict[str, Any], reason: str,
                                                                   detail: str) -> None:
    job = make_job({**TWO_NODES, "spec.startupDeadlineSeconds": 300,
                    "status": {"phase": "Pending", "attempt": 0}})
    decision = run(job, [make_pod(0, phase="Running"), pod], now=306)
    assert decision.status["phase"] == "Failed"
    assert condition(decision, "Failed")["reason"] == reason
    assert decision.status["message"] == (
        f"pod job-a0-n1 is not running 300s after it was scheduled ({detail}; startupDeadlineSeconds 300)"
    )


def test_startup_deadline_not_reached_requeues_and_ignores_unscheduled_pods() -> None:
    job = make_job({**TWO_NODES, "spec.startupDeadlineSeconds": 300, "status": {"phase": "Pending", "attempt": 0}})
    decision = run(job, [make_pod(0), make_pod(1, node="n1", scheduled_at=5, waiting="ErrImagePull")], now=105)
    assert decision.status["phase"] == "Pending"
    assert decision.requeue_after == 200


# ---- pods the API server refuses to create -------------------------------------------------------------------

PSA = ('pods "job-a0-n0" is forbidden: violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false')
NO_PRIORITY_CLASS = 'pods "job-a0-n0" is forbidden: no PriorityClass with name urgent was found'


def refused_job(http_status: int, message: str, since: float, **paths: Any) -> dict[str, Any]:
    status = record_create_refusal({"phase": "Pending", "attempt": 0}, http_status, message, at(since), 1)
    return make_job({**TWO_NODES, "spec.startupDeadlineSeconds": 300, "status": status}, **paths)


def test_a_permanent_refusal_fails_the_job_at_once_with_the_apis_message() -> None:
    decision = run(refused_job(403, PSA, since=99), [make_pod(1, node="n1")], now=100)
    assert decision.status["phase"] == "Failed"
    assert condition(decision, "Failed")["reason"] == "PodRejected"
    assert decision.status["message"] == f"The API server refused the pods: {PSA}"
    assert described(decision) == ["delete Pod job-a0-n1"]


def test_a_passing_refusal_retries_the_create_until_the_startup_deadline() -> None:
    decision = run(refused_job(403, NO_PRIORITY_CLASS, since=50), now=100)
    assert decision.status["phase"] == "Pending"
    assert "create Pod job-a0-n0" in described(decision)
    assert decision.requeue_after == 250
    assert condition(decision, "PodCreateFailed")["reason"] == "FailedCreate"


# ---- capacity -------------------------------------------------------------------------------------------


def pending_job(**paths: Any) -> dict[str, Any]:
    return make_job({**TWO_NODES, "status": {"phase": "Pending", "attempt": 0, "restarts": 0, "countedFailures": 0,
                                             "message": "x", "observedGeneration": 1}}, **paths)


NO_ROOM = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."


def test_failed_scheduling_sets_waiting_for_capacity_with_the_schedulers_words() -> None:
    decision = run(pending_job(), [make_pod(0), make_pod(1)], [make_event("job-a0-n1", "FailedScheduling", NO_ROOM)])
    assert decision.status["phase"] == "Pending"
    assert condition(decision, "WaitingForCapacity") == {
        "type": "WaitingForCapacity", "status": "True", "reason": "FailedScheduling", "message": NO_ROOM,
        "lastTransitionTime": ts(100), "observedGeneration": 1,
    }
    assert decision.events_to_emit == (EventToEmit("Warning", "WaitingForCapacity", f"pod job-a0-n1: {NO_ROOM}"),)
    assert decision.requeue_after == 1800
    assert decision.status["message"] == f"Attempt 0: 0 of 2 pod(s) running; waiting for capacity: {NO_ROOM}"


def test_capacity_timeout_fails_the_job() -> None:
    job = pending_job(spec__capacityTimeoutSeconds=60)
    job["status"]["conditions"] = [{"type": "WaitingForCapacity", "status": "True", "reason": "FailedScheduling",
                                    "message": NO_ROOM, "lastTransitionTime": ts(40)}]
    decision = run(job, [make_pod(0), make_pod(1)], [make_event("job-a0-n0", "FailedScheduling", NO_ROOM)], now=100)
    assert decision.status["phase"] == "Failed"
    assert condition(decision, "Failed")["reason"] == "CapacityTimeout"
    assert decision.status["message"] == f"No capacity for 60s (capacityTimeoutSeconds): {NO_ROOM}"
    assert condition(decision, "WaitingForCapacity")["status"] == "False"


def test_capacity_arriving_clears_waiting() -> None:
    job = pending_job()
    job["status"]["conditions"] = [{"type": "WaitingForCapacity", "status": "True", "reason": "FailedScheduling",
                                    "message": NO_ROOM, "lastTransitionTime": ts(40)}]
    events = [make_event("job-a0-n0", "FailedScheduling", NO_ROOM, 40)]
    decision = run(job, [make_pod(0, node="n1", scheduled_at=90), make_pod(1, node="n2", scheduled_at=90)], events)
    assert condition(decision, "WaitingForCapacity") == {
        "type": "WaitingForCapacity", "status": "False", "reason": "CapacityAvailable",
        "message": "every pod is scheduled or waiting for nothing", "lastTransitionTime": ts(100),
        "observedGeneration": 1,
    }


# ---- invalid specs --------------------------------------------------------------------------------------


def test_invalid_spec_fails_with_a_condition_naming_the_field_and_no_pods() -> None:
    decision = run(make_job({"spec.distributed.nodes": 64, "spec.distributed.procsPerNode": 32}))
    message = "spec.distributed: nodes x procsPerNode = 2048 processes exceeds the supported 1024"
    assert decision.actions == ()
    assert decision.status == {
        "phase": "Failed",
        "message": message,
        "completionTime": ts(100),
        "observedGeneration": 1,
        "conditions": [
            {"type": "InvalidSpec", "status": "True", "reason": "InvalidSpec", "message": message,
             "lastTransitionTime": ts(100), "observedGeneration": 1},
            {"type": "Failed", "status": "True", "reason": "InvalidSpec", "message": message,
             "lastTransitionTime": ts(100), "observedGeneration": 1},
        ],
    }
    assert decision.events_to_emit == (EventToEmit("Warning", "InvalidSpec", message),)


def test_invalid_spec_again_is_quiet_and_keeps_the_completion_time() -> None:
    first = run(make_job(spec__training={"epochs": 1, "maxSteps": 5}), now=100)
    again = run(make_job(spec__training={"epochs": 1, "maxSteps": 5}, status=first.status), now=200)
    assert again.status == first.status
    assert again.events_to_emit == ()


def test_a_corrected_spec_starts_the_job() -> None:
    failed = run(make_job(spec__training={"epochs": 1, "maxSteps": 5}), now=100).status
    decision = run(make_job(status=failed, metadata__generation=2), now=200)
    assert decision.status["phase"] == "Pending"
    assert "completionTime" not in decision.status
    assert condition(decision, "InvalidSpec")["status"] == "False"
    assert condition(decision, "Failed")["status"] == "False"
    assert described(decision)[-1] == "create Pod job-a0-n0"


def test_invalid_spec_removes_pods_that_exist() -> None:
    job = running_job(spec__env=[{"name": "PET_NNODES", "value": "9"}])
    decision = run(job, GANG)
    assert described(decision) == ["delete Pod job-a0-n0", "delete Pod job-a0-n1"]
    assert decision.status["message"] == (
        "spec.env[0].name: env PET_NNODES is reserved: the operator sets it for every pod"
    )


# ---- finished jobs --------------------------------------------------------------------------------------


def finished_job(**paths: Any) -> dict[str, Any]:
    return make_job({"status": {"phase": "Succeeded", "completionTime": ts(100), "attempt": 0}}, **paths)


def test_ttl_after_finished_requeues_then_deletes_the_job() -> None:
    assert run(finished_job(spec__ttlSecondsAfterFinished=60), now=130).requeue_after == 30
    assert described(run(finished_job(spec__ttlSecondsAfterFinished=60), now=160)) == ["delete FineTuneJob"]


def test_finished_job_without_ttl_is_left_alone() -> None:
    decision = run(finished_job(), now=10_000)
    assert decision.actions == ()
    assert decision.requeue_after is None


def test_finished_job_cleans_leftover_pods_by_policy() -> None:
    pods = [make_pod(0, 0, "Succeeded", exit_code=0), make_pod(1, 0, "Running"), make_pod(2, 0, "Running",
                                                                                          deleting=True)]
    assert described(run(finished_job(spec__cleanPodPolicy="Running"), pods)) == ["delete Pod job-a0-n1"]
    assert described(run(finished_job(), pods)) == ["delete Pod job-a0-n0", "delete Pod job-a0-n1"]


def test_job_being_deleted_is_left_to_the_garbage_collector() -> None:
    decision = run(running_job(metadata__deletionTimestamp=ts(50)), [make_pod(0, 0, "Failed", exit_code=1)])
    assert decision.actions == ()
    assert decision.events_to_emit == ()


# ---- progress -------------------------------------------------------------------------------------------


SAMPLE = ProgressSample(step=120, total_steps=500, epoch=0.48, train_loss=1.2345678, eval_loss=1.5,
                        learning_rate=0.0002, tokens_per_second=1000.0, last_checkpoint_step=100,
                        steps_per_second=0.1)


def test_progress_and_metrics_come_from_the_sample() -> None:
    decision = run(running_job(), GANG, sample=SAMPLE)
    status = decision.status
    assert status["progress"] == {"step": 120, "totalSteps": 500, "percent": 24.0, "epoch": 0.48,
                                  "etaSeconds": 3800, "eta": "1h03m", "summary": "120/500 (24%)"}
    assert status["metrics"] == {"loss": 1.234568, "evalLoss": 1.5, "tokensPerSecond": 2000.0,
                                 "learningRate": 0.0002}
    assert status["latestCheckpoint"] == {"uri": "s3://out/job/checkpoints/step-00000100/", "step": 100}
    assert "bestCheckpoint" not in status
    assert decision.events_to_emit == ()


def test_progress_without_rate_or_checkpoint_has_no_eta_nor_checkpoint() -> None:
    sample = ProgressSample(step=3, total_steps=10)
    status = run(running_job(), GANG, sample=sample).status
    assert status["progress"] == {"step": 3, "totalSteps": 10, "percent": 30.0, "summary": "3/10 (30%)"}
    assert "latestCheckpoint" not in status


def test_best_checkpoint_when_the_trainer_reports_its_step() -> None:
    sample = ProgressSample(step=300, best_checkpoint_step=200, best_eval_loss=0.9)
    status = run(running_job(), GANG, sample=sample).status
    assert status["bestCheckpoint"] == {"uri": "s3://out/job/checkpoints/step-00000200/", "step": 200,
                                        "evalLoss": 0.9}


def test_progress_is_ignored_unless_running() -> None:
    decision = run(pending_job(), [make_pod(0), make_pod(1)], sample=SAMPLE)
    assert "progress" not in decision.status


def test_success_keeps_progress_but_drops_the_eta() -> None:
    job = running_job(status__progress={"step": 490, "totalSteps": 500, "percent": 98.0, "etaSeconds": 5,
                                        "eta": "5s", "summary": "490/500 (98%)"})
    decision = run(job, [make_pod(0, 0, "Succeeded", exit_code=0)])
    assert decision.status["progress"] == {"step": 490, "totalSteps": 500, "percent": 98.0,
                                           "summary": "490/500 (98%)"}


def test_success_takes_the_final_numbers_from_the_trainer_summary() -> None:
    job = running_job(status__progress={"step": 366, "totalSteps": 500, "percent": 73.2, "etaSeconds": 5,
                                        "eta": "5s", "summary": "366/500 (73%)"})
    summary = json.dumps({"steps": 500, "maxSteps": 500, "epoch": 2.5, "trainLoss": 0.42, "evalLossAfter": 0.51})
    decision = run(job, [make_pod(0, 0, "Succeeded", exit_code=0, termination_message=summary)])
    assert decision.status["progress"] == {"step": 500, "totalSteps": 500, "percent": 100.0, "epoch": 2.5,
                                           "summary": "500/500 (100%)"}
    assert decision.status["metrics"]["loss"] == 0.42
    assert decision.status["metrics"]["evalLoss"] == 0.51


@pytest.mark.parametrize("message", ["done", "{not json", '{"steps": "many"}', "[1, 2]"])
def test_success_with_no_usable_summary_keeps_the_last_progress(message: str) -> None:
    job = running_job(status__progress={"step": 490, "totalSteps": 500, "percent": 98.0, "summary": "490/500 (98%)"})
    decision = run(job, [make_pod(0, 0, "Succeeded", exit_code=0, termination_message=message)])
    assert decision.status["progress"]["step"] == 490


def test_decide_does_not_modify_its_inputs() -> None:
    job = running_job()
    pods = [make_pod(0, 0, "Running"), make_pod(1, 0, "Failed", exit_code=1)]
    before = json.dumps([job, pods], sort_keys=True)
    run(job, pods)
    assert json.dumps([job, pods], sort_keys=True) == before


def test_statuses_are_json_serialisable() -> None:
    for job in (make_job(), running_job(), restarting_job(), make_job(spec__model=DELETE)):
        json.dumps(run(job, GANG, sample=SAMPLE).status)

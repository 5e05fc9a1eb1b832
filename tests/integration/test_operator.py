"""The real operator (``python -m finetune_operator``) on the real control plane; the tests play kubelet and scheduler.

The API server, etcd and the controller manager (garbage collector, service accounts) are real, and the operator
runs with the chart's ServiceAccount and RBAC. No scheduler and no kubelet run here: pods stay exactly as the tests
patch them (as admin), so every phase, exit code, event and pod IP is set by the test, and the operator's reaction
is checked on the objects a user would look at.
"""

from __future__ import annotations

import contextlib
import copy
import json
import pathlib
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from finetune_trainer.config import config_from_dict
from localcluster.chart import install_chart
from localcluster.controlplane import ControlPlane
from localcluster.operator_process import OperatorProcess
from localcluster.pytest_plugin import wait_until

pytestmark = pytest.mark.integration

REPO = pathlib.Path(__file__).resolve().parents[2]
JOBS = "/apis/finetune.dev/v1alpha1/namespaces/{ns}/finetunejobs"

BASE_SPEC: dict[str, Any] = {
    "model": {"uri": "s3://models/tiny-gpt2"},
    "dataset": {"uri": "s3://datasets/support/train.jsonl"},
    "output": {"uri": "s3://finetune-output/run"},
    "training": {"maxSteps": 60},
    "distributed": {"nodes": 2},
    "resources": {"cpu": "2", "memory": "4Gi"},
    "storage": {"credentialsSecret": "s3-credentials"},
    "restartBackoff": {"initialSeconds": 0, "maxSeconds": 0},
}


class Client:
    """Plain HTTPS as the cluster admin, as kubectl would talk to the API server."""

    def __init__(self, plane: ControlPlane) -> None:
        self.url = plane.url
        self.tls = plane.admin_tls

    def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.tls) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return None
            raise AssertionError(f"{method} {path}: {error.code} {error.read()[:500]!r}") from error

    def create_namespace(self) -> str:
        """A new namespace, once its ``default`` ServiceAccount exists (pods are refused before)."""
        name = f"t-{uuid.uuid4().hex[:10]}"
        self.call("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        wait_until(lambda: self.call("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default"),
                 what="the namespace's default ServiceAccount")
        return name

    def create_job(self, ns: str, name: str, **spec: Any) -> dict[str, Any]:
        body = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name},
                "spec": {**copy.deepcopy(BASE_SPEC), **spec}}
        created: dict[str, Any] = self.call("POST", JOBS.format(ns=ns), body)
        return created

    def job(self, ns: str, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.call("GET", JOBS.format(ns=ns) + "/" + name)
        return found

    def status(self, ns: str, name: str) -> dict[str, Any]:
        return (self.job(ns, name) or {}).get("status") or {}

    def patch_job(self, ns: str, name: str, patch: dict[str, Any]) -> None:
        self.call("PATCH", JOBS.format(ns=ns) + "/" + name, patch, "application/merge-patch+json")

    def delete_job(self, ns: str, name: str) -> None:
        self.call("DELETE", JOBS.format(ns=ns) + "/" + name)

    def items(self, ns: str, plural: str) -> list[dict[str, Any]]:
        return list((self.call("GET", f"/api/v1/namespaces/{ns}/{plural}") or {}).get("items") or [])

    def config_maps(self, ns: str) -> list[dict[str, Any]]:
        """The namespace's ConfigMaps but the CA bundle the controller manager publishes into every namespace."""
        return [c for c in self.items(ns, "configmaps") if c["metadata"]["name"] != "kube-root-ca.crt"]

    def pod_names(self, ns: str) -> list[str]:
        return sorted(p["metadata"]["name"] for p in self.items(ns, "pods"))

    def patch_pod_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        self.call("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status", {"status": status},
                  "application/merge-patch+json")

    def run_pod(self, ns: str, name: str, ip: str = "10.0.0.1") -> None:
        self.patch_pod_status(ns, name, {"phase": "Running", "podIP": ip, "containerStatuses": [
            {"name": "trainer", "ready": True, "restartCount": 0, "image": "x", "imageID": "", "state": {
                "running": {"startedAt": "2025-01-01T00:00:00Z"}}}]})

    def end_pod(self, ns: str, name: str, exit_code: int, message: str = "", reason: str = "Error") -> None:
        terminated: dict[str, Any] = {"exitCode": exit_code, "reason": reason,
                                      "startedAt": "2025-01-01T00:00:00Z", "finishedAt": "2025-01-01T00:01:00Z"}
        if message:
            terminated["message"] = message
        self.patch_pod_status(ns, name, {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0, "image": "x",
                                   "imageID": "", "state": {"terminated": terminated}}],
        })

    def event_reasons(self, ns: str, job: str) -> list[str]:
        events = [e for e in self.items(ns, "events")
                  if e.get("involvedObject", {}).get("kind") == "FineTuneJob"
                  and e["involvedObject"].get("name") == job]
        # resourceVersion orders them exactly (timestamps have one-second resolution).
        events.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
        return [e["reason"] for e in events]


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlPlane, pathlib.Path]]:
    """The control plane without a scheduler, the chart installed cluster-wide, and the operator's kubeconfig."""
    work = tmp_path_factory.mktemp("operator")
    with ControlPlane(work / "control-plane", scheduler=False) as control_plane:
        yield control_plane, install_chart(control_plane, work / "operator.kubeconfig")


@pytest.fixture(scope="module")
def operator_kubeconfig(plane: tuple[ControlPlane, pathlib.Path]) -> pathlib.Path:
    """The chart ServiceAccount's kubeconfig, for the local cluster plugin's ``operator`` fixture."""
    return plane[1]


@pytest.fixture
def client(plane: tuple[ControlPlane, pathlib.Path], operator: OperatorProcess) -> Iterator[Client]:
    yield Client(plane[0])
    if operator.process is not None and not operator.running:
        pytest.fail(f"the operator died:\n{operator.log_tail()}")


@pytest.fixture
def ns(client: Client) -> str:
    return client.create_namespace()


def phase_is(client: Client, ns: str, name: str, phase: str) -> Callable[[], dict[str, Any] | None]:
    def probe() -> dict[str, Any] | None:
        status = client.status(ns, name)
        return status if status.get("phase") == phase else None

    return probe


def pods_are(client: Client, ns: str, names: list[str]) -> Callable[[], bool]:
    def probe() -> bool:
        return client.pod_names(ns) == names

    return probe


def events_are(client: Client, ns: str, job: str, reasons: list[str]) -> None:
    """The job's Events reach exactly ``reasons``: the operator posts them after the status patch, which comes
    after the pods, so the last one may land a moment after what the test waited for."""
    wait_until(lambda: client.event_reasons(ns, job) == reasons, what=f"events {reasons}")
    assert client.event_reasons(ns, job) == reasons


def settled(operator: OperatorProcess, ns: str, name: str, rounds: int = 2) -> None:
    """Wait until the operator has finished ``rounds`` more reconciles of the job: at least one began after this
    call, so it saw the world as the test left it (a positive signal instead of sleeping and hoping)."""
    start = operator.reconciles(ns, name)
    wait_until(lambda: operator.reconciles(ns, name) >= start + rounds, what=f"{rounds} more reconciles of {name}")


# ---- tests ----------------------------------------------------------------------------------------------


def test_create_makes_the_service_config_and_pods_with_exact_env(client: Client, ns: str) -> None:
    client.create_job(ns, "llm", distributed={"nodes": 2, "procsPerNode": 2}, resources={"cpu": "4"},
                      env=[{"name": "NCCL_DEBUG", "value": "WARN"}])
    wait_until(pods_are(client, ns, ["llm-a0-n0", "llm-a0-n1"]), what="two pods")
    job = client.job(ns, "llm")
    assert job is not None
    owner = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "llm",
             "uid": job["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}

    (service,) = client.items(ns, "services")
    assert service["metadata"]["name"] == "llm"
    assert (service["spec"]["clusterIP"], service["spec"]["publishNotReadyAddresses"]) == ("None", True)
    assert service["spec"]["selector"] == {"finetune.dev/job-name": "llm"}
    assert service["metadata"]["ownerReferences"] == [owner]

    (config_map,) = client.config_maps(ns)
    config = config_from_dict(json.loads(config_map["data"]["config.json"]))
    assert (config.job.name, config.job.namespace, config.job.attempt) == ("llm", ns, 0)

    pods = {p["metadata"]["name"]: p for p in client.items(ns, "pods")}
    pod = pods["llm-a0-n1"]
    assert pod["metadata"]["ownerReferences"] == [owner]
    assert (pod["spec"]["hostname"], pod["spec"]["subdomain"], pod["spec"]["restartPolicy"]) == (
        "llm-n1", "llm", "Never")
    container = pod["spec"]["containers"][0]
    assert container["image"] == "trainer:it"
    assert container["command"] == ["python", "-m", "finetune_trainer.launch"]
    assert container["env"] == [
        {"name": "PET_NNODES", "value": "2"},
        {"name": "PET_NODE_RANK", "value": "1"},
        {"name": "PET_NPROC_PER_NODE", "value": "2"},
        {"name": "PET_MASTER_ADDR", "value": "llm-n0.llm"},
        {"name": "PET_MASTER_PORT", "value": "29500"},
        {"name": "OMP_NUM_THREADS", "value": "2"},
        {"name": "FINETUNE_CONFIG", "value": "/etc/finetune/config.json"},
        {"name": "FINETUNE_ATTEMPT", "value": "0"},
        {"name": "AWS_ACCESS_KEY_ID",
         "valueFrom": {"secretKeyRef": {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID"}}},
        {"name": "AWS_SECRET_ACCESS_KEY",
         "valueFrom": {"secretKeyRef": {"name": "s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}}},
        {"name": "NCCL_DEBUG", "value": "WARN"},
    ]
    status = wait_until(phase_is(client, ns, "llm", "Pending"), what="Pending")
    assert (status["attempt"], status["restarts"], status["observedGeneration"]) == (0, 0, 1)
    assert wait_until(lambda: client.event_reasons(ns, "llm"), what="an event") == ["Created"]


def test_pod_phases_drive_the_status_to_success(client: Client, ns: str, operator: OperatorProcess) -> None:
    client.create_job(ns, "ok")
    wait_until(pods_are(client, ns, ["ok-a0-n0", "ok-a0-n1"]))
    client.run_pod(ns, "ok-a0-n0")
    settled(operator, ns, "ok")
    assert client.status(ns, "ok")["phase"] == "Pending"
    client.run_pod(ns, "ok-a0-n1")
    running = wait_until(phase_is(client, ns, "ok", "Running"), what="Running")
    assert running["startTime"]
    assert [c["type"] for c in running["conditions"] if c["status"] == "True"] == ["Running"]
    client.end_pod(ns, "ok-a0-n0", 0)
    done = wait_until(phase_is(client, ns, "ok", "Succeeded"), what="Succeeded")
    assert done["model"] == {"uri": "s3://finetune-output/run/model/", "export": "full"}
    assert done["completionTime"]
    wait_until(pods_are(client, ns, []), what="cleanPodPolicy All to remove the pods")
    events_are(client, ns, "ok", ["Created", "AllPodsRunning", "Succeeded"])


def test_a_failed_pod_restarts_the_gang_as_a_new_attempt(client: Client, ns: str) -> None:
    client.create_job(ns, "crash", backoffLimit=2)
    wait_until(pods_are(client, ns, ["crash-a0-n0", "crash-a0-n1"]))
    client.run_pod(ns, "crash-a0-n0")
    client.run_pod(ns, "crash-a0-n1")
    wait_until(phase_is(client, ns, "crash", "Running"))
    client.end_pod(ns, "crash-a0-n1", 1, "RuntimeError: NCCL timeout")
    wait_until(pods_are(client, ns, ["crash-a1-n0", "crash-a1-n1"]), what="attempt 1's pods")
    status = wait_until(phase_is(client, ns, "crash", "Pending"))
    assert (status["attempt"], status["restarts"], status["countedFailures"]) == (1, 1, 1)
    config_map = client.config_maps(ns)[0]
    assert json.loads(config_map["data"]["config.json"])["job"]["attempt"] == 1
    events_are(client, ns, "crash", ["Created", "AllPodsRunning", "PodFailed", "Restarted"])


def test_backoff_limit_exhausted_fails_the_job(client: Client, ns: str) -> None:
    client.create_job(ns, "flaky", backoffLimit=0)
    wait_until(pods_are(client, ns, ["flaky-a0-n0", "flaky-a0-n1"]))
    client.end_pod(ns, "flaky-a0-n0", 1, "boom")
    status = wait_until(phase_is(client, ns, "flaky", "Failed"))
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded"
    assert "boom" in status["message"]
    wait_until(pods_are(client, ns, []))


def test_preemption_restarts_without_counting(client: Client, ns: str) -> None:
    client.create_job(ns, "spot", backoffLimit=0)
    wait_until(pods_are(client, ns, ["spot-a0-n0", "spot-a0-n1"]))
    client.end_pod(ns, "spot-a0-n1", 75, "preempted: checkpoint step 40 saved")
    wait_until(pods_are(client, ns, ["spot-a1-n0", "spot-a1-n1"]), what="attempt 1")
    status = client.status(ns, "spot")
    assert (status["restarts"], status["countedFailures"]) == (1, 0)
    assert "Preempted" in client.event_reasons(ns, "spot")


def test_invalid_exit_fails_at_once_with_the_termination_message(client: Client, ns: str) -> None:
    client.create_job(ns, "bad-data")
    wait_until(pods_are(client, ns, ["bad-data-a0-n0", "bad-data-a0-n1"]))
    client.end_pod(ns, "bad-data-a0-n0", 64, "dataset.format: row 3 has no 'messages' column")
    status = wait_until(phase_is(client, ns, "bad-data", "Failed"))
    assert "dataset.format: row 3 has no 'messages' column" in status["message"]
    assert next(c for c in status["conditions"] if c["type"] == "Failed")["reason"] == "PermanentError"
    assert status["restarts"] == 0


def test_invalid_spec_fails_with_the_field_and_no_pods(client: Client, ns: str) -> None:
    # Each URI is valid alone; writing the output inside the base model's folder is not.
    client.create_job(ns, "overlap", output={"uri": "s3://models/tiny-gpt2/finetuned"})
    status = wait_until(phase_is(client, ns, "overlap", "Failed"))
    invalid = next(c for c in status["conditions"] if c["type"] == "InvalidSpec")
    assert invalid["message"].startswith("spec.output.uri: "), invalid
    assert client.pod_names(ns) == []
    events_are(client, ns, "overlap", ["InvalidSpec"])


def test_suspend_and_resume(client: Client, ns: str) -> None:
    client.create_job(ns, "queued", suspend=True)
    status = wait_until(phase_is(client, ns, "queued", "Suspended"))
    assert client.pod_names(ns) == []
    assert status["attempt"] == 0
    client.patch_job(ns, "queued", {"spec": {"suspend": False}})
    wait_until(pods_are(client, ns, ["queued-a0-n0", "queued-a0-n1"]), what="pods after admission")
    client.run_pod(ns, "queued-a0-n0")
    client.run_pod(ns, "queued-a0-n1")
    wait_until(phase_is(client, ns, "queued", "Running"))
    client.patch_job(ns, "queued", {"spec": {"suspend": True}})
    wait_until(pods_are(client, ns, []), what="preemption by suspend to delete the pods")
    status = wait_until(phase_is(client, ns, "queued", "Suspended"))
    assert (status["attempt"], status["restarts"]) == (1, 1)
    client.patch_job(ns, "queued", {"spec": {"suspend": False}})
    wait_until(pods_are(client, ns, ["queued-a1-n0", "queued-a1-n1"]), what="the next attempt on resume")
    events_are(client, ns, "queued", ["Suspended", "Resumed", "AllPodsRunning", "Suspended", "Resumed"])


def test_active_deadline(client: Client, ns: str) -> None:
    client.create_job(ns, "slow", activeDeadlineSeconds=11, checkpoint={"gracePeriodSeconds": 10})
    wait_until(pods_are(client, ns, ["slow-a0-n0", "slow-a0-n1"]))
    client.run_pod(ns, "slow-a0-n0")
    client.run_pod(ns, "slow-a0-n1")
    wait_until(phase_is(client, ns, "slow", "Running"))
    status = wait_until(phase_is(client, ns, "slow", "Failed"), timeout=20, what="DeadlineExceeded")
    assert next(c for c in status["conditions"] if c["type"] == "Failed")["reason"] == "DeadlineExceeded"
    wait_until(pods_are(client, ns, []))


def test_failed_scheduling_waits_for_capacity_then_times_out(client: Client, ns: str) -> None:
    client.create_job(ns, "big", capacityTimeoutSeconds=3, resources={"gpus": 8})
    wait_until(pods_are(client, ns, ["big-a0-n0", "big-a0-n1"]))
    message = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    client.call("POST", f"/api/v1/namespaces/{ns}/events", {
        "apiVersion": "v1", "kind": "Event", "metadata": {"name": "big-a0-n1.sched", "namespace": ns},
        "involvedObject": {"kind": "Pod", "name": "big-a0-n1", "namespace": ns},
        "reason": "FailedScheduling", "message": message, "type": "Warning",
        "lastTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"component": "default-scheduler"},
    })
    # The event carries no pod change: the operator's resync finds it.
    waiting = wait_until(lambda: next((c for c in client.status(ns, "big").get("conditions", [])
                                     if c["type"] == "WaitingForCapacity" and c["status"] == "True"), None),
                       what="WaitingForCapacity")
    assert (waiting["reason"], waiting["message"]) == ("FailedScheduling", message)
    assert client.status(ns, "big")["phase"] == "Pending"
    status = wait_until(phase_is(client, ns, "big", "Failed"), timeout=15, what="CapacityTimeout")
    assert next(c for c in status["conditions"] if c["type"] == "Failed")["reason"] == "CapacityTimeout"
    assert "WaitingForCapacity" in client.event_reasons(ns, "big")


def test_operator_restarted_mid_job_creates_no_duplicates(client: Client, ns: str,
                                                          operator: OperatorProcess) -> None:
    client.create_job(ns, "survivor")
    wait_until(pods_are(client, ns, ["survivor-a0-n0", "survivor-a0-n1"]))
    operator.stop(kill=True)
    client.run_pod(ns, "survivor-a0-n0")
    client.run_pod(ns, "survivor-a0-n1")
    operator.start()
    wait_until(phase_is(client, ns, "survivor", "Running"), what="Running after the restart")
    settled(operator, ns, "survivor")
    assert client.pod_names(ns) == ["survivor-a0-n0", "survivor-a0-n1"]
    assert client.status(ns, "survivor")["attempt"] == 0


def test_deleting_the_job_removes_its_children(client: Client, ns: str) -> None:
    client.create_job(ns, "gone")
    wait_until(pods_are(client, ns, ["gone-a0-n0", "gone-a0-n1"]))
    client.delete_job(ns, "gone")
    wait_until(lambda: client.job(ns, "gone") is None, what="the job to go")
    wait_until(lambda: not client.items(ns, "pods") and not client.items(ns, "services")
             and not client.config_maps(ns), what="garbage collection of the children")


def kopf_marks(job: dict[str, Any] | None) -> dict[str, Any]:
    """What kopf could have written to a job: finalizers and its annotations."""
    assert job is not None
    metadata = job["metadata"]
    return {"finalizers": metadata.get("finalizers") or [],
            "annotations": sorted(k for k in metadata.get("annotations") or {} if "kopf" in k)}


def test_a_running_job_never_carries_a_kopf_finalizer(client: Client, ns: str, operator: OperatorProcess) -> None:
    client.create_job(ns, "plain")
    wait_until(pods_are(client, ns, ["plain-a0-n0", "plain-a0-n1"]))
    wait_until(phase_is(client, ns, "plain", "Pending"))
    assert kopf_marks(client.job(ns, "plain")) == {"finalizers": [], "annotations": []}
    client.run_pod(ns, "plain-a0-n0")
    client.run_pod(ns, "plain-a0-n1")
    wait_until(phase_is(client, ns, "plain", "Running"))
    settled(operator, ns, "plain", rounds=3)  # the watch event's reconcile and resync rounds after it
    assert kopf_marks(client.job(ns, "plain")) == {"finalizers": [], "annotations": []}


def test_a_job_deleted_while_the_operator_is_down_goes_away_with_its_children(
    client: Client, ns: str, operator: OperatorProcess
) -> None:
    client.create_job(ns, "orphan")
    wait_until(pods_are(client, ns, ["orphan-a0-n0", "orphan-a0-n1"]))
    client.run_pod(ns, "orphan-a0-n0")
    client.run_pod(ns, "orphan-a0-n1")
    wait_until(phase_is(client, ns, "orphan", "Running"))
    operator.stop()
    try:
        client.delete_job(ns, "orphan")
        # Nothing holds the deletion: no finalizer, and the garbage collector follows the owner references.
        wait_until(lambda: client.job(ns, "orphan") is None, timeout=3, what="the job to go without an operator")
        wait_until(lambda: not client.items(ns, "pods") and not client.items(ns, "services")
                 and not client.config_maps(ns), timeout=5, what="its pods, Service and ConfigMap to go")
    finally:
        operator.start()


def test_the_resync_drives_a_job_on_without_any_watch_event(client: Client, ns: str) -> None:
    client.create_job(ns, "stuck", capacityTimeoutSeconds=2, resources={"gpus": 8})
    wait_until(pods_are(client, ns, ["stuck-a0-n0", "stuck-a0-n1"]))
    wait_until(phase_is(client, ns, "stuck", "Pending"))

    def versions() -> list[str]:
        job = client.job(ns, "stuck") or {}
        return [str(o["metadata"]["resourceVersion"]) for o in [job, *client.items(ns, "pods")]]

    quiet = versions()
    # Scheduler events are not watched: only the operator's own periodic resync can read this one.
    client.call("POST", f"/api/v1/namespaces/{ns}/events", {
        "apiVersion": "v1", "kind": "Event", "metadata": {"name": "stuck-a0-n0.sched", "namespace": ns},
        "involvedObject": {"kind": "Pod", "name": "stuck-a0-n0", "namespace": ns},
        "reason": "FailedScheduling", "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.",
        "type": "Warning", "lastTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"component": "default-scheduler"},
    })
    assert versions() == quiet, "neither the job nor its pods changed: no watch event"
    wait_until(lambda: any(c["type"] == "WaitingForCapacity" and c["status"] == "True"
                         for c in client.status(ns, "stuck").get("conditions", [])),
             timeout=4, what="WaitingForCapacity from a resync (every 1 s here)")
    status = wait_until(phase_is(client, ns, "stuck", "Failed"), timeout=8, what="Failed by CapacityTimeout")
    assert next(c for c in status["conditions"] if c["type"] == "Failed")["reason"] == "CapacityTimeout"
    wait_until(pods_are(client, ns, []), what="the gang deleted")


def test_progress_comes_from_rank_0s_metrics_endpoint(client: Client, ns: str) -> None:
    registry = CollectorRegistry()
    labels = ("rank", "job_name", "job_namespace")
    gauges = {name: Gauge(name, name, labels, registry=registry).labels(rank="0", job_name="watched",
                                                                        job_namespace=ns)
              for name in ("finetune_step", "finetune_total_steps", "finetune_epoch", "finetune_train_loss",
                           "finetune_eval_loss", "finetune_learning_rate", "finetune_tokens_per_second",
                           "finetune_last_checkpoint_step", "finetune_best_eval_loss")}
    values = {"finetune_step": 10, "finetune_total_steps": 100, "finetune_epoch": 0.1, "finetune_train_loss": 2.5,
              "finetune_eval_loss": 2.75, "finetune_learning_rate": 1e-4, "finetune_tokens_per_second": 500,
              "finetune_last_checkpoint_step": 10, "finetune_best_eval_loss": 2.75}
    for name, value in values.items():
        gauges[name].set(value)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        port = server.server_port
        client.create_job(ns, "watched", metrics={"port": port})
        wait_until(pods_are(client, ns, ["watched-a0-n0", "watched-a0-n1"]))
        client.run_pod(ns, "watched-a0-n0", ip="127.0.0.1")
        client.run_pod(ns, "watched-a0-n1", ip="127.0.0.2")
        status = wait_until(lambda: client.status(ns, "watched") if client.status(ns, "watched").get("progress")
                          else None, what="status.progress")
        assert status["progress"]["summary"] == "10/100 (10%)"
        assert status["metrics"] == {"loss": 2.5, "evalLoss": 2.75, "tokensPerSecond": 1000.0,
                                     "learningRate": 0.0001}
        assert status["latestCheckpoint"] == {"uri": "s3://finetune-output/run/checkpoints/step-00000010/",
                                              "step": 10}
        gauges["finetune_step"].set(40)
        status = wait_until(lambda: client.status(ns, "watched") if "eta" in client.status(ns, "watched").get(
            "progress", {}) else None, what="an ETA from two readings")
        progress = status["progress"]
        assert (progress["step"], progress["totalSteps"], progress["percent"]) == (40, 100, 40.0)
        assert progress["etaSeconds"] > 0
        assert progress["summary"] == "40/100 (40%)"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_operator_metrics(client: Client, ns: str, operator: OperatorProcess) -> None:
    client.create_job(ns, "counted")
    wait_until(phase_is(client, ns, "counted", "Pending"))
    text = wait_until(lambda: operator.metrics() if 'finetune_operator_jobs{phase="Pending"}' in operator.metrics()
                    else None, what="the jobs gauge")
    for name in ("finetune_operator_jobs_created_total", "finetune_operator_reconcile_seconds_bucket",
                 'finetune_operator_api_requests_total{verb="create"}', "process_resident_memory_bytes"):
        assert name in text, name
    with contextlib.suppress(Exception):
        client.delete_job(ns, "counted")


# ---- what only a real API server shows ----------------------------------------------------------------------


def owner_uid(obj: dict[str, Any]) -> str | None:
    return next((ref["uid"] for ref in obj["metadata"].get("ownerReferences") or [] if ref.get("controller")), None)


def test_children_block_owner_deletion_under_owner_references_permission_enforcement(
    client: Client, ns: str, plane: tuple[ControlPlane, pathlib.Path]
) -> None:
    # OwnerReferencesPermissionEnforcement refuses a child with blockOwnerDeletion unless its creator may update
    # the owner's finalizers: the chart grants exactly that, so the operator's creates pass.
    control_plane, operator_kubeconfig = plane
    assert control_plane.kubectl("auth", "can-i", "update", "finetunejobs.finetune.dev", "--subresource=finalizers",
                                 "-n", ns, kubeconfig=operator_kubeconfig).strip() == "yes"
    client.create_job(ns, "owned")
    wait_until(pods_are(client, ns, ["owned-a0-n0", "owned-a0-n1"]), what="the gang")
    uid = (client.job(ns, "owned") or {})["metadata"]["uid"]
    children = [*client.items(ns, "pods"), *client.items(ns, "services"), *client.config_maps(ns)]
    assert len(children) == 4
    for child in children:
        (reference,) = child["metadata"]["ownerReferences"]
        assert (reference["uid"], reference["blockOwnerDeletion"]) == (uid, True)


@pytest.mark.parametrize(
    ("spec", "reason", "words"),
    [
        # Node affinity the pod API rejects (operator In needs values; the CRD leaves affinity to the pod API):
        # 422, never creatable.
        pytest.param({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                          "nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In",
                                                                       "values": []}]}]}}}},
                     "PodRejected", "matchExpressions[0].values", id="invalid-pod"),
        # A PriorityClass nobody created: Priority admission refuses (403) until it exists; bounded by the
        # startup deadline.
        pytest.param({"priorityClassName": "nonexistent", "startupDeadlineSeconds": 3}, "FailedCreate",
                     "no PriorityClass with name nonexistent was found", id="missing-priority-class"),
        # A ServiceAccount nobody created: ServiceAccount admission refuses the same way.
        pytest.param({"serviceAccountName": "ghost", "startupDeadlineSeconds": 3}, "FailedCreate",
                     'serviceaccount "ghost" not found', id="missing-service-account"),
    ],
)
def test_pods_the_api_refuses_fail_the_job_with_the_apis_message(
    client: Client, ns: str, spec: dict[str, Any], reason: str, words: str
) -> None:
    client.create_job(ns, "refused", **spec)
    status = wait_until(phase_is(client, ns, "refused", "Failed"), timeout=20, what="Failed")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == reason
    assert words in status["message"], status["message"]
    assert status["message"].startswith("The API server refused the pods")
    assert client.pod_names(ns) == []


def test_a_job_recreated_under_the_same_name_never_reuses_the_old_jobs_children(client: Client, ns: str) -> None:
    client.create_job(ns, "again")
    wait_until(pods_are(client, ns, ["again-a0-n0", "again-a0-n1"]), what="the first job's gang")
    old_uid = (client.job(ns, "again") or {})["metadata"]["uid"]
    client.delete_job(ns, "again")
    client.create_job(ns, "again")
    new_uid = (client.job(ns, "again") or {})["metadata"]["uid"]
    assert new_uid != old_uid

    def children_of_the_new_job() -> bool:
        children = [*client.items(ns, "pods"), *client.items(ns, "services"), *client.config_maps(ns)]
        return len(children) == 4 and all(owner_uid(child) == new_uid for child in children)

    # The garbage collector removes the old job's children; the new job's are created in their place, not
    # adopted from the old job (which the collector would then delete under the new one).
    wait_until(children_of_the_new_job, timeout=30, what="the new job's own Service, ConfigMap and pods")
    assert wait_until(phase_is(client, ns, "again", "Pending"))["attempt"] == 0

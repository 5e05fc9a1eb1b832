"""The process kubelet as a node of the real control plane: pods the scheduler binds run, are reported, deleted,
and seen by kubectl (logs through the API server from the kubelet's HTTPS endpoint)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from localcluster.controlplane import ControlPlane
from localcluster.kubelet import Kubelet
from localcluster.pytest_plugin import wait_until

pytestmark = pytest.mark.integration

NODE_GPUS = 1


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ControlPlane, Kubelet, Path]]:
    work = tmp_path_factory.mktemp("kubelet")
    with ControlPlane(work / "control-plane") as plane, Kubelet(
        plane.url, plane.node_credentials("localnode"), work / "node", cpu="2", memory="4Gi", gpus=NODE_GPUS,
        version=plane.version,
    ) as kubelet:
        yield plane, kubelet, plane.admin_kubeconfig


@pytest.fixture
def kubelet(cluster: tuple[ControlPlane, Kubelet, Path]) -> Kubelet:
    return cluster[1]


@pytest.fixture
def core(cluster: tuple[ControlPlane, Kubelet, Path]) -> client.CoreV1Api:
    return client.CoreV1Api(config.new_client_from_config(str(cluster[2])))


def new_namespace(core: client.CoreV1Api) -> str:
    """A fresh namespace, once its default ServiceAccount exists (admission refuses pods before)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    wait_until(lambda: core.list_namespaced_service_account(name).items, 30, "the default ServiceAccount")
    return name


@pytest.fixture
def namespace(core: client.CoreV1Api) -> str:
    """A fresh namespace per test, so names and headless Services never meet across tests."""
    return new_namespace(core)


@pytest.fixture
def kubectl(cluster: tuple[ControlPlane, Kubelet, Path]) -> Callable[..., subprocess.CompletedProcess[str]]:
    binary = shutil.which("kubectl")
    if binary is None:
        pytest.skip("kubectl is not installed")

    def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([binary, "--kubeconfig", str(cluster[2]), *args], capture_output=True, text=True,
                              timeout=timeout, check=False)

    return run


def python_pod(name: str, code: str, **spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "python:3.11", "command": ["python", "-u", "-c", textwrap.dedent(code)]}
    container.update(spec.pop("container", {}))
    metadata = spec.pop("metadata", {})
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **metadata},
        "spec": {"restartPolicy": "Never", "containers": [container], **spec},
    }


def pod_dict(core: client.CoreV1Api, namespace: str, name: str) -> dict[str, Any]:
    response = core.read_namespaced_pod(name, namespace, _preload_content=False)
    result: dict[str, Any] = json.loads(response.data)
    return result


def finished(core: client.CoreV1Api, namespace: str, name: str, timeout: float = 30) -> dict[str, Any]:
    def phase() -> dict[str, Any] | None:
        pod = pod_dict(core, namespace, name)
        return pod if pod.get("status", {}).get("phase") in ("Succeeded", "Failed") else None

    result: dict[str, Any] = wait_until(phase, timeout, f"pod {name} to finish")
    return result


def logs(core: client.CoreV1Api, namespace: str, name: str, container: str = "main") -> str:
    response = core.read_namespaced_pod_log(name, namespace, container=container, _preload_content=False)
    return bytes(response.data).decode()


def started_and_printed(core: client.CoreV1Api, namespace: str, name: str, text: str) -> bool:
    try:
        return text in logs(core, namespace, name)
    except ApiException as error:
        # Not started yet, or bound but not yet seen by the kubelet (the API server passes its 404 on).
        if "is waiting to start" in str(error.body) or error.status == 404:
            return False
        raise


def test_failing_pod_reports_exit_code_termination_message_config_and_secret(
    core: client.CoreV1Api, namespace: str
) -> None:
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "trainer-config"},
                                                  "data": {"config.json": '{"lr": 0.001}'}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "s3"},
                                              "data": {"key": base64.b64encode(b"s3cr3t").decode()}})
    code = """
        import os, sys
        print("config:", open("/etc/finetune/config.json").read())
        print("secret:", os.environ["AWS_SECRET_ACCESS_KEY"], "pod:", os.environ["POD_NAME"])
        open("/dev/termination-log", "w").write("bad config: lr too small")
        sys.exit(3)
    """
    pod = python_pod(
        "fails", code,
        volumes=[{"name": "config", "configMap": {"name": "trainer-config"}}],
        container={
            "volumeMounts": [{"name": "config", "mountPath": "/etc/finetune"}],
            "env": [
                {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "key"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            ],
        },
    )
    core.create_namespaced_pod(namespace, pod)

    result = finished(core, namespace, "fails")

    terminated = result["status"]["containerStatuses"][0]["state"]["terminated"]
    assert result["status"]["phase"] == "Failed"
    assert terminated["exitCode"] == 3
    assert terminated["reason"] == "Error"
    assert terminated["message"] == "bad config: lr too small"
    output = logs(core, namespace, "fails")
    assert 'config: {"lr": 0.001}' in output
    assert "secret: s3cr3t pod: fails" in output
    assert not Path("/etc/finetune/config.json").exists(), "the volume must be visible inside the pod only"


def test_fallback_to_logs_on_error_uses_the_log_tail(core: client.CoreV1Api, namespace: str) -> None:
    code = """
        import sys
        for i in range(200):
            print("line", i)
        sys.exit(2)
    """
    core.create_namespaced_pod(namespace, python_pod(
        "tail", code, container={"terminationMessagePolicy": "FallbackToLogsOnError"}))

    terminated = finished(core, namespace, "tail")["status"]["containerStatuses"][0]["state"]["terminated"]

    assert terminated["message"].rstrip().endswith("line 199")
    assert "line 119" not in terminated["message"], "only the last 80 lines are kept"


def test_headless_service_peers_resolve_each_other(core: client.CoreV1Api, namespace: str) -> None:
    core.create_namespaced_service(namespace, {
        "metadata": {"name": "gang"},
        "spec": {"clusterIP": "None", "selector": {"job": "gang"}, "ports": [{"port": 29500}]},
    })
    code = """
        import os, socket, sys, time
        peer = sys.argv[1]
        for _ in range(200):
            try:
                print("me", socket.gethostname(), socket.gethostbyname(socket.gethostname()))
                print("peer", peer, socket.gethostbyname(peer))
                break
            except OSError:
                time.sleep(0.1)
        else:
            sys.exit(1)
    """
    for me, peer in (("rank0", "rank1"), ("rank1", "rank0")):
        pod = python_pod(me, code, hostname=me, subdomain="gang", metadata={"labels": {"job": "gang"}})
        pod["spec"]["containers"][0]["args"] = [f"{peer}.gang.{namespace}.svc.cluster.local"]
        core.create_namespaced_pod(namespace, pod)

    results = {name: finished(core, namespace, name) for name in ("rank0", "rank1")}

    ips = {name: pod["status"]["podIP"] for name, pod in results.items()}
    assert ips["rank0"] != ips["rank1"]
    assert all(ip.startswith("127.") and ip != "127.0.0.1" for ip in ips.values())
    for me, peer in (("rank0", "rank1"), ("rank1", "rank0")):
        assert results[me]["status"]["phase"] == "Succeeded", logs(core, namespace, me)
        output = logs(core, namespace, me)
        assert f"me {me} {ips[me]}" in output
        assert f"peer {peer}.gang.{namespace}.svc.cluster.local {ips[peer]}" in output


def deletion_events(core: client.CoreV1Api, namespace: str, name: str, timeout: float) -> list[dict[str, Any]]:
    """Every watch event of one pod until it is DELETED."""
    stream = watch.Watch()
    events: list[dict[str, Any]] = []
    for event in stream.stream(core.list_namespaced_pod, namespace, field_selector=f"metadata.name={name}",
                               timeout_seconds=int(timeout)):
        events.append({"type": event["type"], "object": core.api_client.sanitize_for_serialization(event["object"])})
        if event["type"] == "DELETED":
            stream.stop()
    return events


SIGTERM_HANDLER = """
    import signal, sys, time
    def stop(*_):
        print("got SIGTERM", flush=True)
        time.sleep(0.5)
        sys.exit(7)
    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    while True:
        time.sleep(0.1)
"""


def test_graceful_deletion_delivers_sigterm_and_records_the_exit(
    core: client.CoreV1Api, namespace: str, kubelet: Kubelet
) -> None:
    core.create_namespaced_pod(namespace, python_pod("graceful", SIGTERM_HANDLER))
    wait_until(lambda: started_and_printed(core, namespace, "graceful", "ready"), what="the pod to start")
    log_file = kubelet.log_path(namespace, "graceful")

    began = time.monotonic()
    core.delete_namespaced_pod("graceful", namespace, grace_period_seconds=2)
    events = deletion_events(core, namespace, "graceful", timeout=20)
    took = time.monotonic() - began

    assert events[-1]["type"] == "DELETED"
    last_status = [e["object"]["status"] for e in events if e["object"]["status"].get("containerStatuses")][-1]
    terminated = last_status["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 7
    assert 0.4 < took < 2.0, "the process exits on SIGTERM well before the grace period ends"
    assert log_file is not None and "got SIGTERM" in log_file.read_text()


def test_deletion_kills_a_process_that_ignores_sigterm_after_the_grace_period(
    core: client.CoreV1Api, namespace: str
) -> None:
    code = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(600)
    """
    core.create_namespaced_pod(namespace, python_pod("stubborn", code))
    wait_until(lambda: started_and_printed(core, namespace, "stubborn", "ready"), what="the pod to start")

    began = time.monotonic()
    core.delete_namespaced_pod("stubborn", namespace, grace_period_seconds=2)
    events = deletion_events(core, namespace, "stubborn", timeout=20)
    took = time.monotonic() - began

    last_status = [e["object"]["status"] for e in events if e["object"]["status"].get("containerStatuses")][-1]
    assert last_status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
    assert 2.0 <= took < 5.0


def test_more_gpus_than_the_node_has_stays_pending_with_failed_scheduling(
    core: client.CoreV1Api, namespace: str
) -> None:
    pod = python_pod("greedy", "print('never')",
                     container={"resources": {"limits": {"nvidia.com/gpu": str(NODE_GPUS + 1)}}})
    core.create_namespaced_pod(namespace, pod)

    def failed_scheduling() -> list[Any]:
        events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=greedy").items
        return [e for e in events if e.reason == "FailedScheduling"]

    events = wait_until(failed_scheduling, 10, "a FailedScheduling event")

    def unschedulable() -> dict[str, Any] | None:
        conditions = pod_dict(core, namespace, "greedy")["status"].get("conditions") or []
        return next((c for c in conditions if c["type"] == "PodScheduled" and c["status"] == "False"), None)

    scheduled = wait_until(unschedulable, 10, "PodScheduled False")
    assert events[0].type == "Warning"
    # The real scheduler's words, with its preemption verdict after them.
    assert events[0].message.startswith("0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: ")
    assert scheduled["reason"] == "Unschedulable"
    pod = pod_dict(core, namespace, "greedy")
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")


def test_a_pod_waits_for_cpu_freed_by_another(core: client.CoreV1Api, namespace: str) -> None:
    hog = python_pod("hog", "import time; time.sleep(600)", container={"resources": {"requests": {"cpu": "1500m"}}})
    core.create_namespaced_pod(namespace, hog)
    wait_until(lambda: pod_dict(core, namespace, "hog")["status"].get("phase") == "Running", what="hog running")
    core.create_namespaced_pod(namespace, python_pod("second", "print('ran')",
                                                     container={"resources": {"requests": {"cpu": "1"}}}))
    # The scheduler has looked at it and found no CPU left.
    wait_until(lambda: [e for e in core.list_namespaced_event(namespace, field_selector="involvedObject.name=second")
                        .items if e.reason == "FailedScheduling" and "Insufficient cpu" in (e.message or "")],
               10, "FailedScheduling for lack of CPU")
    assert pod_dict(core, namespace, "second")["status"].get("phase") == "Pending"

    core.delete_namespaced_pod("hog", namespace, grace_period_seconds=0)

    assert finished(core, namespace, "second")["status"]["phase"] == "Succeeded"


def test_missing_secret_waits_with_create_container_config_error(core: client.CoreV1Api, namespace: str) -> None:
    pod = python_pod("needs-secret", "import os; print('token', os.environ['TOKEN'])", container={
        "env": [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "later", "key": "token"}}}]})
    core.create_namespaced_pod(namespace, pod)

    def waiting_reason() -> str | None:
        statuses = pod_dict(core, namespace, "needs-secret")["status"].get("containerStatuses") or []
        return statuses[0]["state"].get("waiting", {}).get("reason") if statuses else None

    assert wait_until(lambda: waiting_reason() == "CreateContainerConfigError", what="CreateContainerConfigError")
    core.create_namespaced_secret(namespace, {"metadata": {"name": "later"}, "stringData": {"token": "abc"}})

    assert finished(core, namespace, "needs-secret")["status"]["phase"] == "Succeeded"
    assert "token abc" in logs(core, namespace, "needs-secret")


def test_killed_container_restarts_on_failure_and_reports_the_crash(
    core: client.CoreV1Api, namespace: str, kubelet: Kubelet
) -> None:
    code = """
        import os, time
        marker = "restarted-once"
        if os.path.exists(marker):
            print("second run")
        else:
            open(marker, "w").close()
            print("first run", flush=True)
            time.sleep(600)
    """
    pod = python_pod("crashy", code, restartPolicy="OnFailure",
                     volumes=[{"name": "scratch", "emptyDir": {}}],
                     container={"workingDir": "/scratch",
                                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]})
    core.create_namespaced_pod(namespace, pod)
    wait_until(lambda: started_and_printed(core, namespace, "crashy", "first run"), what="the first run")

    kubelet.kill_container(namespace, "crashy")

    result = finished(core, namespace, "crashy", timeout=30)
    status = result["status"]["containerStatuses"][0]
    assert result["status"]["phase"] == "Succeeded"
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 137
    assert status["lastState"]["terminated"]["reason"] == "Error"
    assert "second run" in logs(core, namespace, "crashy")


def test_eviction_fails_the_pod_with_reason_evicted(
    core: client.CoreV1Api, namespace: str, kubelet: Kubelet
) -> None:
    core.create_namespaced_pod(namespace, python_pod("victim", SIGTERM_HANDLER, terminationGracePeriodSeconds=5))
    wait_until(lambda: started_and_printed(core, namespace, "victim", "ready"), what="the pod to start")

    kubelet.evict(namespace, "victim")

    result = finished(core, namespace, "victim")
    assert result["status"]["reason"] == "Evicted"
    assert result["status"]["phase"] == "Failed"
    assert result["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 7
    assert any(c["type"] == "DisruptionTarget" for c in result["status"]["conditions"])


def test_kubectl_logs_prints_and_follows_the_output(
    core: client.CoreV1Api, namespace: str, kubectl: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    code = """
        import time
        for step in range(5):
            print(f"step {step} loss {1.0 / (step + 1):.3f}", flush=True)
            time.sleep(0.3)
    """
    core.create_namespaced_pod(namespace, python_pod("talker", code))
    wait_until(lambda: started_and_printed(core, namespace, "talker", "step 0"), what="the first line")

    followed = kubectl("logs", "-f", "talker", "-n", namespace)
    printed = kubectl("logs", "talker", "-n", namespace)

    assert followed.returncode == 0, followed.stderr
    assert followed.stdout.splitlines() == [f"step {s} loss {1.0 / (s + 1):.3f}" for s in range(5)]
    assert printed.stdout == followed.stdout


def test_prometheus_file_sd_lists_annotated_running_pods(
    core: client.CoreV1Api, namespace: str, kubelet: Kubelet
) -> None:
    pod = python_pod("exporter", "import time; time.sleep(600)", metadata={
        "labels": {"finetune.dev/job-name": "demo", "other": "x"},
        "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9400"},
    })
    core.create_namespaced_pod(namespace, pod)

    def targets() -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = json.loads(kubelet.file_sd_path.read_text())
        return [g for g in groups if g["labels"]["namespace"] == namespace]

    found = wait_until(targets, what="a file_sd target")
    ip = pod_dict(core, namespace, "exporter")["status"]["podIP"]
    assert found == [{"targets": [f"{ip}:9400"],
                      "labels": {"namespace": namespace, "pod": "exporter", "finetune_dev_job_name": "demo"}}]
    core.delete_namespaced_pod("exporter", namespace, grace_period_seconds=0)
    wait_until(lambda: not targets(), what="the target to go")


def test_bind_to_exec_is_measured_for_every_pod(core: client.CoreV1Api, namespace: str, kubelet: Kubelet) -> None:
    """What the benchmarks read: one bind → exec time per pod, from the marker the sandbox touches before exec.
    (Not timed here: the real control plane on a shared 2-core machine varies too much for a bound.)"""
    before = len(kubelet.bind_to_start_seconds)
    for index in range(3):
        core.create_namespaced_pod(namespace, python_pod(f"quick-{index}", "pass"))
    for index in range(3):
        finished(core, namespace, f"quick-{index}")
    latencies = kubelet.bind_to_start_seconds[before:]
    print("bind → exec seconds:", [round(value, 3) for value in latencies])
    assert len(latencies) == 3 and all(0 < value < 60 for value in latencies)


def test_init_container_and_volume_kinds_are_materialised(core: client.CoreV1Api, namespace: str) -> None:
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "files"},
                                                  "data": {"a.txt": "alpha", "b.txt": "beta"}})
    init = {"name": "fetch", "image": "busybox", "command": ["python", "-c",
            "open('/work/fetched', 'w').write('from init')"],
            "volumeMounts": [{"name": "work", "mountPath": "/work"}]}
    code = """
        import os
        print(open("/work/fetched").read())
        print(open("/etc/app/only-b").read())
        print(open("/etc/podinfo/labels").read())
        print(sorted(os.listdir("/etc/app-dir")))
        try:
            open("/etc/app-dir/new", "w")
        except OSError as error:
            print("read-only:", error.errno)
        print("shm", os.statvfs("/dev/shm").f_bsize > 0)
    """
    pod = python_pod(
        "volumes", code,
        metadata={"labels": {"team": "ml"}},
        initContainers=[init],
        volumes=[
            {"name": "work", "emptyDir": {}},
            {"name": "cfg", "configMap": {"name": "files", "items": [{"key": "b.txt", "path": "only-b"}]}},
            {"name": "cfg-all", "configMap": {"name": "files"}},
            {"name": "info", "downwardAPI": {"items": [{"path": "labels",
                                                       "fieldRef": {"fieldPath": "metadata.labels"}}]}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
        ],
        container={"volumeMounts": [
            {"name": "work", "mountPath": "/work"},
            {"name": "cfg", "mountPath": "/etc/app/only-b", "subPath": "only-b"},
            {"name": "cfg-all", "mountPath": "/etc/app-dir"},
            {"name": "info", "mountPath": "/etc/podinfo"},
            {"name": "shm", "mountPath": "/dev/shm"},
        ]},
    )
    core.create_namespaced_pod(namespace, pod)

    result = finished(core, namespace, "volumes")
    output = logs(core, namespace, "volumes")

    assert result["status"]["phase"] == "Succeeded", output
    assert result["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert output.splitlines()[:4] == ["from init", "beta", 'team="ml"', "['a.txt', 'b.txt']"]
    assert "read-only: 30" in output
    assert "shm True" in output


def test_active_deadline_fails_a_running_pod(core: client.CoreV1Api, namespace: str) -> None:
    core.create_namespaced_pod(namespace, python_pod("slow", "import time; time.sleep(600)",
                                                     activeDeadlineSeconds=1, terminationGracePeriodSeconds=1))

    result = finished(core, namespace, "slow", timeout=15)

    assert result["status"]["phase"] == "Failed"
    assert result["status"]["reason"] == "DeadlineExceeded"


def test_without_unshare_pods_fail_with_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import localcluster.kubelet as kubelet_module

    monkeypatch.setattr(kubelet_module, "check_unshare", lambda: "unshare is not permitted here (test)")
    with ControlPlane(tmp_path / "control-plane") as plane, Kubelet(plane.url, plane.node_credentials("localnode"),
                                                                     tmp_path / "node"):
        core = client.CoreV1Api(config.new_client_from_config(str(plane.admin_kubeconfig)))
        namespace = new_namespace(core)
        core.create_namespaced_pod(namespace, python_pod("isolated", "print('should not run')"))

        result = finished(core, namespace, "isolated")

    assert result["status"]["phase"] == "Failed"
    assert "unshare is not permitted here (test)" in result["status"]["message"]
    waiting = result["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "CreateContainerError"

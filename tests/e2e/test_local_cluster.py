"""End to end on the local cluster: the real operator, kubelet-run torchrun pods, real training, SeaweedFS, kubectl."""

from __future__ import annotations

import functools
import json
import signal
import time
import urllib.request
from typing import Any

import pytest
from e2e_helpers import apply, make_job, read_json, s3_keys

from localcluster import pytest_plugin
from localcluster.cluster import LocalCluster

# Each probe here runs kubectl or reads S3: twice a second is often enough and keeps the training cores free.
wait_until = functools.partial(pytest_plugin.wait_until, interval=0.5)

pytestmark = pytest.mark.e2e

# Two CPU cores: one process per pod, so two pods fit the node at once.
SMALL = {"cpu": "1", "memory": "3Gi"}


def status(cluster: LocalCluster, name: str) -> dict[str, Any]:
    result: dict[str, Any] = cluster.get_job(name).get("status", {})
    return result


def checkpoint_steps(cluster: LocalCluster, name: str) -> list[int]:
    manifests = [k for k in s3_keys(cluster, f"{name}/checkpoints/") if k.endswith("/manifest.json")]
    return sorted(int(k.split("/")[2].removeprefix("step-")) for k in manifests)


def trainer_step(cluster: LocalCluster, pod_name: str) -> int | None:
    """finetune_step from the pod's rank-0 metrics endpoint, or None while it is not serving yet."""
    pods = [p for p in cluster.pods(pod_name.split("-a")[0]) if p["metadata"]["name"] == pod_name]
    ip = pods[0].get("status", {}).get("podIP") if pods else None
    if not ip:
        return None
    try:
        with urllib.request.urlopen(f"http://{ip}:9400/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    steps = [float(line.split()[-1]) for line in text.splitlines() if line.startswith("finetune_step{")]
    return int(steps[0]) if steps and steps[0] > 0 else None


def condition(job_status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in job_status.get("conditions", []) if c["type"] == kind), None)


def test_two_nodes_zero2_train_to_success(cluster: LocalCluster) -> None:
    name = "happy"
    job = make_job(
        name,
        distributed={"nodes": 2, "procsPerNode": 1, "deepspeed": {"zeroStage": 2}},
        resources=SMALL,
        training={"maxSteps": 40},
        checkpoint={"everySteps": 20, "keep": 2},
    )
    assert "created" in apply(cluster, job)

    running = cluster.wait_for_job(name, phases={"Running", "Succeeded"}, timeout=300)
    pods = sorted(p["metadata"]["name"] for p in cluster.pods(name))
    assert pods == ["happy-a0-n0", "happy-a0-n1"], running.get("status")

    done = cluster.wait_for_job(name, phases={"Succeeded"}, timeout=600)
    st = done["status"]
    assert st["progress"]["step"] == st["progress"]["totalSteps"] == 40
    assert st["progress"]["percent"] == pytest.approx(100.0)
    assert st["model"]["uri"] == f"s3://finetune-output/{name}/model/"
    assert st.get("restarts", 0) == 0
    assert st["metrics"]["loss"] > 0

    keys = s3_keys(cluster, f"{name}/")
    assert f"{name}/model/model.safetensors" in keys and f"{name}/model/config.json" in keys
    assert checkpoint_steps(cluster, name) == [20, 40]
    result = read_json(cluster, f"{name}/result.json")
    assert result["evalLossAfter"] < result["evalLossBefore"], result

    # kubectl works against the local cluster: get (printer columns), describe (events), logs, wait.
    table = cluster.kubectl("get", "ftj", name)
    assert "Succeeded" in table and "40/40" in table
    described = cluster.kubectl("describe", "ftj", name)
    assert "Succeeded" in described and "Events:" in described
    assert cluster.kubectl("wait", f"ftj/{name}", "--for=jsonpath={.status.phase}=Succeeded", "--timeout=5s")
    assert cluster.pod_log(f"{name}-a0-n0").strip()

    if cluster.prometheus is not None:
        # The pods are gone by now, so their series are stale: ask for the last value seen in the window.
        query = f'last_over_time(finetune_train_loss{{job_name="{name}", rank="0"}}[15m])'
        series = wait_until(
            lambda: cluster.prometheus and cluster.prometheus.query(query),
            timeout=30,
            what="the trainer's loss series in Prometheus",
        )
        assert float(series[0]["value"][1]) > 0


def test_killed_process_restarts_the_gang_and_resumes(cluster: LocalCluster) -> None:
    name = "crash"
    job = make_job(
        name,
        distributed={"nodes": 2, "procsPerNode": 1},
        resources=SMALL,
        training={"maxSteps": 200},
        checkpoint={"everySteps": 20, "keep": 2},
    )
    apply(cluster, job)
    wait_until(lambda: checkpoint_steps(cluster, name), timeout=400, what="a first complete checkpoint")
    saved = max(checkpoint_steps(cluster, name))
    cluster.kubelet.kill_container("default", f"{name}-a0-n1", signal.SIGKILL)  # type: ignore[union-attr]
    killed_at = time.monotonic()

    wait_until(
        lambda: status(cluster, name).get("phase") == "Restarting" or status(cluster, name).get("restarts"),
        timeout=60,
        what="the gang restart",
    )
    # The first step after the resume, read from the new rank-0 pod's own metrics endpoint.
    resumed_step = wait_until(
        lambda: (step := trainer_step(cluster, f"{name}-a1-n0")) is not None and step > saved and step,
        timeout=300,
        interval=0.2,
        what="training again after the restart",
    )
    seconds_to_resume = time.monotonic() - killed_at
    # The new attempt started from a checkpoint at or after the one seen before the kill, not from scratch.
    assert saved < resumed_step <= saved + 2 * 20
    print(f"\nkill -> first step after resume: {seconds_to_resume:.1f} s (checkpoint at step {saved})")

    done = cluster.wait_for_job(name, phases={"Succeeded"}, timeout=600)["status"]
    assert done["restarts"] == 1
    assert done["progress"]["step"] == 200
    assert read_json(cluster, f"{name}/result.json")["steps"] == 200
    names = {p["metadata"]["name"] for p in cluster.pods(name)}
    assert not any(n.startswith(f"{name}-a0-") for n in names) or names == set(), names


def test_deleted_pod_writes_an_emergency_checkpoint_and_loses_no_step(cluster: LocalCluster) -> None:
    name = "preempt"
    total = 400
    # No periodic checkpoint: the only checkpoint before the end is the emergency one.
    job = make_job(
        name,
        resources=SMALL,
        training={"maxSteps": total},
        checkpoint={"everySteps": 10_000, "keep": 3},
        backoffLimit=0,
    )
    apply(cluster, job)
    wait_until(
        lambda: status(cluster, name).get("progress", {}).get("step", 0) >= 5,
        timeout=400,
        what="training to run",
        interval=0.25,
    )
    before = status(cluster, name)["progress"]["step"]
    cluster.kubectl("delete", "pod", f"{name}-a0-n0", "--wait=false")

    emergency = wait_until(
        lambda: [s for s in checkpoint_steps(cluster, name) if s < total], timeout=120, what="the emergency checkpoint"
    )
    assert emergency[0] >= before
    done = cluster.wait_for_job(name, phases={"Succeeded"}, timeout=600)["status"]
    # backoffLimit 0: had the preemption counted, the job would have failed.
    assert done["restarts"] == 1
    assert done.get("countedFailures", 0) == 0
    assert done["progress"]["step"] == total
    # No step lost: the second attempt started exactly where the first one stopped.
    assert read_json(cluster, f"{name}/result.json")["resumedFromStep"] == emergency[0]


def test_a_job_resized_while_suspended_resumes_from_its_checkpoint(cluster: LocalCluster) -> None:
    name = "resize"
    total = 200
    job = make_job(
        name,
        distributed={"nodes": 2, "procsPerNode": 1, "deepspeed": {"zeroStage": 2}},
        resources=SMALL,
        training={"maxSteps": total},
        checkpoint={"everySteps": 20, "keep": 2},
    )
    apply(cluster, job)
    wait_until(lambda: checkpoint_steps(cluster, name), timeout=400, what="a first complete checkpoint")
    # Resizing a running job is refused; suspended, it may take another shape (the pods write an emergency
    # checkpoint on their way out).
    refused = cluster.kubectl(
        "patch", "ftj", name, "--type=merge", "-p", '{"spec":{"distributed":{"nodes":1}}}', check=False
    )
    assert "distributed can only change while the job is suspended" in refused
    cluster.kubectl("patch", "ftj", name, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    cluster.wait_for_job(name, phases={"Suspended"}, timeout=120)
    wait_until(lambda: not cluster.pods(name), timeout=120, what="the pods to stop")
    saved = max(checkpoint_steps(cluster, name))
    cluster.kubectl("patch", "ftj", name, "--type=merge", "-p", '{"spec":{"distributed":{"nodes":1}}}')
    cluster.kubectl("patch", "ftj", name, "--type=merge", "-p", '{"spec":{"suspend":false}}')

    done = cluster.wait_for_job(name, phases={"Succeeded"}, timeout=600)["status"]

    assert done["progress"]["step"] == total
    result = read_json(cluster, f"{name}/result.json")
    assert (result["resumedFromStep"], result["worldSize"], result["steps"]) == (saved, 1, total)
    assert 0 < saved < total


def test_operator_restarted_mid_job_continues_without_duplicate_pods(cluster: LocalCluster) -> None:
    name = "opcrash"
    # Enough steps that the job is surely mid-training when the operator dies.
    apply(cluster, make_job(name, resources=SMALL, training={"maxSteps": 120}))
    cluster.wait_for_job(name, phases={"Running"}, timeout=300)
    cluster.stop_operator(kill=True)
    # The operator died while the job ran: the kubelet still reports the pod running, and training goes on
    # without the operator (rank 0's step advances).
    pod = f"{name}-a0-n0"
    assert [p["status"]["phase"] for p in cluster.pods(name)] == ["Running"]
    assert status(cluster, name)["phase"] == "Running"
    first = wait_until(lambda: trainer_step(cluster, pod), timeout=300, what="rank 0's metrics", interval=0.25)
    wait_until(lambda: (trainer_step(cluster, pod) or 0) > first, timeout=300, what="a step without the operator",
               interval=0.25)
    cluster.start_operator()
    done = cluster.wait_for_job(name, phases={"Succeeded"}, timeout=600)["status"]
    assert done.get("restarts", 0) == 0
    assert [p["metadata"]["name"] for p in cluster.pods(name)] in ([f"{name}-a0-n0"], [])


def test_job_survives_storage_outage(cluster: LocalCluster) -> None:
    name = "s3outage"
    apply(cluster, make_job(name, resources=SMALL, training={"maxSteps": 40}, checkpoint={"everySteps": 10}))
    wait_until(
        lambda: status(cluster, name).get("progress", {}).get("step", 0) >= 3,
        timeout=400,
        what="training to run",
        interval=0.25,
    )
    cluster.s3.stop()
    try:
        time.sleep(10)
    finally:
        cluster.s3.start()
    done = cluster.wait_for_job(name, phases={"Succeeded"}, timeout=600)["status"]
    assert done["progress"]["step"] == 40
    assert f"{name}/model/model.safetensors" in s3_keys(cluster, f"{name}/model/")
    assert checkpoint_steps(cluster, name)[-1] == 40


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"training": {"learningRate": 0}}, "spec.training.learningRate", "greater than 0"),
        ({"training": {"epochs": 1}}, "spec.training", "exactly one of training.epochs and training.maxSteps"),
        ({"distributed": {"deepspeed": {"zeroStage": 5}}}, "spec.distributed.deepspeed.zeroStage", "3"),
        ({"env": [{"name": "PET_NODE_RANK", "value": "3"}]}, "spec.env[0].name", "reserved"),
        ({"model": {"uri": "https://huggingface.co/gpt2"}}, "spec.model.uri", "should match"),
    ],
)
def test_bad_job_is_rejected_by_kubectl(
    cluster: LocalCluster, overrides: dict[str, Any], field: str, words: str
) -> None:
    job = make_job("rejected", **overrides)
    out = cluster.kubectl("apply", "-f", "-", input=json.dumps(job), check=False)
    assert "is invalid" in out and field in out and words in out, out
    assert "rejected" not in cluster.kubectl("get", "ftj", "-o", "name")


def test_spec_only_the_operator_can_check_fails_with_invalid_spec(cluster: LocalCluster) -> None:
    name = "overlap"
    # Output inside the model's prefix: the schema accepts each URI alone; the operator rejects the pair.
    apply(cluster, make_job(name, output={"uri": "s3://models/tiny-gpt2/finetuned"}))
    failed = cluster.wait_for_job(name, phases={"Failed"}, timeout=60)["status"]
    invalid = condition(failed, "InvalidSpec")
    assert invalid is not None and invalid["status"] == "True", failed
    assert "spec.output.uri" in invalid["message"]
    assert cluster.pods(name) == []


def test_more_gpus_than_the_node_has_waits_then_fails(cluster: LocalCluster) -> None:
    name = "toobig"
    apply(
        cluster,
        make_job(
            name,
            resources={"gpus": 4, "cpu": "1", "memory": "1Gi"},
            distributed={"procsPerNode": 4},
            capacityTimeoutSeconds=8,
        ),
    )
    waiting = wait_until(
        lambda: condition(status(cluster, name), "WaitingForCapacity"), timeout=60, what="WaitingForCapacity"
    )
    assert waiting["status"] == "True" and "Insufficient nvidia.com/gpu" in waiting["message"]
    failed = cluster.wait_for_job(name, phases={"Failed"}, timeout=60)["status"]
    assert condition(failed, "Failed")["reason"] == "CapacityTimeout"  # type: ignore[index]
    assert cluster.pods(name) == [] or all(p["status"].get("phase") == "Pending" for p in cluster.pods(name))


def test_deleting_a_job_removes_its_children(cluster: LocalCluster) -> None:
    name = "deleted"
    apply(cluster, make_job(name, resources=SMALL, training={"maxSteps": 1000}))
    wait_until(lambda: cluster.pods(name), timeout=60, what="pods")
    cluster.kubectl("delete", "ftj", name, "--wait=true", timeout=120)
    # The garbage collector removes the children after the job is gone, as in any cluster.
    wait_until(lambda: cluster.pods(name) == [], timeout=120, what="pods gone")
    wait_until(lambda: name not in cluster.kubectl("get", "configmaps,services", "-o", "name"), timeout=60,
               what="the Service and ConfigMap gone")


def test_the_cluster_is_a_real_kubernetes_and_the_operator_has_only_the_charts_rights(cluster: LocalCluster) -> None:
    version = json.loads(cluster.kubectl("version", "-o", "json"))
    assert version["serverVersion"]["gitVersion"] == cluster.control_plane.version  # type: ignore[union-attr]
    assert version["serverVersion"]["gitVersion"].startswith("v1.")
    assert cluster.kubectl("get", "--raw", "/readyz").strip() == "ok"
    node = cluster.get_json("node", "localnode")
    assert next(c for c in node["status"]["conditions"] if c["type"] == "Ready")["status"] == "True"

    def can_i(*args: str) -> str:
        return cluster.kubectl("auth", "can-i", "--as", cluster.operator_identity, *args, check=False).strip()

    # What the chart grants in the jobs' namespace, and nothing more.
    assert can_i("create", "pods", "-n", "default") == "yes"
    assert can_i("patch", "finetunejobs.finetune.dev", "--subresource=status", "-n", "default") == "yes"
    assert can_i("update", "finetunejobs.finetune.dev", "--subresource=finalizers", "-n", "default") == "yes"
    assert can_i("get", "secrets", "-n", "default") == "no"
    assert can_i("create", "pods", "-n", "kube-system") == "no"
    assert can_i("update", "finetunejobs.finetune.dev", "-n", "default") == "no"

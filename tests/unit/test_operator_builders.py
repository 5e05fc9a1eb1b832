"""The child objects of a FineTuneJob: exact env, volumes, security context, resources, names and owners."""

from __future__ import annotations

import json
from typing import Any

import pytest
from operator_factories import make_job

from finetune_operator.builders import (
    build_config_map,
    build_event,
    build_gang,
    build_service,
    build_worker_env,
    build_worker_pod,
    checkpoint_uri,
    model_uri,
    omp_threads,
)
from finetune_operator.spec import FineTuneJob, parse_job

OWNER = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "job", "uid": "uid-1",
         "controller": True, "blockOwnerDeletion": True}
APP_LABELS = {"app.kubernetes.io/name": "finetune-trainer", "app.kubernetes.io/instance": "job",
              "app.kubernetes.io/managed-by": "finetune-operator", "app.kubernetes.io/part-of": "finetunejob"}


def job_of(paths: dict[str, Any] | None = None, attempt: int = 0, **kw: Any) -> FineTuneJob:
    body = make_job(paths, **kw)
    body["status"] = {"attempt": attempt}
    return parse_job(body)


def pod_of(rank: int = 0, **kw: Any) -> dict[str, Any]:
    return build_worker_pod(job_of(**kw), rank, "ghcr.io/finetunejob/trainer:0.1.0")


def test_headless_service() -> None:
    assert build_service(job_of({"spec.distributed.masterPort": 23456})) == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "job",
            "namespace": "ns",
            "labels": {"finetune.dev/job-name": "job", **APP_LABELS, "app.kubernetes.io/component": "rendezvous"},
            "ownerReferences": [OWNER],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"finetune.dev/job-name": "job"},
            "ports": [{"name": "rendezvous", "port": 23456, "targetPort": 23456, "protocol": "TCP"}],
        },
    }


def test_config_map_holds_the_rendered_config_of_the_attempt() -> None:
    config_map = build_config_map(job_of(attempt=2))
    assert config_map["metadata"]["name"] == "job-config"
    assert config_map["metadata"]["ownerReferences"] == [OWNER]
    assert list(config_map["data"]) == ["config.json"]
    config = json.loads(config_map["data"]["config.json"])
    assert config["job"] == {"name": "job", "namespace": "ns", "attempt": 2}


def test_env_is_exactly_the_pet_variables_config_path_attempt_credentials_and_user_env() -> None:
    job = job_of({
        "spec.distributed": {"nodes": 4, "procsPerNode": 8, "masterPort": 29400},
        "spec.resources": {"gpus": 8, "cpu": "96"},
        "spec.storage.credentialsSecret": "s3-creds",
        "spec.env": [{"name": "NCCL_DEBUG", "value": "WARN"},
                     {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
    }, attempt=2)
    assert build_worker_env(job, 3) == [
        {"name": "PET_NNODES", "value": "4"},
        {"name": "PET_NODE_RANK", "value": "3"},
        {"name": "PET_NPROC_PER_NODE", "value": "8"},
        {"name": "PET_MASTER_ADDR", "value": "job-n0.job"},
        {"name": "PET_MASTER_PORT", "value": "29400"},
        {"name": "OMP_NUM_THREADS", "value": "12"},
        {"name": "FINETUNE_CONFIG", "value": "/etc/finetune/config.json"},
        {"name": "FINETUNE_ATTEMPT", "value": "2"},
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID"}}},
        {"name": "AWS_SECRET_ACCESS_KEY",
         "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}}},
        {"name": "NCCL_DEBUG", "value": "WARN"},
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
    ]


def test_env_without_credentials_secret_has_no_aws_variables() -> None:
    assert [e["name"] for e in build_worker_env(job_of(), 0)] == [
        "PET_NNODES", "PET_NODE_RANK", "PET_NPROC_PER_NODE", "PET_MASTER_ADDR", "PET_MASTER_PORT",
        "OMP_NUM_THREADS", "FINETUNE_CONFIG", "FINETUNE_ATTEMPT",
    ]


@pytest.mark.parametrize(
    ("resources", "procs", "threads"),
    [({}, 1, 1), ({"cpu": "8"}, 1, 8), ({"cpu": "8"}, 3, 2), ({"cpu": "500m"}, 1, 1), ({"cpu": "7500m"}, 2, 3)],
)
def test_omp_threads_is_cpu_per_process_at_least_one(resources: dict[str, Any], procs: int, threads: int) -> None:
    assert omp_threads(job_of({"spec.resources": resources, "spec.distributed.procsPerNode": procs})) == threads


def test_worker_pod_minimal() -> None:
    assert pod_of(1, attempt=2) == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "job-a2-n1",
            "namespace": "ns",
            "labels": {"finetune.dev/job-name": "job", **APP_LABELS, "app.kubernetes.io/component": "trainer",
                       "finetune.dev/node-rank": "1", "finetune.dev/attempt": "2"},
            "ownerReferences": [OWNER],
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "9400",
                            "prometheus.io/path": "/metrics"},
        },
        "spec": {
            "hostname": "job-n1",
            "subdomain": "job",
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 150,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "trainer",
                "image": "ghcr.io/finetunejob/trainer:0.1.0",
                "imagePullPolicy": "IfNotPresent",
                "command": ["python", "-m", "finetune_trainer.launch"],
                "env": build_worker_env(job_of(attempt=2), 1),
                "ports": [{"name": "rendezvous", "containerPort": 29500, "protocol": "TCP"},
                          {"name": "metrics", "containerPort": 9400, "protocol": "TCP"}],
                "resources": {},
                "volumeMounts": [
                    {"name": "config", "mountPath": "/etc/finetune", "readOnly": True},
                    {"name": "scratch", "mountPath": "/scratch"},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                ],
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                    "runAsNonRoot": True, "runAsUser": 1000,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "terminationMessagePolicy": "FallbackToLogsOnError",
            }],
            "volumes": [
                {"name": "config", "configMap": {"name": "job-config"}},
                {"name": "scratch", "emptyDir": {}},
                {"name": "dshm", "emptyDir": {"medium": "Memory"}},
            ],
        },
    }


def test_worker_pod_with_everything_set() -> None:
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100"]}]}]}}}
    pod = pod_of(0, **{
        "spec.image": "registry.local/trainer:dev",
        "spec.imagePullPolicy": "Always",
        "spec.imagePullSecrets": [{"name": "regcred"}],
        "spec.resources": {"gpus": 8, "cpu": "90", "memory": "900Gi", "ephemeralStorage": "500Gi",
                           "sharedMemory": "64Gi"},
        "spec.distributed.procsPerNode": 8,
        "spec.nodeSelector": {"pool": "gpu"},
        "spec.tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "spec.affinity": affinity,
        "spec.priorityClassName": "training-high",
        "spec.schedulerName": "volcano",
        "spec.serviceAccountName": "trainer",
        "spec.checkpoint.gracePeriodSeconds": 110,
        "spec.metrics.port": 9500,
    })
    spec = pod["spec"]
    container = spec["containers"][0]
    assert (container["image"], container["imagePullPolicy"]) == ("registry.local/trainer:dev", "Always")
    amounts = {"cpu": "90", "memory": "900Gi", "ephemeral-storage": "500Gi", "nvidia.com/gpu": "8"}
    assert container["resources"] == {"requests": amounts, "limits": amounts}
    assert spec["volumes"] == [
        {"name": "config", "configMap": {"name": "job-config"}},
        {"name": "scratch", "emptyDir": {"sizeLimit": "500Gi"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}},
    ]
    assert spec["nodeSelector"] == {"pool": "gpu"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["affinity"] == affinity
    assert (spec["priorityClassName"], spec["schedulerName"], spec["serviceAccountName"]) == (
        "training-high", "volcano", "trainer")
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert spec["terminationGracePeriodSeconds"] == 140
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9500"
    assert container["ports"][1] == {"name": "metrics", "containerPort": 9500, "protocol": "TCP"}


def test_gang_is_service_config_map_then_pods_by_rank() -> None:
    gang = build_gang(job_of({"spec.distributed.nodes": 3}, attempt=1), "img")
    assert [(o["kind"], o["metadata"]["name"]) for o in gang] == [
        ("Service", "job"), ("ConfigMap", "job-config"),
        ("Pod", "job-a1-n0"), ("Pod", "job-a1-n1"), ("Pod", "job-a1-n2"),
    ]


def test_builders_do_not_share_mutable_state_with_the_spec() -> None:
    job = job_of({"spec.nodeSelector": {"pool": "gpu"}, "spec.env": [{"name": "A", "value": "1"}]})
    first = build_worker_pod(job, 0, "img")
    first["spec"]["nodeSelector"]["pool"] = "changed"
    first["spec"]["containers"][0]["env"][-1]["value"] = "changed"
    second = build_worker_pod(job, 0, "img")
    assert second["spec"]["nodeSelector"] == {"pool": "gpu"}
    assert second["spec"]["containers"][0]["env"][-1] == {"name": "A", "value": "1"}


def test_event_about_the_job() -> None:
    from operator_factories import at

    job = job_of()
    event = build_event(job.meta, "Warning", "PodFailed", "x" * 2000, at(5))
    assert event["involvedObject"] == {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "job",
                                       "namespace": "ns", "uid": "uid-1"}
    assert (event["type"], event["reason"], len(event["message"])) == ("Warning", "PodFailed", 1024)
    assert event["metadata"]["name"].startswith("job.")
    assert event == build_event(job.meta, "Warning", "PodFailed", "x" * 2000, at(5))


@pytest.mark.parametrize("output", ["s3://out/job", "s3://out/job/"])
def test_model_and_checkpoint_uris_join_the_output_prefix_with_one_slash(output: str) -> None:
    assert model_uri(output) == "s3://out/job/model/"
    assert checkpoint_uri(output, 120) == "s3://out/job/checkpoints/step-00000120/"

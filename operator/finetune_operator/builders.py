"""Pure builders of a FineTuneJob's children (headless Service, ConfigMap, one Pod per node, the Kueue Workload, the
gang scheduler's PodGroup) as plain dicts."""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from typing import Any

from finetune_operator import constants as c
from finetune_operator.gang import (
    TOPOLOGY_KUEUE,
    gang_pod_metadata,
    gang_scheduler_name,
    kueue_topology_annotations,
    kueue_topology_pod_fields,
    kueue_topology_request,
    merge_pod_affinity,
    pod_group_api_version,
    pod_group_name,
    pod_group_spec,
    topology_pod_affinity,
    topology_route,
)
from finetune_operator.render import render_trainer_config
from finetune_operator.spec import FineTuneJob, JobMeta, format_time
from finetune_operator.workload import Placement

# ---- builders ------------------------------------------------------------------------------------------


def build_service(job: FineTuneJob) -> dict[str, Any]:
    """Headless Service ``<job>``: gives every pod the DNS name ``<job>-n<rank>.<job>`` for the rendezvous."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, service_name(job.name), _base_labels(job, c.COMPONENT_RENDEZVOUS)),
        "spec": {
            "clusterIP": "None",
            # Ranks must resolve each other before any of them is Ready, or the rendezvous never starts.
            "publishNotReadyAddresses": True,
            "selector": {c.LABEL_JOB_NAME: job.name},
            "ports": [{
                "name": c.PORT_NAME_RENDEZVOUS,
                "port": job.spec.distributed.master_port,
                "targetPort": job.spec.distributed.master_port,
                "protocol": "TCP",
            }],
        },
    }


def build_config_map(job: FineTuneJob) -> dict[str, Any]:
    """ConfigMap ``<job>-config`` holding the trainer's ``config.json`` for the current attempt."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, config_map_name(job.name), _base_labels(job, c.COMPONENT_CONFIG)),
        "data": {c.CONFIG_KEY: json.dumps(render_trainer_config(job), indent=2, sort_keys=True)},
    }


def build_worker_env(job: FineTuneJob, rank: int) -> list[dict[str, Any]]:
    """The container's env: torchrun's PET_* for the gang shape, the config path and the attempt, storage
    credentials, the user's."""
    spec = job.spec
    env: list[dict[str, Any]] = [
        {"name": c.ENV_NNODES, "value": str(spec.distributed.nodes)},
        {"name": c.ENV_NODE_RANK, "value": str(rank)},
        {"name": c.ENV_NPROC_PER_NODE, "value": str(spec.distributed.procs_per_node)},
        {"name": c.ENV_MASTER_ADDR, "value": master_address(job.name)},
        {"name": c.ENV_MASTER_PORT, "value": str(spec.distributed.master_port)},
        {"name": c.ENV_OMP_NUM_THREADS, "value": str(omp_threads(job))},
        {"name": c.ENV_CONFIG, "value": c.CONFIG_PATH},
        {"name": c.ENV_ATTEMPT, "value": str(job.attempt)},
    ]
    secret = spec.storage.credentials_secret
    if secret:
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
            for key in (c.ENV_AWS_ACCESS_KEY_ID, c.ENV_AWS_SECRET_ACCESS_KEY)
        ]
    env += build_tracking_env(job)
    env += [dict(item) for item in spec.env]
    return env


def build_tracking_env(job: FineTuneJob) -> list[dict[str, Any]]:
    """The tracking server's credentials from spec.tracking.mlflow.credentialsSecret, each key optional (basic auth
    or a token); the Secret's values never pass through the operator."""
    mlflow = job.spec.tracking.mlflow
    if mlflow is None or not mlflow.credentials_secret:
        return []
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": mlflow.credentials_secret, "key": key, "optional": True}}}
        for key in c.ENV_MLFLOW_CREDENTIALS
    ]


def build_worker_pod(
    job: FineTuneJob, rank: int, default_image: str, placement: Placement | None = None
) -> dict[str, Any]:
    """Pod ``<job>-a<attempt>-n<rank>``: one torchrun per node, restartPolicy Never (the gang restarts as one); with
    Kueue, the admitted flavors' node labels and tolerations (``placement``) join the job's own."""
    spec = job.spec
    gang_labels, gang_annotations = gang_pod_metadata(job)
    topology_labels, topology_annotations = kueue_topology_pod_fields(job, workload_name(job.name))
    labels = {
        **_base_labels(job, c.COMPONENT_TRAINER),
        c.LABEL_NODE_RANK: str(rank),
        c.LABEL_ATTEMPT: str(job.attempt),
        **gang_labels,
        **topology_labels,
    }
    metadata = _metadata(job, pod_name(job.name, job.attempt, rank), labels)
    metadata["annotations"] = {
        c.ANNOTATION_SCRAPE: "true",
        c.ANNOTATION_PORT: str(spec.metrics.port),
        c.ANNOTATION_PATH: c.METRICS_PATH,
        **gang_annotations,
        **topology_annotations,
    }
    container: dict[str, Any] = {
        "name": c.CONTAINER_NAME,
        "image": spec.image or default_image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": list(c.TRAINER_COMMAND),
        "env": build_worker_env(job, rank),
        "ports": [
            {"name": c.PORT_NAME_RENDEZVOUS, "containerPort": spec.distributed.master_port, "protocol": "TCP"},
            {"name": c.PORT_NAME_METRICS, "containerPort": spec.metrics.port, "protocol": "TCP"},
        ],
        "resources": build_resources(job),
        "volumeMounts": [
            {"name": c.VOLUME_CONFIG, "mountPath": c.CONFIG_DIR, "readOnly": True},
            {"name": c.VOLUME_SCRATCH, "mountPath": c.SCRATCH_DIR},
            {"name": c.VOLUME_SHM, "mountPath": c.SHM_DIR},
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "runAsUser": c.RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # A trainer killed before writing its message still explains itself with its last log lines.
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "hostname": pod_hostname(job.name, rank),
        "subdomain": service_name(job.name),
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": spec.checkpoint.grace_period_seconds + c.TERMINATION_GRACE_MARGIN_SECONDS,
        # The trainer needs no API access, and service links would add env the trainer does not expect.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": c.RUN_AS_USER,
            "runAsGroup": c.RUN_AS_USER,
            "fsGroup": c.RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": build_volumes(job),
    }
    pod_spec.update(_placement_fields(job, placement))
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": name} for name in spec.image_pull_secrets]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def _placement_fields(job: FineTuneJob, placement: Placement | None) -> dict[str, Any]:
    """Where and by whom the pod is scheduled: node selector and tolerations (the job's and Kueue's flavor's),
    affinity (the user's, with the topology's pod affinity), priority, scheduler, and Kueue's topology gate."""
    spec = job.spec
    fields: dict[str, Any] = {}
    node_selector = {**spec.node_selector, **(placement.node_labels if placement else {})}
    if node_selector:
        fields["nodeSelector"] = node_selector
    tolerations = [dict(t) for t in spec.tolerations]
    tolerations += [dict(t) for t in (placement.tolerations if placement else ()) if dict(t) not in tolerations]
    if tolerations:
        fields["tolerations"] = tolerations
    own = json.loads(json.dumps(spec.affinity)) if spec.affinity else None
    affinity = merge_pod_affinity(own, topology_pod_affinity(job))
    if affinity:
        fields["affinity"] = affinity
    if spec.priority_class_name:
        fields["priorityClassName"] = spec.priority_class_name
    scheduler = gang_scheduler_name(spec)
    if scheduler:
        fields["schedulerName"] = scheduler
    if topology_route(spec) == TOPOLOGY_KUEUE:
        # Kueue's topology ungater sets the nodeSelector of the pod's assigned domain, then lifts the gate.
        fields["schedulingGates"] = [{"name": c.KUEUE_TOPOLOGY_GATE}]
    return fields


def build_pod_group(job: FineTuneJob) -> dict[str, Any] | None:
    """PodGroup ``<job>-a<attempt>`` of the job's gang scheduler (None without spec.gang): minMember pods, and the
    resources they request together, before any of them is bound."""
    api_version = pod_group_api_version(job.spec)
    if api_version is None:
        return None
    labels = {**_base_labels(job, c.COMPONENT_TRAINER), c.LABEL_ATTEMPT: str(job.attempt)}
    requests = build_resources(job).get("requests") or {}
    return {
        "apiVersion": api_version,
        "kind": c.POD_GROUP_KIND,
        "metadata": _metadata(job, pod_group_name(job.name, job.attempt), labels),
        "spec": pod_group_spec(job, requests),
    }


def build_workload(job: FineTuneJob, default_image: str, priority: int | None = None) -> dict[str, Any]:
    """Kueue Workload ``finetunejob-<job>``: one pod set of ``distributed.nodes`` pods shaped like the workers, so
    Kueue admits (and preempts) the whole gang as one unit; ``priority`` is the WorkloadPriorityClass's value."""
    template = build_worker_pod(job, 0, default_image)
    # The pods' own names and the gate Kueue's topology ungater lifts pod by pod are not the pod set's.
    pod_spec = {key: value for key, value in template["spec"].items()
                if key not in ("hostname", "subdomain", "schedulingGates")}
    template_metadata: dict[str, Any] = {"labels": _base_labels(job, c.COMPONENT_TRAINER)}
    annotations = kueue_topology_annotations(job.spec)
    if annotations:
        template_metadata["annotations"] = annotations
    pod_set: dict[str, Any] = {
        "name": c.KUEUE_POD_SET,
        "count": job.spec.distributed.nodes,
        "template": {"metadata": template_metadata, "spec": pod_spec},
    }
    topology_request = kueue_topology_request(job.spec)
    if topology_request is not None:
        pod_set["topologyRequest"] = topology_request
    spec: dict[str, Any] = {"queueName": job.spec.queue_name, "podSets": [pod_set]}
    if job.spec.workload_priority_class is not None:
        spec["priorityClassRef"] = {"group": c.KUEUE_GROUP, "kind": c.KUEUE_PRIORITY_CLASS_KIND,
                                    "name": job.spec.workload_priority_class}
        spec["priority"] = priority or 0
    return {
        "apiVersion": c.KUEUE_API_VERSION,
        "kind": "Workload",
        "metadata": _metadata(job, workload_name(job.name), _base_labels(job, c.COMPONENT_TRAINER)),
        "spec": spec,
    }


def build_resources(job: FineTuneJob) -> dict[str, Any]:
    """Requests equal to limits (Guaranteed QoS when cpu and memory are set), GPUs included."""
    r = job.spec.resources
    amounts: dict[str, str] = {}
    if r.cpu is not None:
        amounts["cpu"] = r.cpu
    if r.memory is not None:
        amounts["memory"] = r.memory
    if r.ephemeral_storage is not None:
        amounts["ephemeral-storage"] = r.ephemeral_storage
    if r.gpus > 0:
        amounts[c.GPU_RESOURCE] = str(r.gpus)
    if not amounts:
        return {}
    return {"requests": dict(amounts), "limits": dict(amounts)}


def build_volumes(job: FineTuneJob) -> list[dict[str, Any]]:
    r = job.spec.resources
    scratch: dict[str, Any] = {}
    if r.ephemeral_storage is not None:
        scratch["sizeLimit"] = r.ephemeral_storage
    shm: dict[str, Any] = {"medium": "Memory"}
    if r.shared_memory is not None:
        shm["sizeLimit"] = r.shared_memory
    return [
        {"name": c.VOLUME_CONFIG, "configMap": {"name": config_map_name(job.name)}},
        {"name": c.VOLUME_SCRATCH, "emptyDir": scratch},
        {"name": c.VOLUME_SHM, "emptyDir": shm},
    ]


def build_gang(job: FineTuneJob, default_image: str) -> list[dict[str, Any]]:
    """Every child of the current attempt, in creation order: Service, ConfigMap, then the pods by rank."""
    pods = [build_worker_pod(job, rank, default_image) for rank in range(job.spec.distributed.nodes)]
    return [build_service(job), build_config_map(job), *pods]


def build_event(
    job: JobMeta,
    event_type: str,
    reason: str,
    message: str,
    now: datetime.datetime,
    *,
    api_version: str = c.API_VERSION,
) -> dict[str, Any]:
    """A core/v1 Event about the job, as ``kubectl describe ftj`` shows it."""
    timestamp = format_time(now)
    # Deterministic, so the same decision replayed never posts two differently named Events.
    digest = hashlib.sha256(f"{job.uid}/{reason}/{message}/{now.timestamp()}".encode()).hexdigest()[:16]
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{job.name}.{digest}", "namespace": job.namespace},
        "involvedObject": {
            "apiVersion": api_version,
            "kind": c.KIND,
            "name": job.name,
            "namespace": job.namespace,
            "uid": job.uid,
        },
        "type": event_type,
        "reason": reason,
        # The API server rejects messages over 1 KiB.
        "message": message[:1024],
        "source": {"component": c.EVENT_COMPONENT},
        "reportingComponent": c.EVENT_COMPONENT,
        "reportingInstance": c.EVENT_COMPONENT,
        "firstTimestamp": timestamp,
        "lastTimestamp": timestamp,
        "count": 1,
    }


# ---- names and shared pieces ---------------------------------------------------------------------------


def service_name(job_name: str) -> str:
    return job_name


def config_map_name(job_name: str) -> str:
    return f"{job_name}-config"


def workload_name(job_name: str) -> str:
    return f"finetunejob-{job_name}"


def pod_name(job_name: str, attempt: int, rank: int) -> str:
    return f"{job_name}-a{attempt}-n{rank}"


def pod_hostname(job_name: str, rank: int) -> str:
    return f"{job_name}-n{rank}"


def model_uri(output_uri: str) -> str:
    """Where the trainer exports the final model."""
    return f"{output_uri.rstrip('/')}/{c.MODEL_DIR}"


def checkpoint_uri(output_uri: str, step: int) -> str:
    """Where the trainer uploads the checkpoint of a step."""
    return f"{output_uri.rstrip('/')}/{c.CHECKPOINT_DIR_FORMAT.format(step=step)}"


def master_address(job_name: str) -> str:
    """Node rank 0's DNS name through the headless Service (resolved in the pod's own namespace)."""
    return f"{pod_hostname(job_name, 0)}.{service_name(job_name)}"


def omp_threads(job: FineTuneJob) -> int:
    """CPU cores per training process, at least 1: more threads than cores only thrash."""
    cores = job.spec.resources.cpu_cores
    if cores is None:
        return 1
    return max(1, math.floor(cores / job.spec.distributed.procs_per_node))


def owner_reference(job: FineTuneJob) -> dict[str, Any]:
    return {
        "apiVersion": c.API_VERSION,
        "kind": c.KIND,
        "name": job.name,
        "uid": job.meta.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _base_labels(job: FineTuneJob, component: str) -> dict[str, str]:
    return {
        c.LABEL_JOB_NAME: job.name,
        c.LABEL_APP_NAME: c.APP_NAME,
        c.LABEL_APP_INSTANCE: job.name,
        c.LABEL_APP_COMPONENT: component,
        c.LABEL_APP_MANAGED_BY: c.MANAGED_BY,
        c.LABEL_APP_PART_OF: c.PART_OF,
    }


def _metadata(job: FineTuneJob, name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.namespace,
        "labels": labels,
        "ownerReferences": [owner_reference(job)],
    }

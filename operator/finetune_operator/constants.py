"""Every name the operator shares with Kubernetes, the trainer and the Helm chart, in one place."""

from __future__ import annotations

from typing import Final

# ---- the API ----------------------------------------------------------------------------------------------
GROUP: Final = "finetune.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "FineTuneJob"
PLURAL: Final = "finetunejobs"

# ---- labels on every child -------------------------------------------------------------------------------
LABEL_JOB_NAME: Final = "finetune.dev/job-name"
LABEL_NODE_RANK: Final = "finetune.dev/node-rank"
LABEL_ATTEMPT: Final = "finetune.dev/attempt"
LABEL_APP_NAME: Final = "app.kubernetes.io/name"
LABEL_APP_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_APP_COMPONENT: Final = "app.kubernetes.io/component"
LABEL_APP_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_APP_PART_OF: Final = "app.kubernetes.io/part-of"
APP_NAME: Final = "finetune-trainer"
MANAGED_BY: Final = "finetune-operator"
PART_OF: Final = "finetunejob"
COMPONENT_TRAINER: Final = "trainer"
COMPONENT_RENDEZVOUS: Final = "rendezvous"
COMPONENT_CONFIG: Final = "config"

# ---- annotations on pods (Prometheus' kubernetes_sd "annotation" convention) ---------------------------
ANNOTATION_SCRAPE: Final = "prometheus.io/scrape"
ANNOTATION_PORT: Final = "prometheus.io/port"
ANNOTATION_PATH: Final = "prometheus.io/path"
METRICS_PATH: Final = "/metrics"

# ---- the pod ---------------------------------------------------------------------------------------------
CONTAINER_NAME: Final = "trainer"
TRAINER_COMMAND: Final = ("python", "-m", "finetune_trainer.launch")
CONFIG_KEY: Final = "config.json"
CONFIG_DIR: Final = "/etc/finetune"
CONFIG_PATH: Final = f"{CONFIG_DIR}/{CONFIG_KEY}"
SCRATCH_DIR: Final = "/scratch"
CACHE_DIR: Final = f"{SCRATCH_DIR}/cache"
WORK_DIR: Final = f"{SCRATCH_DIR}/work"
SHM_DIR: Final = "/dev/shm"
VOLUME_CONFIG: Final = "config"
VOLUME_SCRATCH: Final = "scratch"
VOLUME_SHM: Final = "dshm"
PORT_NAME_RENDEZVOUS: Final = "rendezvous"
PORT_NAME_METRICS: Final = "metrics"
GPU_RESOURCE: Final = "nvidia.com/gpu"
RUN_AS_USER: Final = 1000
# The pod's SIGTERM budget is the checkpoint grace period plus this margin for process teardown.
TERMINATION_GRACE_MARGIN_SECONDS: Final = 30

# ---- environment the operator injects (torchrun reads PET_*; Kubeflow trainer's convention) --------------
ENV_NNODES: Final = "PET_NNODES"
ENV_NODE_RANK: Final = "PET_NODE_RANK"
ENV_NPROC_PER_NODE: Final = "PET_NPROC_PER_NODE"
ENV_MASTER_ADDR: Final = "PET_MASTER_ADDR"
ENV_MASTER_PORT: Final = "PET_MASTER_PORT"
ENV_OMP_NUM_THREADS: Final = "OMP_NUM_THREADS"
ENV_CONFIG: Final = "FINETUNE_CONFIG"
# The pod's attempt, for the trainer's launcher: it names the attempt's log in S3 (logs/attempt-<N>/node-<rank>.log).
ENV_ATTEMPT: Final = "FINETUNE_ATTEMPT"
ENV_AWS_ACCESS_KEY_ID: Final = "AWS_ACCESS_KEY_ID"
ENV_AWS_SECRET_ACCESS_KEY: Final = "AWS_SECRET_ACCESS_KEY"
# The keys of spec.tracking.mlflow.credentialsSecret, each optional: basic auth (username and password) or a token.
ENV_MLFLOW_CREDENTIALS: Final = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")

# User env with these names is rejected: the CRD's CEL rule lists the same (a unit test compares them).
RESERVED_ENV_NAMES: Final = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "LOCAL_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "OMP_NUM_THREADS",
    "FINETUNE_CONFIG",
    "FINETUNE_ATTEMPT",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)
RESERVED_ENV_PREFIXES: Final = ("PET_", "TORCHELASTIC_")

# ---- the trainer's exit codes (mirrored from finetune_trainer.exit_codes; the operator never imports it) --
EXIT_SUCCESS: Final = 0
EXIT_FAILURE: Final = 1
EXIT_INVALID: Final = 64
EXIT_PREEMPTED: Final = 75
# How rank 0's reason starts when the exported model failed its check (finetune_trainer.verify.FAILED_PREFIX).
MODEL_VERIFICATION_FAILED: Final = "model verification failed"

# ---- the trainer's metric names (finetune_trainer/metrics.py) --------------------------------------------
METRIC_STEP: Final = "finetune_step"
METRIC_TOTAL_STEPS: Final = "finetune_total_steps"
METRIC_EPOCH: Final = "finetune_epoch"
METRIC_TRAIN_LOSS: Final = "finetune_train_loss"
METRIC_EVAL_LOSS: Final = "finetune_eval_loss"
METRIC_BEST_EVAL_LOSS: Final = "finetune_best_eval_loss"
METRIC_LEARNING_RATE: Final = "finetune_learning_rate"
METRIC_TOKENS_PER_SECOND: Final = "finetune_tokens_per_second"
METRIC_LAST_CHECKPOINT_STEP: Final = "finetune_last_checkpoint_step"
# Not exported by the trainer yet; read when present so bestCheckpoint can name a step.
METRIC_BEST_CHECKPOINT_STEP: Final = "finetune_best_checkpoint_step"
# Data preparation on rank 0: the fraction done (-1 before it starts, 1 when the data is ready), rows, ETA.
METRIC_DATA_PREPARATION: Final = "finetune_data_preparation_progress"
METRIC_DATA_ROWS: Final = "finetune_data_prepared_rows"
METRIC_DATA_ETA: Final = "finetune_data_preparation_eta_seconds"
# spec.tracking: an info-style series (labels run_id, experiment_id; value 1), whether the latest call to the tracking
# server succeeded (1/0) and how many updates wait for it.
METRIC_TRACKING_RUN_INFO: Final = "finetune_tracking_run_info"
METRIC_TRACKING_UP: Final = "finetune_tracking_up"
METRIC_TRACKING_QUEUED: Final = "finetune_tracking_queued"
CHECKPOINT_DIR_FORMAT: Final = "checkpoints/step-{step:08d}/"
MODEL_DIR: Final = "model/"

# ---- phases, condition types and reasons -----------------------------------------------------------------
PHASE_PENDING: Final = "Pending"
PHASE_RUNNING: Final = "Running"
PHASE_RESTARTING: Final = "Restarting"
PHASE_SUSPENDED: Final = "Suspended"
# Waiting in a Kueue queue for admission: no pods until the job's Workload is admitted.
PHASE_QUEUED: Final = "Queued"
PHASE_SUCCEEDED: Final = "Succeeded"
PHASE_FAILED: Final = "Failed"
PHASES: Final = (PHASE_PENDING, PHASE_RUNNING, PHASE_RESTARTING, PHASE_SUSPENDED, PHASE_QUEUED, PHASE_SUCCEEDED,
                 PHASE_FAILED)
FINISHED_PHASES: Final = frozenset({PHASE_SUCCEEDED, PHASE_FAILED})
# Phases in which a job with nothing left to do waits for a change (a watch event), not for time.
SETTLED_PHASES: Final = frozenset({PHASE_SUCCEEDED, PHASE_FAILED, PHASE_SUSPENDED})

CONDITION_RUNNING: Final = "Running"
CONDITION_SUCCEEDED: Final = "Succeeded"
CONDITION_FAILED: Final = "Failed"
CONDITION_SUSPENDED: Final = "Suspended"
CONDITION_WAITING_FOR_CAPACITY: Final = "WaitingForCapacity"
CONDITION_INVALID_SPEC: Final = "InvalidSpec"
# True while the job's Kueue Workload waits for admission, with Kueue's reason and message.
CONDITION_QUEUED: Final = "Queued"
# True while the API server refuses to create the gang's pods (admission, validation, quota); its
# lastTransitionTime is when the refusals began.
CONDITION_POD_CREATE_FAILED: Final = "PodCreateFailed"
# Whether the exported model loaded back from storage in a fresh process (spec.evaluation.verifyExport).
CONDITION_MODEL_VERIFIED: Final = "ModelVerified"

# Why the job entered a phase (condition reasons and Event reasons).
REASON_CREATED: Final = "Created"
REASON_RESTARTED: Final = "Restarted"
REASON_RESUMED: Final = "Resumed"
REASON_ALL_PODS_RUNNING: Final = "AllPodsRunning"
# The Running condition's reason while rank 0 prepares (tokenizes) the dataset, before the first step.
REASON_PREPARING_DATA: Final = "PreparingData"
REASON_SUSPENDED: Final = "Suspended"
REASON_SUCCEEDED: Final = "Succeeded"
REASON_POD_FAILED: Final = "PodFailed"
REASON_PREEMPTED: Final = "Preempted"
REASON_DISRUPTED: Final = "PodDisrupted"
REASON_RETRYABLE_EXIT_CODE: Final = "RetryableExitCode"
REASON_POD_MISSING: Final = "PodMissing"
REASON_RESTART_BACKOFF: Final = "RestartBackoff"
REASON_INVALID_SPEC: Final = "InvalidSpec"
REASON_SPEC_VALID: Final = "SpecValid"
REASON_PERMANENT_ERROR: Final = "PermanentError"
REASON_BACKOFF_LIMIT_EXCEEDED: Final = "BackoffLimitExceeded"
REASON_DEADLINE_EXCEEDED: Final = "DeadlineExceeded"
REASON_CAPACITY_TIMEOUT: Final = "CapacityTimeout"
REASON_CAPACITY_AVAILABLE: Final = "CapacityAvailable"
REASON_CONTAINER_CREATING: Final = "ContainerCreating"
# A pod create the API refuses for good (the pod is invalid, or the namespace's Pod Security level forbids it) ...
REASON_POD_REJECTED: Final = "PodRejected"
# ... or for now (a missing PriorityClass or ServiceAccount, quota, RBAC): retried until startupDeadlineSeconds.
REASON_FAILED_CREATE: Final = "FailedCreate"
REASON_PODS_CREATED: Final = "PodsCreated"
# ModelVerified's reasons: the export loaded, finite, and generated; or which file failed and how.
REASON_MODEL_VERIFIED: Final = "Verified"
REASON_VERIFICATION_FAILED: Final = "VerificationFailed"
# Kueue: the Workload was created and waits for Kueue's first word, was admitted, or was evicted (Kueue's own
# eviction reason, e.g. Preempted, is in the message); the Workload's PriorityClass is missing.
REASON_WORKLOAD_CREATED: Final = "WorkloadCreated"
REASON_ADMITTED: Final = "Admitted"
REASON_EVICTED: Final = "Evicted"
REASON_PRIORITY_CLASS_NOT_FOUND: Final = "WorkloadPriorityClassNotFound"
REASON_WORKLOAD_API_UNAVAILABLE: Final = "WorkloadAPIUnavailable"
REASON_FINISHED: Final = "Finished"
# spec.tracking: the tracking server stopped answering rank 0 (training goes on), and answered again.
REASON_TRACKING_UNAVAILABLE: Final = "TrackingUnavailable"
REASON_TRACKING_AVAILABLE: Final = "TrackingAvailable"

# Scheduler and cluster-autoscaler event reasons that mean "no room for the pod yet".
CAPACITY_EVENT_REASONS: Final = frozenset({"FailedScheduling", "TriggeredScaleUp", "NotTriggerScaleUp"})
# A pod's PodScheduled=False reason with the same meaning when no event is visible.
UNSCHEDULABLE_REASON: Final = "Unschedulable"
# Container waiting reasons that mean a scheduled pod cannot start on its own.
STARTUP_FAILURE_REASONS: Final = frozenset({
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
})
# Pod status reasons of a pod killed by the platform, not by the trainer: restarts they cause are not counted.
DISRUPTION_POD_REASONS: Final = frozenset({
    "Evicted",
    "NodeLost",
    "Preempting",
    "Shutdown",
    "NodeShutdown",
    "Terminated",
    "DeadlineExceeded",
    "UnexpectedAdmissionError",
})
CONDITION_DISRUPTION_TARGET: Final = "DisruptionTarget"

EVENT_NORMAL: Final = "Normal"
EVENT_WARNING: Final = "Warning"
EVENT_COMPONENT: Final = "finetune-operator"

# ---- Kueue (kueue.x-k8s.io/v1beta2): the Workload the operator creates for a job with spec.queueName ---------
KUEUE_GROUP: Final = "kueue.x-k8s.io"
KUEUE_VERSION: Final = "v1beta2"
KUEUE_API_VERSION: Final = f"{KUEUE_GROUP}/{KUEUE_VERSION}"
KUEUE_WORKLOADS: Final = "workloads"
KUEUE_RESOURCE_FLAVORS: Final = "resourceflavors"
KUEUE_PRIORITY_CLASSES: Final = "workloadpriorityclasses"
KUEUE_PRIORITY_CLASS_KIND: Final = "WorkloadPriorityClass"
# The one pod set of a job's Workload: every node of the gang.
KUEUE_POD_SET: Final = "trainer"
# Workload condition types and the reasons Kueue's own job integrations write.
WORKLOAD_QUOTA_RESERVED: Final = "QuotaReserved"
WORKLOAD_ADMITTED: Final = "Admitted"
WORKLOAD_EVICTED: Final = "Evicted"
WORKLOAD_FINISHED: Final = "Finished"
WORKLOAD_REQUEUED: Final = "Requeued"
WORKLOAD_PENDING_REASON: Final = "Pending"
WORKLOAD_NO_RESERVATION_REASON: Final = "NoReservation"
# Evictions after which Kueue's integrations mark the Workload Requeued (it queues again at once).
WORKLOAD_REQUEUED_EVICTIONS: Final = frozenset({"Preempted", "NodeFailures"})

# Kueue's topology-aware scheduling: the pod set's level annotations (as on a Job's pod template), and what lets
# Kueue's topology ungater find the pods and give each the nodeSelector of its assigned domain.
KUEUE_REQUIRED_TOPOLOGY_ANNOTATION: Final = "kueue.x-k8s.io/podset-required-topology"
KUEUE_PREFERRED_TOPOLOGY_ANNOTATION: Final = "kueue.x-k8s.io/podset-preferred-topology"
KUEUE_WORKLOAD_ANNOTATION: Final = "kueue.x-k8s.io/workload"
KUEUE_POD_SET_LABEL: Final = "kueue.x-k8s.io/podset"
KUEUE_TOPOLOGY_GATE: Final = "kueue.x-k8s.io/topology"

# ---- gang scheduling: a PodGroup per attempt (spec.gang) -------------------------------------------------
GANG_VOLCANO: Final = "volcano"
GANG_COSCHEDULING: Final = "coscheduling"
VOLCANO_GROUP: Final = "scheduling.volcano.sh"
VOLCANO_API_VERSION: Final = f"{VOLCANO_GROUP}/v1beta1"
# Volcano's scheduler name, and the pod annotation naming the pod's PodGroup (KubeGroupNameAnnotationKey).
VOLCANO_SCHEDULER_NAME: Final = "volcano"
VOLCANO_GROUP_ANNOTATION: Final = "scheduling.k8s.io/group-name"
COSCHEDULING_GROUP: Final = "scheduling.x-k8s.io"
COSCHEDULING_API_VERSION: Final = f"{COSCHEDULING_GROUP}/v1alpha1"
# The second scheduler scheduler-plugins' manifests install, and the pod label naming the pod's PodGroup.
COSCHEDULING_SCHEDULER_NAME: Final = "scheduler-plugins-scheduler"
COSCHEDULING_GROUP_LABEL: Final = "scheduling.x-k8s.io/pod-group"
POD_GROUP_KIND: Final = "PodGroup"
POD_GROUPS: Final = "podgroups"
# spec.gang.scheduler → the PodGroup API it reads.
POD_GROUP_API_VERSIONS: Final = {GANG_VOLCANO: VOLCANO_API_VERSION, GANG_COSCHEDULING: COSCHEDULING_API_VERSION}
REASON_POD_GROUP_API_UNAVAILABLE: Final = "PodGroupAPIUnavailable"

# ---- operator settings (the Helm chart sets exactly these) -----------------------------------------------
ENV_NAMESPACES: Final = "FINETUNE_NAMESPACES"
ENV_TRAINER_IMAGE: Final = "FINETUNE_TRAINER_IMAGE"
ENV_METRICS_PORT: Final = "FINETUNE_METRICS_PORT"
ENV_HEALTH_PORT: Final = "FINETUNE_HEALTH_PORT"
ENV_PEERING: Final = "FINETUNE_PEERING"
ENV_RESYNC_SECONDS: Final = "FINETUNE_RESYNC_SECONDS"
ENV_LOG_LEVEL: Final = "FINETUNE_LOG_LEVEL"
ENV_BIND_ADDRESS: Final = "FINETUNE_BIND_ADDRESS"
ENV_PROGRESS_SECONDS: Final = "FINETUNE_PROGRESS_SECONDS"
DEFAULT_TRAINER_IMAGE: Final = "ghcr.io/finetunejob/finetune-trainer:0.1.0"
DEFAULT_METRICS_PORT: Final = 8080
DEFAULT_HEALTH_PORT: Final = 8081
DEFAULT_RESYNC_SECONDS: Final = 5.0
# Each progress reading changes the status (step, ETA): this bounds the status writes of a running job.
DEFAULT_PROGRESS_SECONDS: Final = 10.0
DEFAULT_LOG_LEVEL: Final = "INFO"
DEFAULT_BIND_ADDRESS: Final = "0.0.0.0"
HEALTH_PATH: Final = "/healthz"

"""The FineTuneJob client: submit, watch and read fine-tuning jobs from Python, and the ``ftj`` command."""

from finetune_client.client import Client
from finetune_client.errors import (
    ClientError,
    ClusterUnreachable,
    DataRejected,
    InvalidJob,
    JobNotFound,
    LogNotFound,
    StorageFailed,
)
from finetune_client.job import (
    Checkpoint,
    Dataset,
    DeepSpeed,
    Distributed,
    FineTuneJob,
    Lora,
    Model,
    Output,
    Resources,
    Storage,
    Training,
)
from finetune_client.job_view import Job

__all__ = [
    "Checkpoint",
    "Client",
    "ClientError",
    "ClusterUnreachable",
    "DataRejected",
    "Dataset",
    "DeepSpeed",
    "Distributed",
    "FineTuneJob",
    "InvalidJob",
    "Job",
    "JobNotFound",
    "LogNotFound",
    "Lora",
    "Model",
    "Output",
    "Resources",
    "Storage",
    "StorageFailed",
    "Training",
]

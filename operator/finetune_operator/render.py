"""The trainer's config.json rendered from a FineTuneJob (camelCase, exactly the trainer's contract; no secrets)."""

from __future__ import annotations

from typing import Any

from finetune_operator import constants as c
from finetune_operator.spec import FineTuneJob


def _without_none(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


def render_trainer_config(job: FineTuneJob) -> dict[str, Any]:
    """The JSON document for the job's ConfigMap; credentials never appear here (pods get them by secretKeyRef)."""
    spec = job.spec
    t = spec.training
    training: dict[str, Any] = _without_none({
        "method": t.method,
        "learningRate": t.learning_rate,
        "weightDecay": t.weight_decay,
        "epochs": t.epochs,
        "maxSteps": t.max_steps,
        "batchSize": t.batch_size,
        "gradientAccumulationSteps": t.gradient_accumulation_steps,
        "maxSeqLength": t.max_seq_length,
        "packing": t.packing,
        "warmupRatio": t.warmup_ratio,
        "scheduler": t.scheduler,
        "precision": t.precision,
        "gradientCheckpointing": t.gradient_checkpointing,
        "seed": t.seed,
        "evalEvery": t.eval_every,
        "logEvery": t.log_every,
    })
    if t.lora is not None:
        training["lora"] = {
            "r": t.lora.r,
            "alpha": t.lora.alpha,
            "dropout": t.lora.dropout,
            "targetModules": list(t.lora.target_modules),
        }
    if t.early_stopping is not None:
        training["earlyStopping"] = {
            "patience": t.early_stopping.patience,
            "metric": t.early_stopping.metric,
            "minDelta": t.early_stopping.min_delta,
        }
    ds = spec.dataset
    deepspeed = spec.distributed.deepspeed
    return {
        "model": _without_none({"uri": spec.model.uri, "revision": spec.model.revision, "sha256": spec.model.sha256}),
        "dataset": _without_none({
            "uri": ds.uri,
            "format": ds.format,
            "evalSplit": ds.eval_split,
            "evalUri": ds.eval_uri,
            "textField": ds.text_field,
            "promptField": ds.prompt_field,
            "completionField": ds.completion_field,
            "messagesField": ds.messages_field,
            "maxMalformedRows": ds.max_malformed_rows,
        }),
        # The export is resolved here so the trainer and status.model.export can never disagree.
        "output": {"uri": spec.output.uri, "export": spec.export},
        "training": training,
        "deepspeed": {
            "zeroStage": deepspeed.zero_stage,
            "offloadOptimizer": deepspeed.offload_optimizer,
            "offloadParams": deepspeed.offload_params,
        },
        "checkpoint": _without_none({
            "everySteps": spec.checkpoint.every_steps,
            "everyMinutes": spec.checkpoint.every_minutes,
            "keep": spec.checkpoint.keep,
            "gracePeriodSeconds": spec.checkpoint.grace_period_seconds,
        }),
        "metrics": _without_none({"port": spec.metrics.port, "pushgateway": spec.metrics.pushgateway}),
        "storage": _without_none({
            "endpoint": spec.storage.endpoint,
            "region": spec.storage.region,
            "forcePathStyle": spec.storage.force_path_style,
        }),
        "local": {"cacheDir": c.CACHE_DIR, "workDir": c.WORK_DIR},
        "job": {"name": job.name, "namespace": job.namespace, "attempt": job.attempt},
    }

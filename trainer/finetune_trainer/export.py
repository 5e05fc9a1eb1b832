"""The end of a run: the final evaluation, the model exported to ``<output.uri>/model/`` and ``result.json``.

Exports (``output.export``; default ``adapter`` for LoRA, ``full`` otherwise), each with the tokenizer:

- ``full``: ``model.safetensors`` + ``config.json`` + ``generation_config.json``; under ZeRO-3 the 16-bit weights
  are gathered from every rank first. Loads with ``AutoModelForCausalLM.from_pretrained``.
- ``adapter``: ``adapter_model.safetensors`` + ``adapter_config.json``; loads with ``PeftModel.from_pretrained``
  on top of the base model.
- ``merged``: the adapter folded into the base weights (``merge_and_unload``), saved as a plain model that
  ``AutoModelForCausalLM.from_pretrained`` loads. The base is reloaded from the node-local cache on rank 0, so the
  merge works the same under every ZeRO stage (``full`` with method ``lora`` means the same).

``result.json`` (written by rank 0 after the model): status, steps, the train loss (last logged and average),
the eval loss before training (step 0) and after, the best eval loss and its step, tokens trained on, wall time,
where the model is, the config hash and the world size; with evaluation prompts the final ``samples`` and
``samplesSeconds``; with ``evaluation.verifyExport`` the ``verification`` verdict (``verify``), whose failure
makes the status ``failed``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, Trainer, TrainerState

from finetune_trainer import exit_codes
from finetune_trainer.checkpoints import BACKGROUND_UPLOAD_BUDGET_S
from finetune_trainer.config import TrainerConfig
from finetune_trainer.distributed import DistContext
from finetune_trainer.metrics import TokenCounter
from finetune_trainer.storage import ObjectStore

log = logging.getLogger(__name__)

RESULT_NAME = "result.json"
SUMMARY_KEYS = ("steps", "maxSteps", "epoch", "trainLoss", "evalLossBefore", "evalLossAfter", "bestEvalLoss",
                "tokensSeen", "wallTimeSeconds", "tracking")
MODEL_DIR = "model"
# A pickle of TrainingArguments that HF writes beside every saved model: not part of a model folder.
NOT_EXPORTED = {"training_args.bin"}


def model_uri(config: TrainerConfig) -> str:
    return f"{config.output.uri.rstrip('/')}/{MODEL_DIR}/"


def export_kind(config: TrainerConfig) -> str:
    if config.export == "full" and config.training.method == "lora":
        return "merged"
    return config.export


def final_evaluation(trainer: Trainer) -> float | None:
    """The eval loss after training: the last evaluation's if it ran at the final step, else a new one (collective)."""
    if trainer.eval_dataset is None:
        return None
    evaluations = [e for e in trainer.state.log_history if "eval_loss" in e]
    if evaluations and evaluations[-1].get("step") == trainer.state.global_step:
        return float(evaluations[-1]["eval_loss"])
    return float(trainer.evaluate()["eval_loss"])


def total_tokens(ctx: DistContext, counter: TokenCounter) -> int:
    """Tokens trained on by the whole gang over every attempt (collective)."""
    local = torch.tensor([counter.tokens], dtype=torch.int64)
    if ctx.distributed:
        dist.all_reduce(local, group=ctx.group)
    return int(local.item()) + int(ctx.broadcast(counter.restored_tokens))


def export_model(
    config: TrainerConfig,
    trainer: Trainer,
    tokenizer: PreTrainedTokenizerBase,
    base_model_dir: Path,
    store: ObjectStore,
    ctx: DistContext,
) -> str:
    """Write the model locally (collective under ZeRO-3), then rank 0 uploads it; returns the model's URI."""
    staging = Path(config.local.workDir) / "export"
    if ctx.is_node_leader:
        shutil.rmtree(staging, ignore_errors=True)
    ctx.barrier()
    kind = export_kind(config)
    saved = staging / ("adapter" if kind == "merged" else kind)
    # Every rank takes part: under ZeRO-3 saving gathers the partitioned weights.
    trainer.save_model(str(saved))
    if ctx.rank != 0:
        return model_uri(config)
    if kind == "merged":
        saved = merge_adapter(base_model_dir, saved, staging / "merged", tokenizer)
    # Retries live in the storage layer; the budget is for the whole model.
    store = store.retrying_until(time.monotonic() + BACKGROUND_UPLOAD_BUDGET_S)
    # A model/ left by an earlier attempt with other files must not mix with this one.
    store.delete_prefix(f"{MODEL_DIR}/")
    for path in sorted(p for p in saved.rglob("*") if p.is_file() and p.name not in NOT_EXPORTED):
        store.upload_file(path, f"{MODEL_DIR}/{path.relative_to(saved).as_posix()}")
    log.info("exported the %s model to %s", kind, model_uri(config))
    return model_uri(config)


def merge_adapter(base_model_dir: Path, adapter_dir: Path, out_dir: Path, tokenizer: PreTrainedTokenizerBase) -> Path:
    """Fold the LoRA adapter into a fresh copy of the base weights and save it as a plain model."""
    from peft import PeftModel
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # Under ZeRO-3 HF would partition this load across the ranks (a collective only rank 0 is in); training is
    # over, so the plain CPU load is what is wanted.
    unset_hf_deepspeed_config()  # type: ignore[no-untyped-call]
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype="auto")
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def summarize(
    config: TrainerConfig,
    state: TrainerState,
    *,
    final_eval: float | None,
    train_loss: float,
    tokens_seen: int,
    wall_seconds: float,
    train_seconds: float,
    resumed_from: int | None,
    early_stopped_at: int | None,
    world_size: int,
    precision: str,
    data: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
    tracking: dict[str, str] | None = None,
) -> dict[str, Any]:
    """result.json's content, from the Trainer's log history (which a resume restores); ``extra`` holds the
    samples and the verification verdict."""
    evaluations = [(int(e.get("step", 0)), float(e["eval_loss"])) for e in state.log_history if "eval_loss" in e]
    losses = [float(e["loss"]) for e in state.log_history if "loss" in e]
    before = next((loss for step, loss in evaluations if step == 0), None)
    best = min(evaluations, key=lambda item: item[1]) if evaluations else None
    verification = (extra or {}).get("verification")
    failed = verification is not None and not verification.get("ok")
    return {
        "status": "failed" if failed else "succeeded",
        "exitCode": exit_codes.INVALID if failed else exit_codes.SUCCESS,
        "steps": state.global_step,
        "maxSteps": state.max_steps,
        "epoch": state.epoch,
        "trainLoss": _finite(losses[-1] if losses else None),
        "trainLossAverage": _finite(train_loss),
        "evalLossBefore": _finite(before),
        "evalLossAfter": _finite(final_eval),
        "bestEvalLoss": _finite(best[1] if best else None),
        "bestEvalStep": best[0] if best else None,
        "earlyStoppedAtStep": early_stopped_at,
        "resumedFromStep": resumed_from,
        "tokensSeen": tokens_seen,
        "wallTimeSeconds": round(wall_seconds, 3),
        "trainTimeSeconds": round(train_seconds, 3),
        "model": {"uri": model_uri(config), "export": export_kind(config)},
        "configHash": config.config_hash(),
        "worldSize": world_size,
        "precision": precision,
        "data": data or {},
        "job": {"name": config.job.name, "namespace": config.job.namespace, "attempt": config.job.attempt},
        # The experiment-tracking run ({runId, experimentId}), when one was started.
        "tracking": tracking,
        "finishedAt": datetime.now(UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }


def write_result(config: TrainerConfig, store: ObjectStore, state: TrainerState, **details: Any) -> dict[str, Any]:
    """Upload result.json (rank 0, after the model); returns what was written."""
    result = summarize(config, state, **details)
    data = json.dumps(result, indent=2).encode()
    store.retrying_until(time.monotonic() + BACKGROUND_UPLOAD_BUDGET_S).put_bytes(RESULT_NAME, data)
    log.info("result: %s", json.dumps(result))
    # The pod's termination message carries these to the operator once the metrics endpoint is gone.
    summary = {key: result[key] for key in SUMMARY_KEYS if result.get(key) is not None}
    verification = result.get("verification")
    if verification is not None:
        # The verdict without the answers: the message has 4096 bytes, and the operator needs only these.
        summary["verification"] = {"ok": verification.get("ok"), "seconds": verification.get("seconds"),
                                   "files": len(verification.get("files", [])),
                                   "answers": len(verification.get("answers", []))}
    try:
        config.local.result_summary_file.write_text(json.dumps(summary))
    except OSError as exc:
        log.warning("could not write %s: %s", config.local.result_summary_file, exc)
    return result


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value

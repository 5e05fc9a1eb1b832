"""One rank of a fine-tuning run: HF Trainer + DeepSpeed from a TrainerConfig, extended only through callbacks.

Launch (one node, two ranks; ``python -m finetune_trainer.launch`` does this inside a pod)::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 -m finetune_trainer --config job.json

Features:

- **Gang from the environment**: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE (torchrun's); run by hand without
  torchrun it is a gang of one. The process group is set up once here (gloo on CPU, nccl on GPU) and torn down
  in one place; a separate small gloo group carries the control messages (SIGTERM, checkpoint completion).
- **Inputs**: model, tokenizer and data pulled from ``s3://`` or ``file://`` into the node-local cache (local rank 0
  downloads, the node's other ranks wait), tokenised by ``data`` (text / promptCompletion / chat with
  assistant-only labels, packing, eval split).
- **DeepSpeed always**: ``build_deepspeed_config`` turns ``deepspeed.zeroStage`` 0-3, ``offloadOptimizer`` and
  ``offloadParams`` into a config dict; values HF fills from TrainingArguments stay ``"auto"``; stage 0 still runs
  through DeepSpeed so every run checkpoints and resumes the same way. ZeRO-3 gathers 16-bit weights on save.
  With an optimizer offload DeepSpeed's own (CPU) Adam is configured, otherwise HF's AdamW.
- **Full fine-tune or LoRA** (peft): rank, alpha, dropout, target modules (default: the model type's attention
  projections from peft's table); GPT-2-style Conv1D layers get ``fan_in_fan_out``.
- **Recipe**: learning rate, weight decay, scheduler (linear/cosine/constant/constant_with_warmup), warmup ratio,
  epochs or max steps, per-device batch size, gradient accumulation, max sequence length, gradient
  (activation) checkpointing, seed for weights, dropout and data order.
- **Precision**: ``auto`` is bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU; on CPU
  ``use_cpu=True`` (DeepSpeed and DDP need it under torchrun) and fp16 is refused as a config error.
- **Evaluation**: a first evaluation at step 0 (so the result shows the improvement), every
  ``training.evalEvery`` steps and at the end; early stopping on eval loss with ``patience`` and ``minDelta``
  (its state is rebuilt from the log history after a resume); the best eval loss and its step are tracked, and
  retention never deletes the best checkpoint.
- **Checkpoints** (``checkpoints``, ``checkpoint_protocol``, ``resume``): every N steps and/or minutes, uploaded in
  the background with a manifest written last; automatic resume from the newest complete checkpoint (model,
  optimizer, scheduler, RNG, data position); SIGTERM saves at the next step boundary within the grace period and
  exits PREEMPTED.
- **Metrics** (``metrics``): Prometheus endpoint on every rank, Pushgateway pushes from rank 0.
- **History** (``history``): rank 0's log events (step, loss, eval loss, learning rate, tokens/s, time) in
  ``<output.uri>/history.jsonl``, uploaded with every checkpoint and at the end.
- **Sample answers** (``samples``): the evaluation prompts answered at every evaluation and at the end (every
  rank takes part: ZeRO-3 generation is collective), in ``<output.uri>/samples.jsonl`` and result.json.
- **Export** (``export``): full model, LoRA adapter or merged model to ``<output.uri>/model/``, then
  ``result.json`` with the losses before and after, the best eval loss, steps, tokens and wall time.
- **Verified export** (``verify``): a fresh process loads ``model/`` back from storage with stock transformers
  (peft for an adapter), checks the weights are finite and generates; a failed check exits INVALID.
- **Logging**: rank 0 logs at INFO, the other ranks only warnings.
- **Exit codes**: 0 done, 64 invalid config or data (permanent), 75 preempted after a checkpoint, 1 otherwise.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
    set_seed,
)
from transformers.pytorch_utils import Conv1D

from finetune_trainer import exit_codes, export, verify
from finetune_trainer.checkpoint_protocol import CheckpointCallback, CheckpointProtocol
from finetune_trainer.checkpoints import BACKGROUND_UPLOAD_BUDGET_S
from finetune_trainer.config import ConfigError, TrainerConfig
from finetune_trainer.data import DEFAULT_CHAT_TEMPLATE, count_real_tokens
from finetune_trainer.data_store import PreparedData, build_datasets
from finetune_trainer.distributed import DistContext, Preempted, Preemption
from finetune_trainer.history import HistoryCallback
from finetune_trainer.metrics import MetricsCallback, TokenCounter, TrainerMetrics
from finetune_trainer.resume import restore_checkpoint
from finetune_trainer.samples import SamplesCallback, load_prompts
from finetune_trainer.storage import ObjectStore, open_store, pull_model
from finetune_trainer.tracking_mlflow import RUN_START_WAIT_S, MlflowTracker, TrackingCallback, start_tracking

log = logging.getLogger(__name__)

# DeepSpeed prints a progress line every N steps on its own; HF's logging already covers that.
DS_STEPS_PER_PRINT = 10**9
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --- pure builders ------------------------------------------------------------------------------------------------


def resolve_precision(requested: str, *, cuda: bool, bf16_supported: bool) -> str:
    """'bf16', 'fp16' or 'fp32' for this hardware; raises ConfigError for fp16 without a GPU."""
    if requested == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if bf16_supported else "fp16"
    if requested == "fp16" and not cuda:
        raise ConfigError("training.precision", "fp16 needs a GPU; use 'bf16', 'fp32' or 'auto' on CPU")
    if requested == "bf16" and cuda and not bf16_supported:
        raise ConfigError("training.precision", "this GPU has no bf16; use 'fp16' or 'auto'")
    return requested


def build_deepspeed_config(
    config: TrainerConfig, world_size: int, *, precision: str, cuda: bool, load_universal: bool = False
) -> dict[str, Any]:
    """The DeepSpeed config dict for this run; "auto" where HF fills the value from TrainingArguments."""
    ds = config.deepspeed
    t = config.training
    zero: dict[str, Any] = {"stage": ds.zeroStage}
    if ds.zeroStage >= 1:
        zero.update({"contiguous_gradients": True, "reduce_bucket_size": "auto"})
        if cuda:
            # Overlapping needs CUDA streams; on CPU it only adds copies.
            zero["overlap_comm"] = True
    if ds.zeroStage == 3:
        zero.update(
            {
                "stage3_prefetch_bucket_size": "auto",
                "stage3_param_persistence_threshold": "auto",
                # The export and the checkpoint's model.safetensors need whole weights, not shards.
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    if ds.offloadOptimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if ds.offloadParams:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    result: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batchSize,
        "gradient_accumulation_steps": t.gradientAccumulationSteps,
        "train_batch_size": t.batchSize * t.gradientAccumulationSteps * world_size,
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "steps_per_print": DS_STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
        # Checkpoints go to each node's own disk: every node's local rank 0 creates the folders.
        "checkpoint": {"use_node_local_storage": True},
    }
    if load_universal:  # resuming from a checkpoint converted for this world size (resume.convert_to_universal)
        result["checkpoint"]["load_universal"] = True
    if ds.offloadOptimizer:
        # DeepSpeed refuses a torch optimizer on offloaded states; its CPU Adam is the fast path there.
        result["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"},
        }
    if precision == "bf16":
        result["bf16"] = {"enabled": True}
    elif precision == "fp16":
        result["fp16"] = {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
    return result


def default_lora_targets(model_type: str) -> list[str]:
    """The attention projections peft adapts by default for this model type."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    targets = DEFAULTS.get(model_type)
    return list(targets) if targets else ["q_proj", "v_proj"]


def uses_conv1d(model: torch.nn.Module, targets: list[str]) -> bool:
    """Whether the targeted layers are GPT-2-style Conv1D (weights stored transposed: LoRA needs fan_in_fan_out)."""
    for name, module in model.named_modules():
        if isinstance(module, Conv1D) and any(name == t or name.endswith(f".{t}") for t in targets):
            return True
    return False


def build_training_arguments(
    config: TrainerConfig,
    *,
    output_dir: Path,
    world_size: int,
    precision: str,
    cuda: bool,
    has_eval: bool,
    resuming: bool,
    load_universal: bool = False,
) -> TrainingArguments:
    t = config.training
    evaluate = has_eval and t.evalEvery is not None
    return TrainingArguments(
        output_dir=str(output_dir),
        use_cpu=not cuda,
        ddp_backend="nccl" if cuda else "gloo",
        deepspeed=build_deepspeed_config(
            config, world_size, precision=precision, cuda=cuda, load_universal=load_universal
        ),
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        per_device_train_batch_size=t.batchSize,
        per_device_eval_batch_size=t.batchSize,
        gradient_accumulation_steps=t.gradientAccumulationSteps,
        learning_rate=t.learningRate,
        weight_decay=t.weightDecay,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmupRatio,
        num_train_epochs=t.epochs if t.epochs is not None else 1.0,
        max_steps=t.maxSteps if t.maxSteps is not None else -1,
        activation_checkpointing=t.gradientCheckpointing,
        # Non-reentrant checkpointing works with frozen embeddings (LoRA) without extra hooks.
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradientCheckpointing else None,
        seed=t.seed,
        data_seed=t.seed,
        logging_strategy="steps",
        logging_steps=t.logEvery,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=t.evalEvery if evaluate else None,
        # The step-0 evaluation of a resumed run is in the restored log history already.
        eval_on_start=has_eval and not resuming,
        prediction_loss_only=True,
        # The checkpoint protocol decides when to save (steps and/or minutes, SIGTERM); HF only writes the files.
        save_strategy="no",
        save_total_limit=None,
        report_to=[],
        disable_tqdm=True,
        log_level="info",
        log_level_replica="warning",
        dataloader_num_workers=0,
        include_num_input_tokens_seen="no",
    )


# --- callbacks and the Trainer ------------------------------------------------------------------------------------


class EarlyStoppingCallback(TrainerCallback):
    """Stops training after ``patience`` evaluations without an eval-loss decrease larger than ``min_delta``."""

    def __init__(self, patience: int, min_delta: float) -> None:
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.bad_evaluations = 0
        self.stopped_at: int | None = None

    def observe(self, loss: float) -> bool:
        """Record one evaluation; True when training should stop."""
        if self.best is None or loss < self.best - self.min_delta:
            self.best = loss
            self.bad_evaluations = 0
        else:
            self.bad_evaluations += 1
        return self.bad_evaluations >= self.patience

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # After a resume the evaluations so far are in the restored history: replay them.
        for entry in state.log_history:
            if "eval_loss" in entry:
                self.observe(float(entry["eval_loss"]))

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not metrics or "eval_loss" not in metrics:
            return
        if self.observe(float(metrics["eval_loss"])) and state.global_step > 0:
            control.should_training_stop = True
            self.stopped_at = state.global_step
            log.info("early stopping at step %d: no improvement in %d evaluations", state.global_step, self.patience)


class _CountingCollator:
    def __init__(self, collate: Any, counter: TokenCounter) -> None:
        self.collate = collate
        self.counter = counter

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = self.collate(features)
        self.counter.collated(batch)
        return batch


class FineTuneTrainer(Trainer):
    """HF Trainer whose training batches (not the eval ones) are counted, without a per-step synchronisation."""

    def __init__(self, *args: Any, token_counter: TokenCounter, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.token_counter = token_counter

    def get_train_dataloader(self) -> Any:
        collate = self.data_collator
        self.data_collator = _CountingCollator(collate, self.token_counter)
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collate

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        self.token_counter.consumed()
        return super().training_step(model, inputs, num_items_in_batch)


# --- one rank's run -----------------------------------------------------------------------------------------------


@dataclass
class RunOutcome:
    code: int
    reason: str


# What each node does for itself (its pulls and its data preparation) is logged by its leader, not only rank 0.
NODE_LOGGERS = ("finetune_trainer.storage.node_cache", "finetune_trainer.data_prepare", "finetune_trainer.data_store")


def configure_logging(rank: int, local_rank: int = 0) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s", force=True)
    if local_rank == 0:
        for name in NODE_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # boto's per-request INFO lines would drown the training log.
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def init_distributed(ctx: DistContext, cuda: bool) -> None:
    """The one process group of this rank; a run without torchrun becomes a gang of one."""
    if "MASTER_ADDR" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(
            {
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_WORLD_SIZE": "1",
            }
        )
    if cuda:
        torch.cuda.set_device(ctx.local_rank)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    import deepspeed

    skip_shm_comm_op()
    # DeepSpeed's own comm layer wraps the group now: ZeRO-3 partitions weights while loading the model, before
    # HF Trainer would initialise it (and a DeepSpeed config built without it assumes a world of one).
    deepspeed.init_distributed(dist_backend=backend)
    ctx.open_control_group()


def skip_shm_comm_op() -> None:
    """Keep ``deepspeed.init_distributed`` from JIT-building DeepSpeed's CPU shared-memory all-reduce op.

    On the CPU accelerator DeepSpeed's ``TorchBackend`` runs ninja over ``deepspeed_shm_comm`` in
    ``~/.cache/torch_extensions`` on every start, and g++ rebuilds it (25-75 s) on a cold cache and whenever a
    different ninja built it last (ninja 1.11 and 1.13 hash build-log commands differently, so each sees the
    other's build as stale: the pods' venv ninja and a system ninja took turns). Training never uses the op: it
    only serves ``inference_all_reduce`` (DeepSpeed inference), and only when DeepSpeed's own launcher sets
    LOCAL_SIZE to the world size; without it that call falls back to ``torch.distributed``. On GPUs DeepSpeed has
    no such op and this changes nothing.
    """
    # By its full name: ``from deepspeed.comm import torch`` is the real torch, which deepspeed.comm re-exports.
    ds_torch: Any = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch, "build_shm_op"):
        ds_torch.build_shm_op = lambda: None


def run(config: TrainerConfig, extra_callbacks: Sequence[TrainerCallback] = ()) -> RunOutcome:
    """Train, export and report; the outcome's code is the process's exit code (see ``exit_codes``).

    ``extra_callbacks`` are added after the trainer's own (benchmarks use one to time steps)."""
    started = time.time()
    store = None
    ctx = DistContext.from_env()
    configure_logging(ctx.rank, ctx.local_rank)
    cuda = torch.cuda.is_available()
    preemption = Preemption()
    preemption.install()
    metrics = start_metrics(config, ctx)
    tracking: MlflowTracker | None = None
    try:
        init_distributed(ctx, cuda)
        precision = resolve_precision(
            config.training.precision, cuda=cuda, bf16_supported=cuda and torch.cuda.is_bf16_supported()
        )
        # Rooted at output.uri: checkpoints/, model/ and result.json are keys below it.
        store = open_store(config.output.uri, config.storage, on_bytes=metrics.count_s3_bytes)
        inputs = pull_inputs(config, ctx, metrics)
        output_dir = Path(config.local.workDir) / "checkpoints"
        restored, complete = restore_checkpoint(config, store, ctx, output_dir)
        args = build_training_arguments(
            config,
            output_dir=output_dir,
            world_size=ctx.world_size,
            precision=precision,
            cuda=cuda,
            has_eval=inputs.data.eval is not None,
            resuming=restored is not None,
            load_universal=restored is not None and restored.universal,
        )
        set_seed(config.training.seed)
        # After TrainingArguments: under ZeRO-3 HF then partitions the weights while loading them.
        model = load_model(config, inputs.model_dir, precision)
        checkpoints = CheckpointProtocol(
            config,
            store,
            ctx,
            preemption,
            TokenCounter(count_real_tokens),
            metrics,
            complete=complete,
            resumed_dir=restored.path if restored is not None else None,
        )
        if restored is not None and ctx.rank == 0:
            checkpoints.counter.restored_tokens = restored.manifest.tokensSeen
        tracking = start_tracking(config, ctx, metrics, store, restored.path if restored else None, inputs.model_dir)
        training = build_trainer(config, model, args, inputs, checkpoints, metrics, extra_callbacks, tracking)
        train_started = time.time()
        output = training.trainer.train(resume_from_checkpoint=str(restored.path) if restored is not None else None)
        train_seconds = time.time() - train_started
        preemption.armed = False
        if checkpoints.preempted:
            return preempted_outcome(checkpoints)
        report = RunReport(
            started=started,
            train_seconds=train_seconds,
            train_loss=output.training_loss,
            resumed_from=restored.step if restored is not None else None,
            precision=precision,
        )
        return export_and_report(config, ctx, store, inputs, training, report)
    except Preempted:
        return RunOutcome(exit_codes.PREEMPTED, "preempted before training started; nothing to checkpoint")
    finally:
        preemption.uninstall()
        if tracking is not None:
            tracking.close()
        metrics.close()
        if store is not None:
            store.close()


def start_metrics(config: TrainerConfig, ctx: DistContext) -> TrainerMetrics:
    """This rank's metrics endpoint; rank 0 also pushes to the Pushgateway when the config names one."""
    metrics = TrainerMetrics(ctx.rank, config.job.name, config.job.namespace)
    endpoint = metrics.serve(config.metrics.port + ctx.local_rank)
    if ctx.rank == 0:
        log.info(
            "%d ranks (%d per node), %d CPU threads per rank (OMP_NUM_THREADS=%s), metrics at %s",
            ctx.world_size,
            ctx.local_world_size,
            torch.get_num_threads(),
            os.environ.get("OMP_NUM_THREADS", "unset"),
            endpoint,
        )
        if config.metrics.pushgateway:
            metrics.enable_push(
                config.metrics.pushgateway,
                config.job.name,
                {"namespace": config.job.namespace, "attempt": str(config.job.attempt)},
            )
    return metrics


@dataclass
class Inputs:
    """The model folder in the node cache, its tokenizer, and the tokenised data."""

    model_dir: Path
    tokenizer: PreTrainedTokenizerBase
    data: PreparedData
    prompts: list[str]


def pull_inputs(config: TrainerConfig, ctx: DistContext, metrics: TrainerMetrics) -> Inputs:
    """Model, tokenizer and data from storage, through the node cache (local rank 0 downloads)."""
    model_dir = pull_model(
        config.model.uri,
        config.local.cacheDir,
        config.storage,
        local_rank=ctx.local_rank,
        sha256=config.model.sha256,
        on_bytes=metrics.count_s3_bytes,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    metrics.record_data_preparation(0, 0.0, math.nan)
    data = build_datasets(config, tokenizer, local_rank=ctx.local_rank, on_bytes=metrics.count_s3_bytes,
                          on_progress=metrics.record_data_preparation)
    metrics.data_ready()
    if config.dataset.format == "chat" and not tokenizer.chat_template:
        # Saved with the model so inference formats conversations exactly as training did.
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return Inputs(model_dir, tokenizer, data, load_prompts(config, metrics.count_s3_bytes))


@dataclass
class Training:
    """The Trainer and the parts of it the end of the run reads back."""

    trainer: FineTuneTrainer
    checkpoints: CheckpointProtocol
    early_stopping: EarlyStoppingCallback | None
    history: HistoryCallback | None
    samples: SamplesCallback | None = None
    tracking: MlflowTracker | None = None


def build_trainer(
    config: TrainerConfig,
    model: PreTrainedModel,
    args: TrainingArguments,
    inputs: Inputs,
    checkpoints: CheckpointProtocol,
    metrics: TrainerMetrics,
    extra_callbacks: Sequence[TrainerCallback],
    tracking: MlflowTracker | None = None,
) -> Training:
    """HF's Trainer with the trainer's callbacks: metrics, checkpoints, the history and tracking (rank 0), the
    sample answers (before the history's upload at a save), then ``extra_callbacks`` and early stopping."""
    metrics_callback = MetricsCallback(metrics, checkpoints.counter)
    callbacks: list[TrainerCallback] = [metrics_callback, CheckpointCallback(checkpoints)]
    history = None
    samples = None
    if inputs.prompts:
        samples = SamplesCallback(config, inputs.prompts, inputs.tokenizer, checkpoints.store, checkpoints.ctx)
        callbacks.append(samples)
    if checkpoints.ctx.rank == 0:
        # After the metrics callback (it computes the interval's tokens/s) and the checkpoint's (its SIGTERM deadline).
        history = HistoryCallback(
            checkpoints.store,
            tokens_per_second=lambda: metrics_callback.last_tokens_per_second,
            preempt_deadline=lambda: checkpoints.preempt_deadline if checkpoints.preempted else None,
        )
        callbacks.append(history)
    if tracking is not None:
        # After the checkpoint's callback (its save decision) and the metrics' (the interval's tokens/s).
        callbacks.append(TrackingCallback(tracking, lambda: metrics_callback.last_tokens_per_second))
    callbacks.extend(extra_callbacks)
    early_stopping = None
    if config.training.earlyStopping is not None:
        es = config.training.earlyStopping
        early_stopping = EarlyStoppingCallback(es.patience, es.minDelta)
        callbacks.append(early_stopping)
    trainer = FineTuneTrainer(
        model=model,
        args=args,
        train_dataset=inputs.data.train,
        eval_dataset=inputs.data.eval,
        data_collator=inputs.data.collator,
        processing_class=inputs.tokenizer,
        callbacks=callbacks,
        token_counter=checkpoints.counter,
    )
    return Training(trainer, checkpoints, early_stopping, history, samples, tracking)


def preempted_outcome(checkpoints: CheckpointProtocol) -> RunOutcome:
    """PREEMPTED, with a reason that says whether the emergency checkpoint made it."""
    if checkpoints.emergency_checkpoint_complete:
        return RunOutcome(exit_codes.PREEMPTED, f"preempted: emergency checkpoint at step {checkpoints.emergency_step}")
    return RunOutcome(
        exit_codes.PREEMPTED,
        f"preempted at step {checkpoints.emergency_step}: the emergency checkpoint could not be completed in the "
        f"grace period; the newest complete one is step {checkpoints.last_complete_step}",
    )


@dataclass(frozen=True)
class RunReport:
    """What result.json says about the run besides the Trainer's state."""

    started: float
    train_seconds: float
    train_loss: float
    resumed_from: int | None
    precision: str


def export_and_report(
    config: TrainerConfig, ctx: DistContext, store: ObjectStore, inputs: Inputs, training: Training, report: RunReport
) -> RunOutcome:
    """The final evaluation, the model exported and, from rank 0, result.json (collective)."""
    trainer = training.trainer
    final_eval = export.final_evaluation(trainer)
    tokens_seen = export.total_tokens(ctx, training.checkpoints.counter)
    details: dict[str, Any] = {}
    if training.samples is not None:
        # Collective under ZeRO-3, like the export: every rank generates, rank 0 keeps the answers.
        details.update(training.samples.finish(trainer.model, trainer.state.global_step,
                                               time.monotonic() + BACKGROUND_UPLOAD_BUDGET_S))
    model_uri = export.export_model(config, trainer, inputs.tokenizer, inputs.model_dir, store, ctx)
    if training.history is not None:
        # After the final evaluation, so the last eval loss is in it; before result.json, which marks the end.
        training.history.finish(time.monotonic() + BACKGROUND_UPLOAD_BUDGET_S)
    if ctx.rank == 0 and config.evaluation.verifyExport:
        details["verification"] = verify.check_export(config, store, model_uri, inputs.model_dir, inputs.prompts)
    if ctx.rank == 0:
        result = export.write_result(
            config,
            store,
            trainer.state,
            final_eval=final_eval,
            train_loss=report.train_loss,
            tokens_seen=tokens_seen,
            wall_seconds=time.time() - report.started,
            train_seconds=report.train_seconds,
            resumed_from=report.resumed_from,
            early_stopped_at=training.early_stopping.stopped_at if training.early_stopping is not None else None,
            world_size=ctx.world_size,
            precision=report.precision,
            data=inputs.data.stats.to_dict(),
            extra=details,
            tracking=training.tracking.run_info(wait=RUN_START_WAIT_S) if training.tracking is not None else None,
        )
        if training.tracking is not None:
            # A model that failed its check is not registered; the run is marked FAILED.
            training.tracking.finish(result, export.model_uri(config).rstrip("/"))
    verification = details.get("verification")
    if verification is not None and not verification["ok"]:
        return RunOutcome(exit_codes.INVALID, f"{verify.FAILED_PREFIX}: {verification['problem']}")
    return RunOutcome(exit_codes.SUCCESS, f"trained {trainer.state.global_step} steps")



def load_model(config: TrainerConfig, model_dir: Path, precision: str) -> PreTrainedModel:
    """The base model, with LoRA adapters when the method is 'lora'."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[precision])
    if config.training.gradientCheckpointing:
        # The cache is useless (and warned about) when activations are recomputed.
        model.config.use_cache = False
    if config.training.method != "lora":
        return model
    from peft import LoraConfig, get_peft_model

    lora = config.training.effective_lora
    targets = lora.targetModules or default_lora_targets(model.config.model_type)
    peft_config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        fan_in_fan_out=uses_conv1d(model, targets),
    )
    peft_model: Any = get_peft_model(model, peft_config)
    if config.training.gradientCheckpointing:
        peft_model.enable_input_require_grads()
    return cast(PreTrainedModel, peft_model)

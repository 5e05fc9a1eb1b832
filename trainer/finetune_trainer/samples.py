"""Sample answers: the evaluation prompts answered at every evaluation and at the end, kept in ``samples.jsonl``.

Each evaluation appends one block to ``<output.uri>/samples.jsonl``, one line per prompt::

    {"step": 50, "prompt": "How do I reset my password?", "answer": "Go to Settings ...", "seconds": 0.41}

(``"truncated": true`` is added when ``evaluation.generationTimeoutSeconds`` cut the answer or left no time for
it). The prompt gets the model's chat template as one user turn (``add_generation_prompt=True``); a tokenizer
without a template gets the plain prompt. Decoding is greedy unless ``evaluation.sampling``.

Every rank takes part in generation: under ZeRO-3 each rank holds a shard of every weight, so ``generate`` runs
with ``synced_gpus=True`` and every forward pass gathers the weights across the gang (a rank that finished keeps
stepping until all have). Rank 0 decides how much of the time budget is left before each prompt and tells the
others, so they run the same number of generations; only rank 0 writes. The file is uploaded with every
checkpoint and at the end (as history.jsonl is), and kept locally as ``<output_dir>/samples.jsonl`` (HF's output
folder, beside the checkpoints); a resumed attempt starts from the stored file cut at its step.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from finetune_trainer.config import MAX_PROMPT_LENGTH, ConfigError, EvaluationConfig, TrainerConfig, check_prompts
from finetune_trainer.distributed import DistContext
from finetune_trainer.history import parse_history
from finetune_trainer.storage import ByteHook, ObjectStore, open_store, parent_uri

log = logging.getLogger(__name__)

SAMPLES_NAME = "samples.jsonl"
# Uploading samples.jsonl at a save is bounded: a slow store must not hold the training step up.
UPLOAD_BUDGET_S = 30.0


def parse_prompts(text: str, where: str) -> list[str]:
    """Prompts from a file's text: JSON Lines (a string or {"prompt": ...} per line) or one prompt per line."""
    lines = [line for line in text.splitlines() if line.strip()]
    prompts: list[str] = []
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith(("{", '"')):
            try:
                value = json.loads(stripped)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}:{number}", f"not valid JSON: {exc.msg}") from exc
            if isinstance(value, dict):
                value = value.get("prompt")
            if not isinstance(value, str):
                raise ConfigError(f"{where}:{number}", 'each JSON line must be a string or {"prompt": "..."}')
            prompts.append(value)
        else:
            prompts.append(stripped)
    if not prompts:
        raise ConfigError(where, "holds no prompt")
    check_prompts(prompts, where)
    return prompts


def load_prompts(config: TrainerConfig, on_bytes: ByteHook | None = None) -> list[str]:
    """The evaluation prompts: the inline list, or those of ``evaluation.promptsUri``."""
    evaluation = config.evaluation
    if evaluation.promptsUri is None:
        return list(evaluation.prompts)
    folder, name = parent_uri(evaluation.promptsUri)
    store = open_store(folder, config.storage, on_bytes=on_bytes)
    try:
        data = store.get_bytes(name)
    finally:
        store.close()
    # A prompt file far beyond 64 prompts of 4096 characters is not a prompt file.
    if len(data) > 4 * 64 * MAX_PROMPT_LENGTH:
        raise ConfigError("evaluation.promptsUri", f"{evaluation.promptsUri} is {len(data)} bytes: too large")
    return parse_prompts(data.decode("utf-8", errors="replace"), evaluation.promptsUri)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The prompt's token ids: one user turn through the chat template, or the plain text without one."""
    if tokenizer.chat_template:
        # As text, then tokenized: apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5.
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def generation_kwargs(evaluation: EvaluationConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """generate()'s settings for these evaluation settings (greedy unless sampling)."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": evaluation.maxNewTokens,
        "do_sample": evaluation.sampling,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "use_cache": True,
    }
    if evaluation.sampling:
        kwargs.update(temperature=evaluation.temperature, top_p=evaluation.topP)
    else:
        # The model's generation_config may carry sampling settings that greedy decoding would warn about.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


@dataclass(frozen=True)
class Answer:
    prompt: str
    answer: str
    seconds: float
    truncated: bool = False

    def line(self, step: int) -> dict[str, Any]:
        entry: dict[str, Any] = {"step": step, "prompt": self.prompt, "answer": self.answer,
                                 "seconds": round(self.seconds, 3)}
        if self.truncated:
            entry["truncated"] = True
        return entry


def answer_prompts(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    evaluation: EvaluationConfig,
    ctx: DistContext | None,
    *,
    synced: bool = False,
) -> list[Answer]:
    """Every prompt answered within ``generationTimeoutSeconds`` (collective: every rank of ``ctx`` calls it;
    without a ``ctx`` this process alone)."""
    deadline = time.monotonic() + evaluation.generationTimeoutSeconds
    kwargs = generation_kwargs(evaluation, tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers: list[Answer] = []
    try:
        for prompt in prompts:
            # Rank 0's clock decides, so every rank runs the same generations (a collective under ZeRO-3).
            left = deadline - time.monotonic()
            left = float(ctx.broadcast(left)) if ctx is not None else left
            if left <= 0:
                answers.append(Answer(prompt, "", 0.0, truncated=True))
                continue
            ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=device)
            started = time.monotonic()
            with torch.no_grad():
                output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_time=left,
                                        synced_gpus=synced, **kwargs)
            seconds = time.monotonic() - started
            new = output[0, ids.shape[1]:].tolist()
            finished = len(new) >= evaluation.maxNewTokens or (new and new[-1] == tokenizer.eos_token_id)
            text = str(tokenizer.decode(new, skip_special_tokens=True))
            answers.append(Answer(prompt, text, seconds, truncated=not finished and seconds >= left))
    finally:
        if was_training:
            model.train()
    return answers


def zero3_synced(config: TrainerConfig, ctx: DistContext) -> bool:
    """Whether generation must keep every rank stepping (ZeRO-3 shards the weights across the gang)."""
    return ctx.distributed and config.deepspeed.zeroStage == 3


class SamplesCallback(TrainerCallback):
    """Answers the prompts at every evaluation (every rank), and on rank 0 keeps and uploads samples.jsonl."""

    def __init__(
        self,
        config: TrainerConfig,
        prompts: list[str],
        tokenizer: PreTrainedTokenizerBase,
        store: ObjectStore,
        ctx: DistContext,
    ) -> None:
        self.evaluation = config.evaluation
        self.synced = zero3_synced(config, ctx)
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.store = store
        self.ctx = ctx
        self.lines: list[dict[str, Any]] = []
        self.last: list[Answer] = []
        self.last_step: int | None = None
        self.last_seconds = 0.0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.ctx.rank != 0 or state.global_step == 0:
            return
        try:
            stored = self.store.get_bytes(SAMPLES_NAME) if self.store.exists(SAMPLES_NAME) else b""
        except Exception as exc:  # losing earlier attempts' samples must not stop training
            log.warning("could not read the stored %s: %s", SAMPLES_NAME, exc)
            return
        self.lines = parse_history(stored.decode(errors="replace"), up_to_step=state.global_step)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        if model is None:
            return
        self.answer(model, state.global_step)
        if self.ctx.rank == 0 and args.output_dir:
            # A local copy beside the checkpoints, for in-process consumers (experiment trackers) of the file.
            local = Path(args.output_dir)
            try:
                local.mkdir(parents=True, exist_ok=True)
                (local / SAMPLES_NAME).write_text(self.text())
            except OSError as exc:
                log.warning("could not write the local %s: %s", SAMPLES_NAME, exc)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.ctx.rank == 0 and self.lines:
            self.upload(time.monotonic() + UPLOAD_BUDGET_S)

    def answer(self, model: Any, step: int) -> list[Answer]:
        """One block of answers at ``step`` (collective); rank 0 keeps it."""
        started = time.monotonic()
        answers = answer_prompts(model, self.tokenizer, self.prompts, self.evaluation, self.ctx, synced=self.synced)
        self.last, self.last_step, self.last_seconds = answers, step, time.monotonic() - started
        if self.ctx.rank == 0:
            self.lines = [line for line in self.lines if line.get("step") != step]
            self.lines += [a.line(step) for a in answers]
            cut = sum(a.truncated for a in answers)
            log.info("answered %d prompts at step %d in %.1f s%s", len(answers), step, self.last_seconds,
                     f" ({cut} cut by evaluation.generationTimeoutSeconds)" if cut else "")
        return answers

    def finish(self, model: Any, step: int, deadline: float) -> dict[str, Any]:
        """The answers at the end (collective; new ones unless the last evaluation was at ``step``), uploaded;
        returns result.json's part."""
        if self.last_step != step:
            self.answer(model, step)
        if self.ctx.rank == 0:
            self.upload(deadline)
        return {
            "samples": [{"prompt": a.prompt, "answer": a.answer, **({"truncated": True} if a.truncated else {})}
                        for a in self.last],
            "samplesStep": step,
            "samplesSeconds": round(self.last_seconds, 3),
        }

    def text(self) -> str:
        return "".join(json.dumps(line) + "\n" for line in self.lines)

    def upload(self, deadline: float) -> bool:
        data = self.text().encode()
        try:
            self.store.retrying_until(deadline).put_bytes(SAMPLES_NAME, data)
        except Exception as exc:  # samples are a report: their loss must never stop training
            log.warning("%s not uploaded: %s", SAMPLES_NAME, exc)
            return False
        return True

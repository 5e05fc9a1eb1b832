"""Training data: JSONL/JSON/Parquet rows into tokenized examples with loss masks, packing, eval split, batches.

Files
    ``.jsonl`` and ``.json`` are JSON lines (blank lines skipped); a ``.json`` file whose first character is ``[``
    is one JSON array of rows. ``.parquet`` is read column by column (only the configured field's column). Row
    locations are ``<file>:<line>`` (1-based) for JSON lines, ``<file>:<line>`` of the row's first character for
    JSON arrays and ``<file>:row <n>`` (1-based) for Parquet, where ``<file>`` is the source URI when known.

Formats (field names come from ``DatasetConfig``)
    ``text``: ``{"text": str}`` -> text + eos; every token is trained.
    ``promptCompletion``: ``{"prompt": str, "completion": str}`` -> prompt (label -100), then completion + eos
    (trained). Prompt and completion are tokenized separately, as at inference (the prompt, then generation).
    ``chat``: ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}`` with at least one
    assistant turn; only assistant turns are trained.
      - With the tokenizer's chat template: assistant turn ``i`` is the text between
        ``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i + 1])``, i.e. its content and
        the template's end-of-turn tokens. A template that does not render conversations prefix by prefix (one
        that rewrites earlier turns) makes such rows malformed.
      - Without one, ``DEFAULT_CHAT_TEMPLATE`` (kept stable; a Jinja copy is exported so inference can match it)::

            <|system|>\\n{content}\\n
            <|user|>\\n{content}\\n
            <|assistant|>\\n{content}<eos>

        one block per message in order, nothing between blocks; the assistant's content and its eos are trained.
    Pieces are tokenized separately with ``add_special_tokens=False``; the tokenizer's BOS is prepended when it adds
    one by default (not for chat templates, which write their own).

Truncation and masks
    Examples are cut at ``maxSeqLength`` (from the right); one left with no trained token is dropped and counted.
    Labels are -100 on untrained tokens and on padding.

Packing
    Examples are appended in order into sequences of at most ``maxSeqLength`` tokens; one that does not fit starts
    the next sequence, so no example is ever split. Boundaries are kept two ways: (1) each example's
    ``position_ids`` restart at 0, and (2) the first token of each example has label -100, so no loss term predicts
    one example's first token from the previous one. Packed batches carry ``position_ids`` and no
    ``attention_mask``: transformers then builds a block-diagonal causal mask from the restarting position ids
    (a unit test checks it with 5.24, GPT-2, eager and sdpa on CPU: logits equal those of each example alone),
    so attention does not cross examples either; with flash-attention transformers turns the same position ids
    into varlen boundaries (not tested here: no GPU). Transformers looks for packed sequences only when no KV cache
    is in use: ``use_cache`` must be False in training (HF ``Trainer`` sets it from ``TrainingArguments.use_cache``,
    False by default; with a cache the examples of a row would see each other). Each padding
    token of a packed row gets position id 0, so each is a block of its own that nothing else attends to; as every
    example has at least two tokens (one trained after the first), the trailing zeros of ``position_ids`` are
    exactly the padding, which is how ``count_real_tokens`` counts packed batches. A model whose attention ignores
    ``position_ids`` for masking would attend across examples; the loss mask would still hold.

Malformed rows
    Bad JSON, a row that is not an object, a missing field, a wrong type, an empty text or completion, empty
    messages, an unknown role or no assistant turn raise ``DataError("<file>:<line>: <problem>")``. With
    ``maxMalformedRows`` N > 0 such rows are skipped, counted and logged with their location, and the
    (N + 1)-th raises. ``DataStats`` holds the counts for metrics and result.json.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from finetune_trainer.config import DatasetConfig
from finetune_trainer.data_rows import (
    DataError,
    MalformedRow,
    chat_messages,
    describe,
    string_field,
)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

TokenArray = npt.NDArray[np.int32]
# A piece of an example before tokenization: text (or one literal token id) and whether it is trained.
Segment = tuple[str | int, bool]
# A data file, the name its rows are reported under (the URI it came from) and its ETag there (storage's
# PulledFile); a bare Path is named by itself.
DataFile = Path | tuple[Path, str] | tuple[Path, str, str | None]


def file_and_name(item: DataFile) -> tuple[Path, str]:
    if isinstance(item, tuple):
        return Path(item[0]), item[1]
    return Path(item), str(item)


@dataclass
class DataStats:
    """Counts for metrics and result.json (``to_dict`` gives them camelCase names).

    ``rows``: rows read, malformed ones included; ``skipped``: malformed rows skipped under maxMalformedRows;
    ``examples``: usable rows (train + eval); ``truncated``: examples cut at maxSeqLength; ``dropped_untrained``:
    examples dropped because truncation left no trained token; ``tokens`` / ``trained_tokens``: real (non-pad)
    tokens of all examples and those that carry a loss; ``train_tokens``: real tokens of the training split;
    ``*_sequences``: dataset rows after packing (the examples themselves without packing).
    """

    files: int = 0
    rows: int = 0
    skipped: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_untrained: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    train_tokens: int = 0
    train_sequences: int = 0
    eval_sequences: int = 0

    def to_dict(self) -> dict[str, int]:
        names = {
            "files": "files",
            "rows": "rows",
            "skipped": "skippedRows",
            "examples": "examples",
            "truncated": "truncatedExamples",
            "dropped_untrained": "droppedUntrainedExamples",
            "tokens": "tokens",
            "trained_tokens": "trainedTokens",
            "train_examples": "trainExamples",
            "eval_examples": "evalExamples",
            "train_tokens": "trainTokens",
            "train_sequences": "trainSequences",
            "eval_sequences": "evalSequences",
        }
        return {camel: getattr(self, name) for name, camel in names.items()}


@dataclass
class MalformedBudget:
    limit: int
    skipped: int = 0
    locations: list[str] = field(default_factory=list)

    def reject(self, location: str, problem: str) -> None:
        if self.limit == 0:
            raise DataError(f"{location}: {problem}")
        self.skipped += 1
        if self.skipped > self.limit:
            raise DataError(
                f"{location}: {problem} ({self.skipped} malformed rows, more than dataset.maxMalformedRows = "
                f"{self.limit})"
            )
        log.warning("%s: %s; skipped (%d of at most %d)", location, problem, self.skipped, self.limit)


# ---------------------------------------------------------------------------------------------------------------
# Rows into segments and tokens


class ExampleBuilder:
    """Turns rows of one format into tokenized examples (``input_ids``, ``labels``) for one tokenizer."""

    def __init__(self, tokenizer: Any, dataset: DatasetConfig, max_seq_length: int) -> None:
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.max_seq_length = max_seq_length
        self.eos_id: int | None = tokenizer.eos_token_id
        self.use_template = dataset.format == "chat" and bool(getattr(tokenizer, "chat_template", None))
        probe = tokenizer("a")["input_ids"]
        bos = tokenizer.bos_token_id
        self.bos: list[int] = [bos] if bos is not None and probe[:1] == [bos] and not self.use_template else []

    @property
    def columns(self) -> list[str]:
        d = self.dataset
        if d.format == "text":
            return [d.textField]
        if d.format == "promptCompletion":
            return [d.promptField, d.completionField]
        return [d.messagesField]

    def segments(self, row: Any) -> list[Segment]:
        """The row's pieces, or ``MalformedRow`` saying what is wrong with it."""
        if not isinstance(row, dict):
            raise MalformedRow(f"expected a JSON object, got {describe(row)}")
        d = self.dataset
        eos: list[Segment] = [(self.eos_id, True)] if self.eos_id is not None else []
        if d.format == "text":
            return [(string_field(row, d.textField, allow_empty=False), True), *eos]
        if d.format == "promptCompletion":
            prompt = string_field(row, d.promptField, allow_empty=True)
            completion = string_field(row, d.completionField, allow_empty=False)
            return [(prompt, False), (completion, True), *eos]
        messages = chat_messages(row, d.messagesField)
        if self.use_template:
            return self._template_segments(messages)
        pieces: list[Segment] = []
        for message in messages:
            header = f"<|{message['role']}|>\n"
            if message["role"] == "assistant":
                pieces += [(header, False), (message["content"], True), *eos]
            else:
                pieces.append((header + message["content"] + "\n", False))
        return pieces

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja2 errors and the template's own raise_exception()
            raise MalformedRow(f"the tokenizer's chat template failed: {exc}") from None
        return str(text)

    def _template_segments(self, messages: list[dict[str, str]]) -> list[Segment]:
        full = self._render(messages, False)
        pieces: list[Segment] = []
        done = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            turn = self._render(messages[: i + 1], False)
            if i == 0:
                # Templates refuse to render an empty conversation; the turn starts where its content does.
                start = turn.find(message["content"]) if message["content"] else len(turn)
                consistent = start >= 0
            else:
                prompt = self._render(messages[:i], True)
                start = len(prompt)
                consistent = turn.startswith(prompt)
            end = len(turn)
            if not consistent or not full.startswith(turn) or start < done or end <= start:
                raise MalformedRow(
                    f"cannot locate assistant turn messages[{i}]: the tokenizer's chat template does not render "
                    "the conversation prefix by prefix"
                )
            pieces += [(full[done:start], False), (full[start:end], True)]
            done = end
        pieces.append((full[done:], False))
        return [piece for piece in pieces if piece[0] != ""]

    def encode(self, rows: list[list[Segment]]) -> list[tuple[list[int], list[int]]]:
        """Token ids and labels of many rows' segments, with one batched tokenizer call."""
        texts = [text for segments in rows for text, _ in segments if isinstance(text, str)]
        encoded = iter(self._token_ids(texts)) if texts else iter(())
        result = []
        for segments in rows:
            ids = list(self.bos)
            labels = [IGNORE_INDEX] * len(ids)
            for text, trained in segments:
                piece = next(encoded) if isinstance(text, str) else [text]
                ids += piece
                labels += piece if trained else [IGNORE_INDEX] * len(piece)
            result.append((ids, labels))
        return result


    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids without special tokens. The backend is called directly: transformers' wrapper spends
        more time turning each result into Python than the backend spends tokenizing. One call through the wrapper
        first leaves the backend set up as the wrapper would use it (no truncation or padding, its handling of
        special tokens), so the ids are the wrapper's."""
        first: list[list[int]] = self.tokenizer(texts[:1], add_special_tokens=False)["input_ids"]
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return first + list(self.tokenizer(texts[1:], add_special_tokens=False)["input_ids"])
        return first + [encoding.ids for encoding in backend.encode_batch(texts[1:], add_special_tokens=False)]


# ---------------------------------------------------------------------------------------------------------------
# Batches


class PaddingCollator:
    """Right-pads a batch: pad id on inputs, -100 on labels; an attention mask, or position ids when packed."""

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = "position_ids" in features[0]
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        extra = torch.zeros((len(features), width), dtype=torch.long)
        for row, (feature, n) in enumerate(zip(features, lengths, strict=True)):
            input_ids[row, :n] = torch.as_tensor(np.asarray(feature["input_ids"], dtype=np.int64))
            labels[row, :n] = torch.as_tensor(np.asarray(feature["labels"], dtype=np.int64))
            if packed:
                extra[row, :n] = torch.as_tensor(np.asarray(feature["position_ids"], dtype=np.int64))
            else:
                extra[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels}
        batch["position_ids" if packed else "attention_mask"] = extra
        return batch


def count_real_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Non-padding tokens of a batch from ``PaddingCollator``: its attention mask, or for a packed batch the tokens
    before each row's trailing run of zero position ids."""
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum())
    positions = batch["position_ids"]
    width = positions.shape[1]
    # Index of the last non-zero position per row (-1 when none): everything after it is padding.
    columns = torch.arange(width).expand_as(positions)
    last = torch.where(positions != 0, columns, torch.full_like(columns, -1)).max(dim=1).values
    return int((last + 1).sum())

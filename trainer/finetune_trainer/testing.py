"""Tiny models, tokenizers and text built locally (nothing downloaded) for the tests, the demo and the benchmarks,
and the trainer's fault-injection hooks.

``build_tiny_model`` trains a byte-level BPE tokenizer on the given texts and saves it beside a freshly initialised
GPT-2 (safetensors) with ``save_pretrained``, so ``AutoModelForCausalLM.from_pretrained(dir)`` and
``AutoTokenizer.from_pretrained(dir)`` load it with ``HF_HUB_OFFLINE=1``. The tokenizer knows the special tokens of
the trainer's default chat template (``<|system|>``, ``<|user|>``, ``<|assistant|>``), ``<|endoftext|>`` (bos, eos,
unk) and a separate ``<|pad|>``. ``pretrain_briefly`` gives it a few dozen steps of plain causal-LM training so a
fine-tune starts from a model that has seen text; ``generic_corpus`` and ``toy_chat_rows`` make deterministic text
and chat data.

Fault injection (tests only; never set in production): ``FINETUNE_TEST_CORRUPT_EXPORT=<file name>`` makes the
trainer damage ``<output.uri>/model/<file name>`` in storage after exporting it and before verifying it
(``corrupt_stored_file``): a NaN is written into the first floating-point tensor of a ``.safetensors`` file, and
any other file has its first bytes overwritten. It proves the export check catches what it claims to.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetune_trainer.storage import ObjectStore

# Fault injection: the exported file to damage between export and verification (see the module docstring).
CORRUPT_EXPORT_ENV = "FINETUNE_TEST_CORRUPT_EXPORT"
# The little-endian bytes of a NaN in each floating-point dtype safetensors stores.
_NAN_BYTES = {"F32": b"\x00\x00\xc0\x7f", "F16": b"\x00\x7e", "BF16": b"\xc0\x7f", "F64": b"\x00" * 6 + b"\xf8\x7f"}

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CHAT_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

_SUBJECTS = (
    "the farmer, a small robot, the old captain, my neighbour, the river, a quiet student, the baker, our "
    "teacher, the wind, a curious cat, the engineer, the city, a tall tree, the painter, the train, a "
    "young doctor"
).split(", ")
_VERBS = (
    "carried, painted, watched, built, found, followed, opened, counted, measured, remembered, visited, "
    "cleaned, described, repaired, planted, answered"
).split(", ")
_OBJECTS = (
    "a heavy box, the blue door, seven apples, the morning light, a long letter, the broken clock, an "
    "empty road, the green field, a wooden bridge, the last question, three red birds, the warm bread, a "
    "paper map, the distant hills, a silver key, the evening news"
).split(", ")
_ENDINGS = (
    "before the rain started, after a long day, with great care, near the harbour, without a word, in the "
    "early morning, for the whole village, under the bright stars, at the end of the week, because it was "
    "needed, while everyone slept, on the way home"
).split(", ")
_CAPITALS = [
    tuple(pair.split(":"))
    for pair in (
        "France:Paris, Italy:Rome, Spain:Madrid, Japan:Tokyo, Egypt:Cairo, Canada:Ottawa, Kenya:Nairobi, "
        "Peru:Lima, Norway:Oslo, Chile:Santiago, India:New Delhi, Ghana:Accra"
    ).split(", ")
]


def generic_corpus(n_lines: int = 2000, *, seed: int = 0) -> list[str]:
    """Deterministic English-like sentences (one to three per line) for tokenizer training and pre-training."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        sentences = []
        for _ in range(rng.randint(1, 3)):
            sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}."
            sentences.append(sentence[0].upper() + sentence[1:])
        lines.append(" ".join(sentences))
    return lines


def toy_chat_rows(n_rows: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """Deterministic chat rows of varied length: capitals, sums and retold sentences; some with a system turn."""
    rng = random.Random(seed)
    corpus = generic_corpus(n_rows, seed=seed + 1)
    rows: list[dict[str, Any]] = []
    for i in range(n_rows):
        kind = rng.randrange(3)
        if kind == 0:
            country, capital = rng.choice(_CAPITALS)
            question, answer = f"What is the capital of {country}?", f"The capital of {country} is {capital}."
        elif kind == 1:
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            question, answer = f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
        else:
            question, answer = "Tell me a short story.", corpus[i]
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": "You are a helpful assistant."})
        rows.append({"messages": messages})
    return rows


def build_tiny_model(
    out_dir: str | Path,
    *,
    texts: list[str],
    vocab_size: int = 512,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_positions: int = 256,
    seed: int = 0,
    chat_template: str | None = None,
) -> Path:
    """Train a tokenizer on ``texts``, build a GPT-2 of the given shape and save both into ``out_dir``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = [EOS_TOKEN, PAD_TOKEN, *CHAT_ROLE_TOKENS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(CHAT_ROLE_TOKENS),
        model_max_length=n_positions,
    )  # type: ignore[no-untyped-call]
    if chat_template is not None:
        tokenizer.chat_template = chat_template

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def pretrain_briefly(
    model_dir: str | Path,
    texts: list[str],
    steps: int = 40,
    *,
    seq_length: int = 64,
    batch_size: int = 8,
    learning_rate: float = 3e-3,
    seed: int = 0,
) -> list[float]:
    """Plain causal-LM training on ``texts`` for ``steps`` steps, saved back in place; returns the losses."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    n_blocks = len(ids) // seq_length
    if n_blocks < 1:
        raise ValueError(f"{len(ids)} tokens of text are fewer than one block of {seq_length}")
    blocks = torch.tensor(ids[: n_blocks * seq_length]).view(n_blocks, seq_length)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    model.train()
    losses = []
    for _ in range(steps):
        batch = blocks[torch.randint(0, n_blocks, (batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    model.save_pretrained(model_dir)
    return losses


def corrupt_bytes(name: str, data: bytes) -> bytes:
    """``data`` damaged: a NaN as the first value of the first floating-point tensor of a safetensors file, the
    first 16 bytes overwritten in any other file."""
    import json
    import struct

    if name.endswith(".safetensors") and len(data) > 8:
        header_size = struct.unpack("<Q", data[:8])[0]
        header = json.loads(data[8 : 8 + header_size])
        for key, entry in sorted(header.items(), key=lambda item: str(item[0])):
            if key != "__metadata__" and entry.get("dtype") in _NAN_BYTES:
                start = 8 + header_size + int(entry["data_offsets"][0])
                nan = _NAN_BYTES[entry["dtype"]]
                return data[:start] + nan + data[start + len(nan) :]
    return b"\xff" * min(16, len(data)) + data[16:]


def corrupt_stored_file(store: ObjectStore, key: str) -> None:
    """Damage the object ``key`` in ``store`` in place (``corrupt_bytes``); a missing object is an error."""
    store.put_bytes(key, corrupt_bytes(key, store.get_bytes(key)))

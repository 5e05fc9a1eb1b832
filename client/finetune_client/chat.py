"""Answering prompts with a job's exported model: transformers and torch are imported here, only when asked for.

An ``adapter`` export is merged into its base model (``merge_and_unload``) after loading, so chatting and a merged
pull behave as the ``merged`` export would. Prompts are rendered with the tokenizer's chat template, which the
trainer saves with the model (its default template when the base tokenizer had none), so a prompt looks as the
training conversations did; a model trained without a chat template gets the prompt as plain text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter(model_dir: Path) -> bool:
    return (model_dir / ADAPTER_CONFIG).is_file()


def adapter_settings(model_dir: Path) -> str:
    """An adapter export's rank, alpha and target modules as its adapter_config.json gives them."""
    config = json.loads((model_dir / ADAPTER_CONFIG).read_text())
    modules = config.get("target_modules") or []
    shown = ",".join(sorted(modules)) if isinstance(modules, list) else str(modules)
    return f"r={config.get('r')}, alpha={config.get('lora_alpha')}, modules {shown}"


def load_model(model_dir: Path, base_model_dir: Callable[[], Path]) -> tuple[Any, Any]:
    """(model, tokenizer) from an exported folder; ``base_model_dir`` fetches the base when it is an adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not is_adapter(model_dir):
        return AutoModelForCausalLM.from_pretrained(model_dir), tokenizer
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_model_dir())
    return PeftModel.from_pretrained(base, model_dir).merge_and_unload(), tokenizer


def save_merged(model_dir: Path, base_model_dir: Callable[[], Path], dest: Path) -> Path:
    """An adapter export merged into its base, saved as a plain model in ``dest``."""
    model, tokenizer = load_model(model_dir, base_model_dir)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def answer(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_new_tokens: int = 128) -> str:
    """One greedy answer to a conversation that ends with the user's turn."""
    import torch

    if tokenizer.chat_template:
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
    else:
        prompt_ids = tokenizer(messages[-1]["content"])["input_ids"]
    with torch.no_grad():
        output = model.generate(
            torch.tensor([list(prompt_ids)]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return str(tokenizer.decode(output[0][len(prompt_ids):], skip_special_tokens=True)).strip()

"""The exported model checked the way it will be used: a fresh process loads ``model/`` back from storage.

After rank 0 has uploaded ``<output.uri>/model/``, ``verify_export`` starts ``python -m finetune_trainer.verify``,
a process that shares nothing with training (no DeepSpeed state, no weights in memory, no torchrun environment).
It lists and downloads ``model/`` with a plain boto3 client (or copies a ``file://`` folder), then:

- reads every ``*.safetensors`` file tensor by tensor and requires every floating-point value to be finite;
- loads the config (``AutoConfig``, or ``PeftConfig`` for an adapter) and the tokenizer (``AutoTokenizer``), and
  requires the tokenizer's vocabulary to fit the model's embeddings;
- loads the model with ``AutoModelForCausalLM.from_pretrained`` (an adapter: the base model, then
  ``PeftModel.from_pretrained``) with no weight missing, unexpected or of the wrong shape;
- answers the evaluation prompts (or one fixed prompt) greedily within ``evaluation.generationTimeoutSeconds``.

It loads on the CPU: the training process, still alive, holds the GPUs. The base model of an adapter comes from
the node cache the run pulled it into (the adapter config names that folder).

It writes its verdict as JSON: ``ok``, ``seconds``, the ``files`` it read, ``tensorsChecked``, the ``answers``,
and on failure ``problem``, a line that starts with the file it concerns (``model/model.safetensors: ...``).
The trainer puts the verdict in result.json as ``verification``; a failed check ends the run with the permanent
exit code and the message ``model verification failed: <problem>``, which the operator turns into the
``ModelVerified=False`` condition.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_trainer.config import EvaluationConfig, StorageConfig, TrainerConfig

if TYPE_CHECKING:
    from finetune_trainer.storage import ObjectStore

log = logging.getLogger(__name__)

# The operator looks for this at the start of rank 0's reason (its constants mirror it).
FAILED_PREFIX = "model verification failed"
# Answered when the job has no evaluation prompts: verification still proves the model generates.
FIXED_PROMPT = "Hello! Who are you?"
# Loading and checking beyond the generation budget (downloads, reading every tensor).
LOAD_BUDGET_S = 900
# The environment torchrun gives a rank: the verifier is a process of its own, not part of the gang.
GANG_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
            "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


class VerificationFailed(Exception):
    """The exported model does not load or is broken; the message starts with the file it concerns."""


# ---- the trainer's side (rank 0) ---------------------------------------------------------------------------------


def check_export(
    config: TrainerConfig, store: ObjectStore, model_uri: str, base_model_dir: Path, prompts: list[str]
) -> dict[str, Any]:
    """The verdict on the exported model (rank 0, after the upload); the fault-injection hook of ``testing``
    damages a file in storage first when its variable is set."""
    from finetune_trainer import export
    from finetune_trainer.testing import CORRUPT_EXPORT_ENV, corrupt_stored_file

    damaged = os.environ.get(CORRUPT_EXPORT_ENV)
    if damaged:
        log.warning("%s=%s: damaging the exported %s before verifying it", CORRUPT_EXPORT_ENV, damaged, damaged)
        corrupt_stored_file(store, f"{export.MODEL_DIR}/{damaged}")
    verdict = verify_export(config, model_uri, export.export_kind(config), base_model_dir, prompts)
    if verdict["ok"]:
        log.info("model verified in %.1f s: %d files, %d tensors, %d answers", verdict["seconds"],
                 len(verdict.get("files", [])), verdict.get("tensorsChecked", 0), len(verdict.get("answers", [])))
    else:
        log.error("%s: %s", FAILED_PREFIX, verdict["problem"])
    return verdict


def verify_export(
    config: TrainerConfig, model_uri: str, export_kind: str, base_model_dir: Path, prompts: list[str]
) -> dict[str, Any]:
    """Run the verifier on the exported model in a fresh process; its verdict (``ok`` False with ``problem`` when
    the check failed or the verifier did not finish)."""
    work = Path(config.local.workDir) / "verify"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    request = {
        "modelUri": model_uri,
        "export": export_kind,
        "baseModelDir": str(base_model_dir),
        "prompts": prompts or [FIXED_PROMPT],
        "evaluation": {k: v for k, v in config.to_dict()["evaluation"].items() if k not in ("prompts", "promptsUri")},
        "storage": config.to_dict()["storage"],
    }
    (work / "request.json").write_text(json.dumps(request))
    env = {k: v for k, v in os.environ.items() if k not in GANG_ENV and not k.startswith("PET_")}
    timeout = LOAD_BUDGET_S + config.evaluation.generationTimeoutSeconds
    started = time.monotonic()
    command = [sys.executable, "-m", "finetune_trainer.verify", "--request", str(work / "request.json"),
               "--out", str(work / "verdict.json"), "--download-dir", str(work / "model")]
    try:
        finished = subprocess.run(command, env=env, timeout=timeout, capture_output=True, text=True, check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "seconds": round(time.monotonic() - started, 3),
                "problem": f"{model_uri}: the check did not finish in {timeout} s"}
    verdict_file = work / "verdict.json"
    if not verdict_file.exists():
        tail = " ".join((finished.stderr or "").strip().splitlines()[-3:])[-500:]
        return {"ok": False, "seconds": round(time.monotonic() - started, 3),
                "problem": f"{model_uri}: the verifier exited {finished.returncode} without a verdict: {tail}"}
    verdict: dict[str, Any] = json.loads(verdict_file.read_text())
    shutil.rmtree(work / "model", ignore_errors=True)
    return verdict


# ---- the verifier (a fresh process) ----------------------------------------------------------------------------


def download_model(model_uri: str, storage: StorageConfig, target: Path) -> list[dict[str, Any]]:
    """Every object under ``model_uri`` into ``target``, as a serving stack fetches it; returns name and size."""
    from finetune_trainer.storage import split_uri

    scheme, bucket, prefix = split_uri(model_uri)
    files: list[dict[str, Any]] = []
    if scheme == "file":
        for path in sorted(p for p in Path(prefix).rglob("*") if p.is_file()):
            relative = path.relative_to(prefix).as_posix()
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / relative)
            files.append({"name": f"model/{relative}", "bytes": path.stat().st_size})
        return files
    import boto3
    from botocore.config import Config

    endpoint = storage.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client = boto3.client("s3", endpoint_url=endpoint, region_name=storage.region or os.environ.get("AWS_REGION"),
                          config=Config(s3={"addressing_style": "path"} if storage.forcePathStyle else None))
    prefix = prefix.rstrip("/") + "/"
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            relative = item["Key"][len(prefix):]
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, item["Key"], str(target / relative))
            files.append({"name": f"model/{relative}", "bytes": int(item["Size"])})
    return files


def check_weights_finite(folder: Path) -> int:
    """Every floating-point value of every safetensors file is finite; returns the tensors read."""
    import torch
    from safetensors import safe_open

    checked = 0
    weight_files = sorted(folder.rglob("*.safetensors"))
    if not weight_files:
        raise VerificationFailed("model/: no *.safetensors weights file")
    for path in weight_files:
        name = f"model/{path.relative_to(folder).as_posix()}"
        try:
            with safe_open(str(path), framework="pt") as weights:
                for key in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensor = weights.get_tensor(key)
                    if tensor.is_floating_point():
                        bad = int((~torch.isfinite(tensor)).sum())
                        if bad:
                            raise VerificationFailed(f"{name}: tensor {key} has {bad} non-finite values (NaN/Inf)")
                    checked += 1
        except VerificationFailed:
            raise
        except Exception as exc:  # a damaged header or a truncated file
            raise VerificationFailed(f"{name}: not a readable safetensors file: {exc}") from exc
    return checked


def load_exported(folder: Path, export_kind: str, base_model_dir: str) -> tuple[Any, Any]:
    """(model, tokenizer) loaded with stock transformers (and peft for an adapter), each failure naming a file."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config_name = "adapter_config.json" if export_kind == "adapter" else "config.json"
    try:
        if export_kind == "adapter":
            from peft import PeftConfig

            PeftConfig.from_pretrained(str(folder))
        else:
            AutoConfig.from_pretrained(str(folder))
    except Exception as exc:
        raise VerificationFailed(f"model/{config_name}: does not load: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise VerificationFailed(f"model/tokenizer.json: the tokenizer does not load: {exc}") from exc
    weights = "adapter_model.safetensors" if export_kind == "adapter" else "model.safetensors"
    try:
        if export_kind == "adapter":
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype="auto")
            model = PeftModel.from_pretrained(base, str(folder))
        else:
            loaded: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto", output_loading_info=True)
            model, info = loaded
            wrong = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys",
                                                                     "mismatched_keys")}
            if any(wrong.values()):
                found = "; ".join(f"{kind.replace('_', ' ')}: {', '.join(map(str, keys[:5]))}"
                                  for kind, keys in wrong.items() if keys)
                raise VerificationFailed(f"model/{weights}: {found}")
    except VerificationFailed:
        raise
    except Exception as exc:
        raise VerificationFailed(f"model/{weights}: the model does not load: {exc}") from exc
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise VerificationFailed(f"model/tokenizer.json: {len(tokenizer)} tokens but the model's embeddings have "
                                 f"{rows} rows")
    return model, tokenizer


def run_verification(request: dict[str, Any], download_dir: Path) -> dict[str, Any]:
    """The verdict on the model ``request`` names (see the module's docstring)."""
    from finetune_trainer.config import _from_dict
    from finetune_trainer.samples import answer_prompts

    started = time.monotonic()
    verdict: dict[str, Any] = {"ok": False, "files": [], "tensorsChecked": 0, "answers": []}
    try:
        storage = _from_dict(StorageConfig, request.get("storage") or {}, "storage")
        try:
            verdict["files"] = download_model(request["modelUri"], storage, download_dir)
        except Exception as exc:
            raise VerificationFailed(f"{request['modelUri']}: download failed: {exc}") from exc
        if not verdict["files"]:
            raise VerificationFailed(f"{request['modelUri']}: no files")
        verdict["tensorsChecked"] = check_weights_finite(download_dir)
        model, tokenizer = load_exported(download_dir, request["export"], request["baseModelDir"])
        # Greedy, whatever the job samples with: a verdict must not depend on chance.
        evaluation = _from_dict(EvaluationConfig, {**request.get("evaluation", {}), "sampling": False}, "evaluation")
        answers = answer_prompts(model, tokenizer, list(request["prompts"]), evaluation, None)
        verdict["answers"] = [{"prompt": a.prompt, "answer": a.answer, **({"truncated": True} if a.truncated else {})}
                              for a in answers]
        if answers and not any(a.answer or not a.truncated for a in answers):
            raise VerificationFailed("model/: generated nothing within evaluation.generationTimeoutSeconds")
        verdict["ok"] = True
    except VerificationFailed as exc:
        verdict["problem"] = str(exc)
    verdict["seconds"] = round(time.monotonic() - started, 3)
    return verdict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_trainer.verify",
                                     description="Load an exported model back from storage and check it.")
    parser.add_argument("--request", required=True, help="JSON: modelUri, export, baseModelDir, prompts, ...")
    parser.add_argument("--out", required=True, help="where the verdict (JSON) is written")
    parser.add_argument("--download-dir", default=None, help="where model/ is downloaded (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s verify %(levelname)s %(name)s: %(message)s")
    request = json.loads(Path(args.request).read_text())
    with tempfile.TemporaryDirectory() as scratch:
        target = Path(args.download_dir) if args.download_dir else Path(scratch)
        target.mkdir(parents=True, exist_ok=True)
        verdict = run_verification(request, target)
    Path(args.out).write_text(json.dumps(verdict))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The README's demo: a tiny FineTuneJob end to end on the local cluster, with a live progress bar.

Steps: start the local cluster (API server, kubelet, SeaweedFS, Prometheus when installed, the real operator);
build a tiny GPT-2 base model (tokenizer trained locally, a short pre-training on generic text; cached in
``.cache/demo`` so a second run skips it) and upload it and ``examples/data/customer-support.jsonl`` to S3;
apply ``examples/tiny-cpu.yaml`` with ``spec.tracking.mlflow`` pointing at the local MLflow server; follow the job's
status until it succeeds; print where the model and checkpoints are, the eval loss before and after, the MLflow
run's URL and an answer from the fine-tuned model; stop everything.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from localcluster.cluster import REPO, ClusterError, LocalCluster

EXAMPLE = REPO / "examples" / "tiny-cpu.yaml"
DATASET = REPO / "examples" / "data" / "customer-support.jsonl"
CACHE = REPO / ".cache" / "demo"
BASE_MODEL_CACHE = CACHE / "tiny-gpt2"
QUESTION = "Hello, I want to return my headphones. - Sam"
EXPERIMENT = "finetune-demo"
REGISTERED_MODEL = "tiny-cpu-support"


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def build_base_model() -> Path:
    """The tiny pre-trained base model, built once and cached."""
    marker = BASE_MODEL_CACHE / ".pretrained"
    if marker.exists():
        say(f"base model: reusing {BASE_MODEL_CACHE.relative_to(REPO)} (delete it to rebuild)")
        return BASE_MODEL_CACHE
    from finetune_trainer.testing import build_tiny_model, generic_corpus, pretrain_briefly

    started = time.monotonic()
    shutil.rmtree(BASE_MODEL_CACHE, ignore_errors=True)
    corpus = generic_corpus(3000, seed=0)
    chat_text = [m["content"] for line in DATASET.read_text().splitlines() for m in json.loads(line)["messages"]]
    # The tokenizer sees generic and support text (a base model's vocabulary is broad); the weights see
    # only generic text, so what the model knows about customer support comes from the fine-tune.
    build_tiny_model(
        BASE_MODEL_CACHE, texts=corpus + chat_text, vocab_size=1024, n_layer=2, n_embd=64, n_head=2, n_positions=256
    )
    losses = pretrain_briefly(BASE_MODEL_CACHE, corpus, steps=150, seq_length=64, batch_size=16)
    marker.write_text(json.dumps({"pretrain_loss_first": losses[0], "pretrain_loss_last": losses[-1]}))
    say(
        f"base model: GPT-2 (2 layers, 64 dims) pre-trained 150 steps on generic text, loss "
        f"{losses[0]:.2f} -> {losses[-1]:.2f} ({time.monotonic() - started:.0f} s)"
    )
    return BASE_MODEL_CACHE


def upload_inputs(cluster: LocalCluster, base_model: Path) -> None:
    client = cluster.s3.client()
    for bucket in ("models", "datasets", "finetune-output"):
        cluster.s3.create_bucket(bucket)
    for path in sorted(base_model.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            client.upload_file(str(path), "models", f"tiny-gpt2/{path.name}")
    client.upload_file(str(DATASET), "datasets", "customer-support/customer-support.jsonl")
    rows = sum(1 for _ in DATASET.open())
    say(f"uploaded the base model to s3://models/tiny-gpt2/ and {rows} conversations to s3://datasets/")


def tracked_example(cluster: LocalCluster) -> dict[str, Any]:
    """The example job with spec.tracking.mlflow naming the local tracking server."""
    import yaml

    job: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    if cluster.mlflow is not None:
        job["spec"]["tracking"] = {"mlflow": {"trackingUri": cluster.mlflow.url, "experiment": EXPERIMENT,
                                              "registerModelAs": REGISTERED_MODEL}}
    return job


def bar(status: dict[str, Any], width: int = 30) -> str:
    progress = status.get("progress", {})
    metrics = status.get("metrics", {})
    percent = float(progress.get("percent", 0.0))
    filled = int(width * percent / 100)
    loss = metrics.get("loss")
    parts = [
        f"[{'#' * filled}{'.' * (width - filled)}]",
        f"{progress.get('step', 0)}/{progress.get('totalSteps', '?')}",
        f"{percent:5.1f}%",
        f"loss {loss:.3f}" if isinstance(loss, int | float) else "loss -",
        f"eta {progress.get('eta', '-')}",
        status.get("phase", "Pending"),
    ]
    return "  ".join(parts)


def follow(cluster: LocalCluster, name: str, timeout: float = 900) -> dict[str, Any]:
    """Draw the progress bar from the FineTuneJob's status until the job finishes."""
    interactive = sys.stdout.isatty()
    deadline = time.monotonic() + timeout
    last_line = ""
    last_print = 0.0
    while time.monotonic() < deadline:
        job = cluster.get_job(name)
        status = job.get("status", {})
        line = bar(status)
        if interactive:
            print(f"\r{line}\033[K", end="", flush=True)
        elif line != last_line and time.monotonic() - last_print > 5:
            print(line, flush=True)
            last_print = time.monotonic()
        last_line = line
        if status.get("phase") in ("Succeeded", "Failed"):
            if interactive:
                print()
            else:
                print(line, flush=True)
            return job
        time.sleep(1)
    raise ClusterError(f"the job did not finish in {timeout:.0f} s")


def answer(model_dir: Path, question: str) -> str:
    """One greedy answer from the fine-tuned model, prompted the way the trainer renders chats."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune_trainer.data import DEFAULT_CHAT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    system = json.loads(DATASET.read_text().splitlines()[0])["messages"][0]["content"]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    # The trainer renders chats with the tokenizer's template, or its documented default when there is none.
    template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    prompt_ids = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    import torch

    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=60,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return str(tokenizer.decode(output[0][len(prompt_ids) :], skip_special_tokens=True)).strip()


def run(keep: bool = False) -> int:
    started = time.monotonic()
    base_model = build_base_model()
    work_dir = Path(tempfile.mkdtemp(prefix="finetune-demo-"))
    say(f"starting the local cluster in {work_dir}")
    try:
        with LocalCluster(work_dir, with_mlflow=True) as cluster:
            say(
                f"Kubernetes {cluster.control_plane.version if cluster.control_plane else '?'} at {cluster.url}, "
                f"S3 {cluster.s3.endpoint_url}, "
                f"kubeconfig {cluster.kubeconfig}"
                + (f", Prometheus {cluster.prometheus.url}" if cluster.prometheus else "")
                + (f", MLflow {cluster.mlflow.url}" if cluster.mlflow else "")
            )
            upload_inputs(cluster, base_model)
            say(f"kubectl apply -f {EXAMPLE.relative_to(REPO)}, tracked in the MLflow experiment {EXPERIMENT}")
            print(cluster.kubectl("apply", "-f", "-", input=json.dumps(tracked_example(cluster))).strip(), flush=True)
            job = follow(cluster, "tiny-cpu")
            print(cluster.kubectl("get", "ftj").rstrip(), flush=True)
            status = job["status"]
            if status.get("phase") != "Succeeded":
                say(f"the job failed: {status.get('message', '')}")
                for pod in cluster.pods("tiny-cpu"):
                    print(cluster.pod_log(pod["metadata"]["name"])[-3000:])
                return 1
            return report(cluster, status, started)
    finally:
        if keep:
            say(f"kept {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)


def report(cluster: LocalCluster, status: dict[str, Any], started: float) -> int:
    client = cluster.s3.client()
    prefix = "tiny-cpu/"
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket="finetune-output", Prefix=prefix)
        for o in page.get("Contents", [])
    ]
    checkpoints = sorted({k.split("/")[2] for k in keys if k.startswith(f"{prefix}checkpoints/")})
    result = json.loads(client.get_object(Bucket="finetune-output", Key=f"{prefix}result.json")["Body"].read())
    model_uri = status.get("model", {}).get("uri", "s3://finetune-output/tiny-cpu/model/")
    say(f"model:       {model_uri}  ({sum(1 for k in keys if k.startswith(prefix + 'model/'))} files)")
    say(f"checkpoints: s3://finetune-output/{prefix}checkpoints/  {', '.join(checkpoints)}")
    before, after = result.get("evalLossBefore"), result.get("evalLossAfter")
    if isinstance(before, int | float) and isinstance(after, int | float):
        say(
            f"eval loss:   {before:.3f} before fine-tuning -> {after:.3f} after ({result.get('steps')} steps, "
            f"{result.get('tokensSeen', 0)} tokens, {result.get('wallTimeSeconds', 0):.0f} s in the trainer)"
        )
    else:
        say(f"result.json: {json.dumps(result)}")
    tracking = status.get("tracking") or {}
    if tracking.get("url"):
        say(f"MLflow run:  {tracking['url']}  (params, loss curve, result.json; model {REGISTERED_MODEL} registered)")
    model_dir = Path(tempfile.mkdtemp(prefix="finetune-demo-model-"))
    try:
        for key in keys:
            if key.startswith(f"{prefix}model/"):
                target = model_dir / key[len(prefix) + len("model/") :]
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file("finetune-output", key, str(target))
        say(f"question:    {QUESTION}")
        say(f"answer:      {answer(model_dir, QUESTION)}")
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    say(f"done in {time.monotonic() - started:.0f} s; stopping the local cluster")
    return 0

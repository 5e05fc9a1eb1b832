"""The trainer end to end on SeaweedFS: distributed ZeRO-2, LoRA exports, two nodes, the metrics endpoint."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from trainer_helpers import (
    TrainerSetup,
    free_metrics_port,
    free_port,
    metric_value,
    scrape,
    tiny_assets,
)

from finetune_trainer import exit_codes
from finetune_trainer.metrics import bind_address
from localcluster.prometheus import Pushgateway, pushgateway_available

pytestmark = pytest.mark.integration


def load_and_generate(model_dir: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    prompt = tokenizer("What is the capital of France?", return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[1] > prompt["input_ids"].shape[1]
    return str(tokenizer.decode(output[0]))


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[Pushgateway | None]:
    """A Pushgateway where one is installed (Debian's prometheus-pushgateway), else None."""
    if not pushgateway_available():
        yield None
        return
    with Pushgateway(tmp_path / "pushgateway") as gateway:
        yield gateway


def test_two_ranks_zero2_chat_trains_exports_and_serves_metrics(
    setup: TrainerSetup, tmp_path: Path, pushgateway: Pushgateway | None
) -> None:
    port = free_metrics_port()
    metrics = {"port": port, **({"pushgateway": pushgateway.url} if pushgateway else {})}
    config = setup.write_config(training={"maxSteps": 30}, metrics=metrics)
    url = f"http://{bind_address()}:{port}/metrics"
    steps: list[float] = []
    losses: list[float] = []
    other_rank: list[str] = []

    launched = setup.start_launcher(config, setup.env(nproc=2))

    def watch() -> None:
        while launched.process.poll() is None:
            text = scrape(url)
            if text:
                step = metric_value(text, "finetune_step")
                loss = metric_value(text, "finetune_train_loss")
                if step is not None and (not steps or step != steps[-1]):
                    steps.append(step)
                if loss is not None and math.isfinite(loss):
                    losses.append(loss)
            if not other_rank:
                other_rank.extend(filter(None, [scrape(f"http://{bind_address()}:{port + 1}/metrics")]))

    scraper = threading.Thread(target=watch, daemon=True)
    scraper.start()
    code = launched.wait()
    scraper.join(5)

    assert code == exit_codes.SUCCESS, launched.log()[-4000:]
    result = setup.result()
    assert result["steps"] == 30
    assert result["worldSize"] == 2
    assert result["evalLossAfter"] < result["evalLossBefore"]
    assert result["tokensSeen"] > 0
    # The history: a training line every logEvery (2) steps, an evaluation at 0, every evalEvery (10) and the end.
    history = [json.loads(line) for line in setup.s3.get_object(Bucket=setup.bucket, Key="run/history.jsonl")[
        "Body"].read().decode().splitlines()]
    assert [e["step"] for e in history if "loss" in e] == list(range(2, 31, 2)), history
    assert [e["step"] for e in history if "evalLoss" in e] == [0, 10, 20, 30], history
    assert all(e["tokensPerSecond"] > 0 and e["learningRate"] >= 0 for e in history if "loss" in e), history
    assert history[-1]["evalLoss"] == pytest.approx(result["evalLossAfter"])
    model_keys = setup.keys("run/model/")
    assert {"run/model/model.safetensors", "run/model/config.json", "run/model/tokenizer.json"} <= set(model_keys)
    load_and_generate(setup.download("run/model/", tmp_path / "exported"))
    # Retention: the newest two complete checkpoints plus the best (here the newest, step 30).
    assert sorted(setup.complete_checkpoints()) == [20, 30]
    manifest = setup.complete_checkpoints()[30]
    shards = [f["path"] for f in manifest["files"] if "optim_states" in f["path"]]
    assert len(shards) == 2 and manifest["worldSize"] == 2
    # The endpoint was scraped while training ran: the step went up and a loss was reported.
    assert len(steps) >= 2 and steps == sorted(steps), steps
    assert losses, "no finite finetune_train_loss was scraped"
    assert other_rank and 'rank="1"' in other_rank[0] and 'job_name="test"' in other_rank[0]
    # The data was prepared once for both ranks: one preparation in the log, one prepared dataset on the node.
    assert launched.log().count("data_prepare: prepared ") == 1, launched.log()[-4000:]
    assert len([p for p in (setup.root / "node0" / "cache" / "prepared").iterdir() if p.is_dir()]) == 1
    if pushgateway is not None:
        # Rank 0 pushed its final numbers, grouped by job, namespace and attempt, so they outlive the pods.
        pushed = scrape(pushgateway.url + "/metrics") or ""
        finished = [line for line in pushed.splitlines() if line.startswith("finetune_finished_timestamp_seconds{")]
        assert len(finished) == 1 and float(finished[0].split()[-1]) > 0, pushed[-2000:]
        assert 'job="test"' in finished[0] and 'namespace="tests"' in finished[0] and 'attempt="0"' in finished[0]
        assert metric_value(pushed, "finetune_step") == 30


# peft 0.21 still calls transformers' deprecated is_gradient_checkpointing when loading an adapter.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("export", ["adapter", "merged"])
def test_lora_exports_load(
    setup: TrainerSetup, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, export: str
) -> None:
    config = setup.write_config(
        training={"method": "lora", "lora": {"r": 8, "alpha": 16}, "learningRate": 0.01},
        output={"export": export},
        checkpoint={"everySteps": 20},
    )

    launched = setup.run_launcher(config)

    assert launched.returncode == exit_codes.SUCCESS, launched.log()[-4000:]
    result = setup.result()
    assert result["evalLossAfter"] < result["evalLossBefore"]
    exported = setup.download("run/model/", tmp_path / "exported")
    if export == "adapter":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        assert (exported / "adapter_model.safetensors").is_file()
        assert not (exported / "model.safetensors").exists()
        base = AutoModelForCausalLM.from_pretrained(tiny_assets(tmp_path_factory) / "model")
        adapted = PeftModel.from_pretrained(base, exported)
        assert any("lora_A" in name for name, _ in adapted.named_parameters())
    else:
        assert (exported / "model.safetensors").is_file()
        assert not (exported / "adapter_config.json").exists()
        load_and_generate(exported)


def test_two_nodes_with_c10d_rendezvous_train_to_completion(setup: TrainerSetup) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    launched = []
    for node in (0, 1):
        config = setup.write_config(name=f"node{node}.json", node=node)
        env = setup.env(
            nproc=1,
            PET_NNODES="2",
            PET_RDZV_BACKEND="c10d",
            PET_RDZV_ENDPOINT=endpoint,
            PET_RDZV_ID="two-nodes",
        )
        launched.append(setup.start_launcher(config, env, log_name=f"node{node}.log"))

    codes = [run.wait() for run in launched]

    assert codes == [exit_codes.SUCCESS, exit_codes.SUCCESS], "\n".join(run.log()[-3000:] for run in launched)
    # Each node prepared the data once, into its own cache.
    assert [run.log().count("data_prepare: prepared ") for run in launched] == [1, 1]
    result = setup.result()
    assert result["worldSize"] == 2 and result["steps"] == 20
    manifest = setup.complete_checkpoints()[20]
    paths = {f["path"] for f in manifest["files"]}
    # Each node wrote (and uploaded) its own rank's RNG state and ZeRO shard.
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= paths
    assert sum("optim_states" in p for p in paths) == 2

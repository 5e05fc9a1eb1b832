"""What the trainer reports: result.json from the log history, token counting, the metrics endpoint's names."""

from __future__ import annotations

import socket
import urllib.request
from typing import Any

import pytest
import torch
from trainer_factories import make_config
from transformers import TrainerState

from finetune_trainer.export import export_kind, summarize
from finetune_trainer.metrics import TokenCounter, TrainerMetrics


def test_result_shows_the_losses_before_after_and_best() -> None:
    state = TrainerState()
    state.global_step, state.max_steps, state.epoch = 30, 30, 1.5
    state.log_history = [
        {"eval_loss": 6.0, "step": 0},
        {"loss": 5.5, "step": 10},
        {"eval_loss": 4.0, "step": 10},
        {"loss": 4.2, "step": 20},
        {"eval_loss": 4.5, "step": 20},
        {"loss": 4.1, "step": 30},
        {"eval_loss": 4.4, "step": 30},
    ]

    result = summarize(
        make_config(),
        state,
        final_eval=4.4,
        train_loss=4.6,
        tokens_seen=1234,
        wall_seconds=12.5,
        train_seconds=10.0,
        resumed_from=20,
        early_stopped_at=None,
        world_size=2,
        precision="fp32",
    )

    assert result["evalLossBefore"] == 6.0 and result["evalLossAfter"] == 4.4
    assert (result["bestEvalLoss"], result["bestEvalStep"]) == (4.0, 10)
    assert result["trainLoss"] == 4.1 and result["steps"] == 30 and result["resumedFromStep"] == 20
    assert result["model"] == {"uri": "s3://out/run/model/", "export": "full"}


@pytest.mark.parametrize(
    ("training", "output", "kind"),
    [
        ({}, {}, "full"),
        ({"method": "lora"}, {}, "adapter"),
        ({"method": "lora"}, {"export": "merged"}, "merged"),
        ({"method": "lora"}, {"export": "full"}, "merged"),
    ],
)
def test_export_kind(training: dict[str, Any], output: dict[str, Any], kind: str) -> None:
    assert export_kind(make_config(training=training, output=output)) == kind


def test_tokens_count_when_a_step_consumes_the_batch_not_when_it_is_collated() -> None:
    counter = TokenCounter(lambda batch: int(batch["attention_mask"].sum()))
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1, 0]] * 2)}

    counter.collated(batch)
    counter.collated(batch)  # the data loader's look-ahead
    counter.consumed()

    assert (counter.tokens, counter.samples) == (6, 2)


def test_metrics_endpoint_serves_every_documented_name_with_labels() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics = TrainerMetrics(rank=3, job_name="demo", job_namespace="ml")
    metrics.record_eval_loss(2.0)
    metrics.record_eval_loss(2.5)
    metrics.count_s3_bytes("upload", 10)
    url = metrics.serve(port, address="127.0.0.1")
    try:
        assert url is not None
        with urllib.request.urlopen(url, timeout=5) as answer:
            text = answer.read().decode()
    finally:
        metrics.close()

    for name in (
        "finetune_train_loss",
        "finetune_eval_loss",
        "finetune_best_eval_loss",
        "finetune_learning_rate",
        "finetune_step",
        "finetune_total_steps",
        "finetune_epoch",
        "finetune_tokens_per_second",
        "finetune_samples_per_second",
        "finetune_tokens_total",
        "finetune_samples_total",
        "finetune_gpu_memory_bytes",
        "finetune_checkpoint_upload_seconds_bucket",
        "finetune_s3_bytes_total",
        "finetune_last_checkpoint_step",
        "finetune_best_checkpoint_step",
        "finetune_started_timestamp_seconds",
        "finetune_finished_timestamp_seconds",
    ):
        assert f"\n{name}{{" in text, name
    assert 'finetune_best_eval_loss{job_name="demo",job_namespace="ml",rank="3"} 2.0' in text
    assert 'finetune_s3_bytes_total{direction="upload",job_name="demo",job_namespace="ml",rank="3"} 10.0' in text


def test_a_taken_metrics_port_is_not_fatal() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        metrics = TrainerMetrics(rank=0, job_name="demo", job_namespace="ml")

        assert metrics.serve(taken.getsockname()[1], address="127.0.0.1") is None
        metrics.close()

"""Tracking's pure parts: params from the recipe, metric points from log events, which run to log to, and the send
queue's order, batching, retries with backoff and bounds, driven by a fake clock."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer.config import config_from_dict
from finetune_trainer.tracking import (
    MetricPoint,
    SendQueue,
    StoredRun,
    choose_run,
    flatten_params,
    metric_points,
    model_etags,
    read_stored_run,
    run_tags,
    run_url,
)

URI = "http://mlflow:5000"


def make_config(**sections: Any) -> Any:
    document: dict[str, Any] = {
        "model": {"uri": "s3://models/base", "sha256": "a" * 64},
        "dataset": {"uri": "s3://data/train.jsonl"},
        "output": {"uri": "s3://out/job"},
        "training": {"method": "lora", "maxSteps": 100, "lora": {"r": 8, "targetModules": ["q_proj", "v_proj"]}},
        "storage": {"endpoint": "http://s3:8333"},
        "tracking": {"mlflow": {"trackingUri": URI, "experiment": "support"}},
        "job": {"name": "job", "namespace": "ns", "attempt": 2, "uid": "uid-1"},
    }
    document.update(sections)
    return config_from_dict(document)


def test_params_are_the_flattened_recipe() -> None:
    params = flatten_params(make_config())
    assert params["training.lora.r"] == "8"
    assert params["training.lora.targetModules"] == "q_proj,v_proj"
    assert params["training.maxSteps"] == "100" and params["training.learningRate"] == "0.0002"
    assert params["model.sha256"] == "a" * 64 and params["export"] == "adapter"
    # Only the recipe: not where the trainer runs, how it reaches storage or the tracking server itself.
    assert not [key for key in params if key.split(".")[0] in ("storage", "local", "metrics", "tracking", "job")]
    assert "training.epochs" not in params  # absent settings are left out


def test_a_long_param_is_cut_to_mlflow_limit() -> None:
    modules = [f"layer_{i}.proj" for i in range(1000)]
    config = make_config(training={"method": "lora", "maxSteps": 1, "lora": {"targetModules": modules}})
    assert len(flatten_params(config)["training.lora.targetModules"]) == 6000


def test_tags_name_the_job_the_attempt_and_the_weights() -> None:
    tags = run_tags(make_config(), world_size=4, model_etags={"model.safetensors": "abc-2"})
    assert tags["finetune.job.uid"] == "uid-1" and tags["finetune.job.attempt"] == "2"
    assert tags["finetune.model.sha256"] == "a" * 64
    assert tags["finetune.model.etag.model.safetensors"] == "abc-2"
    assert tags["finetune.world_size"] == "4" and tags["finetune.output.uri"] == "s3://out/job"


def test_model_etags_come_from_the_node_cache_record(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    files = {"model.safetensors": {"size": 1, "etag": "e1"}, "config.json": {"size": 1, "etag": "e2"}}
    (tmp_path / "m.complete").write_text(json.dumps({"files": files}))
    assert model_etags(tmp_path / "m") == {"model.safetensors": "e1"}
    assert model_etags(tmp_path / "missing") == {}


@pytest.mark.parametrize(
    ("logs", "expected"),
    [
        pytest.param({"loss": 2.5, "learning_rate": 1e-4, "grad_norm": 1.5, "epoch": 0.5},
                     {"loss": 2.5, "learning_rate": 1e-4, "grad_norm": 1.5, "epoch": 0.5, "tokens_per_second": 900.0},
                     id="training-log-with-throughput"),
        pytest.param({"eval_loss": 1.9, "eval_runtime": 3.0}, {"eval_loss": 1.9}, id="evaluation"),
        pytest.param({"loss": math.nan, "learning_rate": 1e-4}, {"learning_rate": 1e-4, "tokens_per_second": 900.0},
                     id="non-finite-skipped"),
        pytest.param({"train_runtime": 10.0, "train_loss": 2.0}, {}, id="run-summary-ignored"),
    ],
)
def test_metric_points_of_a_log_event(logs: dict[str, float], expected: dict[str, float]) -> None:
    points = metric_points(logs, step=40, now=100.5, tokens_per_second=900.0)
    assert {p.key: p.value for p in points} == expected
    assert all(p.step == 40 and p.timestamp_ms == 100500 for p in points)


@pytest.mark.parametrize(
    ("error_code", "permanent"),
    [
        pytest.param("INVALID_PARAMETER_VALUE", True, id="400-refused"),
        pytest.param("RESOURCE_DOES_NOT_EXIST", True, id="404-not-found"),
        pytest.param("REQUEST_LIMIT_EXCEEDED", False, id="429-throttled"),
        pytest.param("INTERNAL_ERROR", False, id="500-server-error"),
        pytest.param("TEMPORARILY_UNAVAILABLE", False, id="503-unavailable"),
    ],
)
def test_only_refusals_are_permanent(error_code: str, permanent: bool) -> None:
    from mlflow.exceptions import RestException

    from finetune_trainer.tracking_mlflow import is_permanent

    assert is_permanent(RestException({"error_code": error_code, "message": "m"})) is permanent
    assert not is_permanent(ConnectionError("refused"))


def test_run_url_is_the_ui_page() -> None:
    assert run_url("http://mlflow:5000/", "7", "abc") == "http://mlflow:5000/#/experiments/7/runs/abc"


STORED = StoredRun("run-ckpt", "1", URI)


@pytest.mark.parametrize(
    ("stored", "state", "tagged", "expected"),
    [
        pytest.param(STORED, "active", [("run-tag", 5)], "run-ckpt", id="checkpoint-run-wins"),
        pytest.param(None, None, [("run-late", 9), ("run-early", 3)], "run-early", id="oldest-tagged-run"),
        pytest.param(None, None, [], None, id="first-attempt-creates"),
        pytest.param(STORED, "deleted", [], None, id="deleted-run-is-not-revived"),
        pytest.param(STORED, None, [("run-tag", 1)], "run-tag", id="missing-run-falls-back-to-the-tag"),
        pytest.param(StoredRun("run-old", "1", "http://other:5000"), None, [], None, id="another-server"),
        pytest.param(StoredRun("run-ckpt", "1", URI + "/"), "active", [], "run-ckpt", id="trailing-slash-same-server"),
    ],
)
def test_which_run_a_resume_logs_to(
    stored: StoredRun | None, state: str | None, tagged: list[tuple[str, int]], expected: str | None
) -> None:
    assert choose_run(stored, URI, state, tagged).run_id == expected


def test_the_stored_run_round_trips_through_the_checkpoint_folder(tmp_path: Path) -> None:
    (tmp_path / "tracking.json").write_text(STORED.to_json())
    assert read_stored_run(tmp_path) == STORED
    assert read_stored_run(None) is None
    (tmp_path / "tracking.json").write_text("{broken")
    assert read_stored_run(tmp_path) is None


# ---- the send queue, on a fake clock -------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Refused(Exception):
    """Stands for the server answering 400."""


class FlakyServer:
    """Fails the next ``down`` attempts (a connection refused), records what it received."""

    def __init__(self) -> None:
        self.down = 0
        self.batches: list[list[int]] = []
        self.calls: list[str] = []
        self.attempts = 0

    def attempt(self) -> None:
        self.attempts += 1
        if self.down:
            self.down -= 1
            raise ConnectionError("refused")

    def points(self, batch: list[MetricPoint]) -> None:
        self.attempt()
        self.batches.append([p.step for p in batch])

    def call(self, name: str) -> Any:
        def send() -> None:
            self.attempt()
            if name == "bad":
                raise Refused(name)
            self.calls.append(name)
        return send


def points(*steps: int) -> list[MetricPoint]:
    return [MetricPoint("loss", 1.0, step, 0) for step in steps]


def make_queue(server: FlakyServer, clock: FakeClock, **kw: Any) -> tuple[SendQueue, list[tuple[bool | None, int]]]:
    states: list[tuple[bool | None, int]] = []
    queue = SendQueue(server.points, is_permanent=lambda exc: isinstance(exc, Refused),
                      on_state=lambda up, queued: states.append((up, queued)), clock=clock, **kw)
    return queue, states


def drain(queue: SendQueue, clock: FakeClock, limit: int = 100) -> None:
    for _ in range(limit):
        delay = queue.pump()
        if math.isinf(delay):
            return
        clock.now += delay


def test_calls_and_points_go_in_order_with_consecutive_points_batched() -> None:
    server, clock = FlakyServer(), FakeClock()
    queue, _ = make_queue(server, clock, batch_size=3)
    queue.call("start", server.call("start"))
    queue.points(points(1, 2, 3, 4))
    queue.call("artifact", server.call("artifact"))
    queue.points(points(5))
    drain(queue, clock)
    assert server.calls == ["start", "artifact"]
    assert server.batches == [[1, 2, 3], [4], [5]]
    assert queue.report().complete


def test_points_wait_for_company_but_not_behind_a_call_or_at_the_close() -> None:
    server, clock = FlakyServer(), FakeClock()
    queue, _ = make_queue(server, clock, flush_interval=1.0)
    queue.points(points(1))
    assert queue.pump() == math.inf and server.batches == [[1]]
    queue.points(points(2))
    queue.points(points(3))
    assert queue.pump() == pytest.approx(1.0) and server.batches == [[1]]  # a second has not passed
    clock.now += 1.0
    queue.pump()
    queue.points(points(4))
    queue.call("end", server.call("end"))
    queue.pump()  # the call behind the point sends it at once
    assert server.batches == [[1], [2, 3], [4]]


def test_failures_back_off_exponentially_and_nothing_is_lost() -> None:
    server, clock = FlakyServer(), FakeClock()
    queue, states = make_queue(server, clock, initial_backoff=0.5, max_backoff=4.0)
    queue.points(points(1, 2))
    server.down = 5
    waits = []
    for _ in range(7):
        delay = queue.pump()
        if math.isinf(delay):
            break
        waits.append(delay)
        assert queue.pump() == pytest.approx(delay)  # not due yet: no attempt is made
        clock.now += delay
    # 0.5, 1, 2, 4, then capped at 4; the sixth attempt succeeds.
    assert waits == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert server.attempts == 6 and server.batches == [[1, 2]]
    assert states[0] == (False, 2) and states[-1] == (True, 0)


def test_a_refused_call_is_dropped_and_the_rest_goes_on() -> None:
    server, clock = FlakyServer(), FakeClock()
    queue, _ = make_queue(server, clock)
    queue.call("bad", server.call("bad"))
    queue.call("good", server.call("good"))
    drain(queue, clock)
    assert server.calls == ["good"] and queue.queued == 0


def test_a_full_queue_drops_its_oldest_points_and_says_so() -> None:
    server, clock = FlakyServer(), FakeClock()
    queue, _ = make_queue(server, clock, max_points=3)
    queue.call("start", server.call("start"))
    queue.points(points(1, 2, 3, 4, 5))
    report = queue.report()
    assert (report.unsent_points, report.dropped_points, report.unsent_calls) == (3, 2, ["start"])
    assert "2 metric points dropped" in report.describe()
    drain(queue, clock)
    assert server.calls == ["start"] and server.batches == [[3, 4, 5]]


def test_close_gives_up_after_its_timeout_and_reports_what_is_left() -> None:
    server = FlakyServer()
    server.down = 10**6
    queue = SendQueue(server.points, initial_backoff=0.01)
    queue.start()
    queue.points(points(1, 2, 3))
    queue.call("end the run", server.call("end"))
    report = queue.close(0.3, retry_every=0.05)
    assert report.unsent_points == 3 and report.unsent_calls == ["end the run"]
    assert server.attempts >= 2


def test_the_thread_sends_what_is_queued() -> None:
    server = FlakyServer()
    queue = SendQueue(server.points, initial_backoff=0.01)
    queue.start()
    queue.points(points(1))
    queue.call("end", server.call("end"))
    assert queue.close(5.0).complete
    assert server.batches == [[1]] and server.calls == ["end"]

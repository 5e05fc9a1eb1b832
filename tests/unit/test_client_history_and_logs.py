"""The live view's loss curve from history.jsonl and the status, and where the client finds a finished job's logs."""

from __future__ import annotations

import pytest

from finetune_client.cli_run import HISTORY_SECONDS, history_due
from finetune_client.client import parse_history
from finetune_client.job_view import Job
from finetune_client.live_view import Series, render, sparkline
from finetune_client.pod_logs import stored_attempts, stored_log_uri
from finetune_trainer.node_log import log_key


def running(step: int, loss: float | None, eval_loss: float | None = None) -> Job:
    metrics = {"loss": loss, "evalLoss": eval_loss}
    return Job({"metadata": {"name": "bot"}, "status": {
        "phase": "Running", "progress": {"step": step, "totalSteps": 100, "percent": float(step)},
        "metrics": {k: v for k, v in metrics.items() if v is not None}}})


def test_a_long_series_is_drawn_whole_averaged_over_the_width() -> None:
    assert sparkline([4.0, 3.0, 2.0, 1.0], width=4) == "█▆▃▁"
    # 48 falling points over 24 bars: pairs averaged, from the first point's bar to the last's.
    drawn = sparkline([float(v) for v in range(48, 0, -1)], width=24)
    assert len(drawn) == 24 and drawn[0] == "█" and drawn[-1] == "▁"
    assert sparkline([5.0, 5.0, 1.0, 1.0], width=2) == "█▁"
    assert sparkline([float("nan"), 2.0, 1.0]) == "█▁"


def test_a_reattached_view_draws_the_whole_curve_from_the_history_then_the_status() -> None:
    history = [{"step": 0, "evalLoss": 4.0}] + [{"step": s, "loss": 4.0 - s / 10} for s in range(2, 21, 2)]
    history.append({"step": 20, "evalLoss": 2.5})
    series = Series()
    series.seed(history)
    series.observe(running(21, 2.0, 2.5))  # the status repeats the last logged loss: no new point
    series.observe(running(22, 1.7, 2.5))

    assert series.loss_points[-2:] == [(20, 2.0), (22, 1.7)] and len(series.loss) == 11
    assert series.eval_points == [(0, 4.0), (20, 2.5)]
    lines = render(running(22, 1.7, 2.5), series)
    assert lines[2] == f"loss      1.7000  {sparkline(series.loss)}" and len(lines[2].split()[-1]) == 11
    assert lines[3] == "eval loss 2.5000  █▁"


def test_a_newer_history_replaces_the_stored_part_and_keeps_later_status_points() -> None:
    series = Series()
    series.seed([{"step": 10, "loss": 3.0}])
    for step, loss in ((12, 2.8), (14, 2.6), (16, 2.4)):
        series.observe(running(step, loss))
    series.seed([{"step": 10, "loss": 3.0}, {"step": 12, "loss": 2.8}, {"step": 14, "loss": 2.6}])
    assert series.loss_points == [(10, 3.0), (12, 2.8), (14, 2.6), (16, 2.4)]


def test_a_gang_restart_from_an_earlier_step_drops_the_points_after_it() -> None:
    series = Series()
    for step, loss in ((10, 3.0), (20, 2.0), (30, 1.5)):
        series.observe(running(step, loss))
    series.observe(running(20, 2.1))  # resumed from the checkpoint at step 20
    assert series.loss_points == [(10, 3.0), (20, 2.0)]
    series.observe(running(24, 1.9))
    assert series.loss_points == [(10, 3.0), (20, 2.0), (24, 1.9)]


@pytest.mark.parametrize(
    ("last_read", "now", "finished", "due"),
    [
        pytest.param(None, 0.0, False, True, id="first draw: at once"),
        pytest.param(100.0, 100.0 + HISTORY_SECONDS - 1, False, False, id="within the interval: not again"),
        pytest.param(100.0, 100.0 + HISTORY_SECONDS, False, True, id="after the interval"),
        pytest.param(100.0, 101.0, True, True, id="finished: the final curve"),
    ],
)
def test_history_is_read_at_once_then_at_most_every_interval(
    last_read: float | None, now: float, finished: bool, due: bool
) -> None:
    assert history_due(last_read, now, finished) is due


def test_history_lines_that_are_not_objects_are_skipped() -> None:
    data = b'{"step": 2, "loss": 3.1}\n\nnot json\n[1]\n{"step": 4, "loss": 2.9}\n'
    assert parse_history(data) == [{"step": 2, "loss": 3.1}, {"step": 4, "loss": 2.9}]


def test_the_client_reads_logs_where_the_trainer_uploads_them() -> None:
    assert stored_log_uri("s3://out/run/", 3, 1) == f"s3://out/run/{log_key(3, 1)}"


@pytest.mark.parametrize(
    ("keys", "rank", "attempts"),
    [
        pytest.param(["run/logs/attempt-0/node-0.log", "run/logs/attempt-2/node-0.log",
                      "run/logs/attempt-10/node-0.log"], 0, [0, 2, 10], id="numeric order"),
        pytest.param(["run/logs/attempt-0/node-1.log", "run/logs/attempt-1/node-0.log"], 1, [0], id="one node's"),
        pytest.param(["run/logs/attempt-0/node-0.log.tmp", "run/history.jsonl"], 0, [], id="nothing else"),
    ],
)
def test_stored_attempts_are_those_with_the_nodes_log(keys: list[str], rank: int, attempts: list[int]) -> None:
    assert stored_attempts(keys, rank) == attempts

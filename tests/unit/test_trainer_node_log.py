"""The node's log beyond its pod: where it goes, how much of it, periodic and final uploads, failures tolerated."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from trainer_factories import make_config

from finetune_trainer.node_log import (
    ATTEMPT_ENV,
    NODE_RANK_ENV,
    NodeLog,
    attempt_and_rank,
    bounded_contents,
    log_key,
    open_node_log,
)
from finetune_trainer.storage import FileStore
from localcluster.pytest_plugin import wait_until


def test_the_key_names_the_attempt_and_the_node() -> None:
    assert log_key(0, 0) == "logs/attempt-0/node-0.log"
    assert log_key(12, 3) == "logs/attempt-12/node-3.log"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({ATTEMPT_ENV: "4", NODE_RANK_ENV: "2"}, (4, 2), id="the operator's variables"),
        pytest.param({}, (7, 0), id="by hand: the config's attempt, node 0"),
        pytest.param({ATTEMPT_ENV: "x"}, (7, 0), id="unreadable: the config's"),
    ],
)
def test_attempt_and_rank_come_from_the_pod(environ: dict[str, str], expected: tuple[int, int]) -> None:
    assert attempt_and_rank(7, environ) == expected


def test_a_long_log_keeps_its_head_and_its_end_within_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "node.log"
    path.write_bytes(b"a" * 100)
    assert bounded_contents(path, limit=100, head=10) == b"a" * 100
    path.write_bytes(b"H" * 10 + b"m" * 900 + b"T" * 50)
    kept = bounded_contents(path, limit=200, head=10)
    assert len(kept) == 200
    assert kept.startswith(b"H" * 10 + b"\n[... 760 bytes of this log left out ...]\n") and kept.endswith(b"T" * 50)


def test_teed_output_reaches_the_stream_the_file_and_the_store_periodically_and_at_close(tmp_path: Path) -> None:
    store = FileStore("file:///out", tmp_path / "store")
    out = io.BytesIO()
    node_log = NodeLog(tmp_path / "work" / "node-0.log", store, log_key(1, 0), out=out, interval_s=0.05).start()
    read_end, write_end = os.pipe()
    tee = node_log.tee(read_end)
    os.write(write_end, b"rank0 INFO step 1\n")

    stored = tmp_path / "store" / "logs" / "attempt-1" / "node-0.log"
    wait_until(lambda: stored.is_file() and stored.read_bytes() == b"rank0 INFO step 1\n", 10, "a periodic upload")
    os.write(write_end, b"rank0 INFO step 2\n")
    os.close(write_end)
    tee.join(10)
    node_log.say("exit 0 after 1 s: training finished")
    assert node_log.close() is True

    expected = b"rank0 INFO step 1\nrank0 INFO step 2\nfinetune-launch: exit 0 after 1 s: training finished\n"
    assert stored.read_bytes() == expected
    assert out.getvalue() == expected and (tmp_path / "work" / "node-0.log").read_bytes() == expected


def test_a_store_that_refuses_is_reported_once_and_never_raises(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the store's folder should be")
    out = io.BytesIO()
    node_log = NodeLog(tmp_path / "node-0.log", FileStore("file:///x", blocked), log_key(0, 0), out=out)
    node_log.start().write(b"training\n")

    assert node_log.upload(deadline=0) is False and node_log.upload(deadline=0) is False
    assert node_log.close(budget_s=0) is False
    assert out.getvalue().count(b"cannot upload this log to file:///x/logs/attempt-0/node-0.log") == 1


def test_the_launchers_log_lives_under_the_work_dir_and_uploads_below_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ATTEMPT_ENV, "3")
    monkeypatch.setenv(NODE_RANK_ENV, "1")
    config = make_config(output={"uri": f"file://{tmp_path}/out"}, local={"workDir": str(tmp_path / "work")})
    node_log = open_node_log(config)
    node_log.say("started")
    node_log.close()
    assert (tmp_path / "work" / "logs" / "node-1.log").read_text() == "finetune-launch: started\n"
    assert (tmp_path / "out" / "logs" / "attempt-3" / "node-1.log").read_text() == "finetune-launch: started\n"

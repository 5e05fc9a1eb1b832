"""Checkpoint rules without servers: names, manifests, retention, upload ownership, the launcher's exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_factories import make_config

from finetune_trainer import exit_codes
from finetune_trainer.checkpoints import (
    FileEntry,
    Manifest,
    ManifestError,
    assign_uploads,
    checkpoint_key,
    needs_universal,
    parse_checkpoint_name,
    retained_steps,
)
from finetune_trainer.launch import decide_exit, read_exit_statuses, torchrun_command, torchrun_has_shutdown_timeout

SHA = "a" * 64


def manifest(**overrides: object) -> Manifest:
    fields: dict[str, object] = {
        "step": 20,
        "configHash": "abc",
        "worldSize": 2,
        "time": "2026-01-01T00:00:00+00:00",
        "files": [FileEntry("global_step20/mp_rank_00_model_states.pt", 10, SHA)],
        "evalLoss": 1.5,
        "tokensSeen": 1000,
    }
    fields.update(overrides)
    return Manifest(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("zero_stage", "written_by", "world_size", "expected"),
    [
        (0, 2, 1, False),  # plain data parallel: every rank holds the whole optimizer state
        (1, 2, 2, False),
        (1, 2, 4, True),  # ZeRO shards are cut per rank: re-cut through a universal checkpoint
        (2, 4, 2, True),
        (3, 8, 16, True),
        (3, 8, 8, False),
    ],
)
def test_a_universal_conversion_is_needed_only_for_zero_shards_of_another_world_size(
    zero_stage: int, written_by: int, world_size: int, expected: bool
) -> None:
    config = make_config(deepspeed={"zeroStage": zero_stage})

    assert needs_universal(config, manifest(worldSize=written_by), world_size) is expected


def test_checkpoint_keys_have_eight_digits_and_parse_back() -> None:
    assert checkpoint_key(20) == "checkpoints/step-00000020/"
    assert parse_checkpoint_name("step-00000020") == 20
    assert parse_checkpoint_name("step-20") is None
    assert parse_checkpoint_name("checkpoint-20") is None


def test_manifest_round_trips() -> None:
    original = manifest()

    assert Manifest.from_json(original.to_json()) == original


@pytest.mark.parametrize(
    "broken",
    [
        b"{not json",
        json.dumps({"step": 1}).encode(),
        manifest(files=[]).to_json(),
        manifest(files=[FileEntry("../escape", 1, SHA)]).to_json(),
        manifest(files=[FileEntry("/abs", 1, SHA)]).to_json(),
        manifest(files=[FileEntry("x", 1, "short")]).to_json(),
        manifest(format=99).to_json(),
    ],
)
def test_unusable_manifests_are_rejected(broken: bytes) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_json(broken)


def test_manifest_reports_missing_and_truncated_files() -> None:
    m = manifest(files=[FileEntry("a", 10, SHA), FileEntry("b", 5, SHA), FileEntry("c", 1, SHA)])

    assert m.missing_or_wrong({"a": 10, "b": 4}) == ["b", "c"]


@pytest.mark.parametrize(
    ("complete", "keep", "kept"),
    [
        ({10: 2.0, 20: 1.5, 30: 1.7, 40: 1.8}, 2, {30, 40, 20}),
        ({10: 1.0, 20: 1.5, 30: 1.7}, 1, {30, 10}),
        ({10: None, 20: None, 30: None}, 2, {20, 30}),
        ({10: 3.0, 20: 2.0}, 3, {10, 20}),
        ({}, 2, set()),
        ({10: float("nan"), 20: 2.0, 30: 2.5}, 1, {30, 20}),
    ],
)
def test_retention_keeps_the_newest_and_the_best(complete: dict[int, float | None], keep: int, kept: set[int]) -> None:
    assert retained_steps(complete, keep) == kept


@pytest.mark.parametrize(
    ("listings", "owned"),
    [
        ([["a", "b"]], [["a", "b"]]),
        ([["latest", "shard0"], ["latest", "shard1"]], [["latest", "shard0"], ["shard1"]]),
        ([["a"], None, ["a", "c"]], [["a"], [], ["c"]]),
    ],
)
def test_each_file_is_uploaded_once_by_the_lowest_node(
    listings: list[list[str] | None], owned: list[list[str]]
) -> None:
    assert assign_uploads(listings) == owned


@pytest.mark.parametrize(
    ("torchrun", "statuses", "signalled", "code"),
    [
        (0, [(0, 0, "ok"), (1, 0, "ok")], False, exit_codes.SUCCESS),
        (1, [(0, exit_codes.FAILURE, "boom"), (1, exit_codes.PREEMPTED, "ckpt")], False, exit_codes.PREEMPTED),
        (1, [(0, exit_codes.PREEMPTED, "ckpt"), (1, exit_codes.INVALID, "bad line")], False, exit_codes.INVALID),
        (1, [(0, exit_codes.FAILURE, "boom")], False, exit_codes.FAILURE),
        (1, [], False, exit_codes.FAILURE),
        (1, [], True, exit_codes.PREEMPTED),
        (1, [(0, 0, "ok")], False, exit_codes.FAILURE),
    ],
)
def test_launcher_exits_with_the_most_significant_worker_code(
    torchrun: int, statuses: list[tuple[int, int, str]], signalled: bool, code: int
) -> None:
    assert decide_exit(torchrun, statuses, signalled)[0] == code


def test_launcher_reason_names_the_rank(tmp_path: Path) -> None:
    (tmp_path / "rank-1.json").write_text(json.dumps({"rank": 1, "code": 64, "reason": "data.jsonl:7: bad"}))
    (tmp_path / "rank-0.json").write_text("garbage")

    code, reason = decide_exit(1, read_exit_statuses(tmp_path), False)

    assert code == exit_codes.INVALID
    assert reason == "rank 1: data.jsonl:7: bad"


@pytest.mark.parametrize(
    ("supported", "expected"),
    [
        pytest.param(True, ["--max-restarts", "0", "--shutdown-timeout", "90"], id="grace-period-passed-on"),
        pytest.param(False, ["--max-restarts", "0"], id="older-torchrun-keeps-its-default"),
    ],
)
def test_torchrun_gets_the_grace_period_when_it_takes_one(supported: bool, expected: list[str]) -> None:
    command = torchrun_command("/etc/finetune/config.json", 90, supported)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert command[3:-4] == expected
    assert command[-4:] == ["-m", "finetune_trainer", "--config", "/etc/finetune/config.json"]


def test_the_pinned_torch_has_torchruns_shutdown_timeout() -> None:
    # torch==2.13.0 is pinned; its torchrun has the flag, so the grace period reaches the workers.
    assert torchrun_has_shutdown_timeout()

"""The trainer survives what happens to pods and storage: a killed rank, SIGTERM, broken checkpoints, an S3 restart."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from trainer_helpers import TrainerSetup, worker_pids

from finetune_trainer import exit_codes
from localcluster.pytest_plugin import wait_until
from localcluster.seaweedfs import SeaweedFS

pytestmark = pytest.mark.integration

# Enough steps that a checkpoint completes well before the end; small checkpoints keep each upload short.
LONG_RUN = {"maxSteps": 60, "gradientAccumulationSteps": 2, "evalEvery": 20}


def test_killed_rank_then_relaunch_resumes_from_the_newest_complete_checkpoint(setup: TrainerSetup) -> None:
    config = setup.write_config(training=LONG_RUN, checkpoint={"everySteps": 5, "keep": 2})
    first = setup.start_launcher(config, setup.env(nproc=2), log_name="first.log")
    wait_until(lambda: setup.complete_checkpoints() or first.process.poll() is not None, 120, "a checkpoint")
    pids = worker_pids(config)
    assert len(pids) == 2, f"ranks still running: {pids}; log:\n{first.log()[-3000:]}"

    os.kill(pids[-1], signal.SIGKILL)
    code = first.wait()
    newest = max(setup.complete_checkpoints())

    assert code == exit_codes.FAILURE, first.log()[-3000:]
    assert newest < 60
    # The crashed attempt's log outlives it in S3: the ranks' lines and the launcher's verdict.
    crashed = setup.node_log(attempt=0)
    assert "rank0 INFO" in crashed and "finetune-launch: exit 1 after" in crashed, crashed[-3000:]
    second = setup.run_launcher(config, nproc=2, FINETUNE_ATTEMPT="1")
    assert second.returncode == exit_codes.SUCCESS, second.log()[-4000:]
    assert "finetune-launch: exit 0 after" in setup.node_log(attempt=1)
    assert setup.node_log(attempt=0) == crashed
    result = setup.result()
    assert result["resumedFromStep"] == newest
    assert result["steps"] == 60
    assert result["evalLossAfter"] < result["evalLossBefore"]
    # The restart prepared nothing: the node's prepared data was reused.
    assert "data_store: prepared data" in second.log() and "reused from" in second.log()
    assert "data_prepare: prepared " not in second.log()


def test_sigterm_writes_a_complete_checkpoint_and_exits_preempted(setup: TrainerSetup) -> None:
    config = setup.write_config(training=LONG_RUN, checkpoint={"everySteps": 50, "keep": 2})
    launched = setup.start_launcher(config, setup.env(nproc=2))
    # Training is under way once a training loss is logged (every 2 steps).
    wait_until(lambda: "'loss'" in launched.log() or launched.process.poll() is not None, 120, "a training step")

    launched.terminate()
    code = launched.wait()

    assert code == exit_codes.PREEMPTED, launched.log()[-4000:]
    stored = setup.node_log()
    assert "got signal 15" in stored and "finetune-launch: exit 75 after" in stored, stored[-3000:]
    match = re.search(r"emergency checkpoint at step (\d+)", setup.termination_message)
    assert match, setup.termination_message
    step = int(match.group(1))
    assert 0 < step < 60
    complete = setup.complete_checkpoints()
    assert step in complete and max(complete) == step
    assert not setup.keys("run/model/"), "a preempted run must not export"


def test_broken_newest_checkpoints_are_skipped(setup: TrainerSetup) -> None:
    config = setup.write_config(checkpoint={"everySteps": 5, "keep": 3})
    first = setup.run_launcher(config)
    assert first.returncode == exit_codes.SUCCESS, first.log()[-4000:]
    assert sorted(setup.complete_checkpoints()) == [10, 15, 20]
    s3 = setup.s3
    # step 20: a weights file cut short; step 15: a manifest that does not parse; step 10 is intact.
    shard = "run/checkpoints/step-00000020/global_step20/mp_rank_00_model_states.pt"
    data = s3.get_object(Bucket=setup.bucket, Key=shard)["Body"].read()
    s3.put_object(Bucket=setup.bucket, Key=shard, Body=data[: len(data) // 2])
    s3.put_object(Bucket=setup.bucket, Key="run/checkpoints/step-00000015/manifest.json", Body=b'{"step": 15, "fi')
    s3.delete_object(Bucket=setup.bucket, Key="run/result.json")

    second = setup.run_launcher(config)

    assert second.returncode == exit_codes.SUCCESS, second.log()[-4000:]
    assert setup.result()["resumedFromStep"] == 10
    assert setup.result()["steps"] == 20
    log = second.log()
    assert "checkpoint step 20: files missing or of the wrong size" in log
    assert "checkpoint step 15: manifest does not parse" in log


def test_checkpoint_with_a_wrong_sha256_is_skipped(setup: TrainerSetup) -> None:
    config = setup.write_config(checkpoint={"everySteps": 10, "keep": 3})
    first = setup.run_launcher(config)
    assert first.returncode == exit_codes.SUCCESS, first.log()[-4000:]
    key = "run/checkpoints/step-00000020/trainer_state.json"
    data = bytearray(setup.s3.get_object(Bucket=setup.bucket, Key=key)["Body"].read())
    data[10] ^= 0xFF
    setup.s3.put_object(Bucket=setup.bucket, Key=key, Body=bytes(data))

    second = setup.run_launcher(config)

    assert second.returncode == exit_codes.SUCCESS, second.log()[-4000:]
    assert setup.result()["resumedFromStep"] == 10
    assert "checkpoint step 20 could not be restored" in second.log()


def test_storage_restart_during_training_loses_nothing(setup: TrainerSetup, seaweedfs: SeaweedFS) -> None:
    config = setup.write_config(training=LONG_RUN, checkpoint={"everySteps": 5, "keep": 20})
    launched = setup.start_launcher(config, setup.env(nproc=2))
    wait_until(lambda: setup.complete_checkpoints() or launched.process.poll() is not None, 120, "a checkpoint")

    seaweedfs.stop()
    time.sleep(10)
    seaweedfs.start()
    code = launched.wait()

    assert code == exit_codes.SUCCESS, launched.log()[-4000:]
    assert setup.result()["steps"] == 60
    complete = setup.complete_checkpoints()
    assert sorted(complete) == list(range(5, 65, 5)), sorted(complete)
    assert setup.keys("run/model/model.safetensors")


@pytest.mark.parametrize(
    ("stage", "method"), [(2, "full"), (3, "full"), (2, "lora")], ids=["zero2", "zero3", "zero2-lora"]
)
def test_a_checkpoint_from_two_ranks_resumes_on_one_through_a_universal_checkpoint(
    setup: TrainerSetup, stage: int, method: str
) -> None:
    checkpoint, zero = {"everySteps": 10, "keep": 2}, {"zeroStage": stage}
    lora = {"method": "lora", "lora": {"r": 8, "alpha": 16}} if method == "lora" else {}
    first = setup.run_launcher(setup.write_config(checkpoint=checkpoint, deepspeed=zero, training=lora), nproc=2)
    assert first.returncode == exit_codes.SUCCESS, first.log()[-4000:]
    assert sorted(setup.complete_checkpoints()) == [10, 20]
    # The job comes back with one rank instead of two (resized while suspended) and a longer schedule.
    config = setup.write_config(
        "one-rank.json", training={**lora, "maxSteps": 30}, checkpoint=checkpoint, deepspeed=zero
    )

    second = setup.run_launcher(config, nproc=1)

    log = second.log()
    assert second.returncode == exit_codes.SUCCESS, log[-4000:]
    assert f"checkpoint step 20 was written by 2 ranks and this run has 1: converting its ZeRO-{stage} shards" in log
    assert "to a universal checkpoint in" in log
    result = setup.result()
    assert (result["resumedFromStep"], result["steps"], result["worldSize"]) == (20, 30, 1)
    assert result["evalLossAfter"] < result["evalLossBefore"]
    assert setup.complete_checkpoints()[30]["worldSize"] == 1

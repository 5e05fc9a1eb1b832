"""One LoRA job's whole life through ftj on the local cluster: wait --timeout gives up, rank 0's training process is
killed (a gang restart), the live view reattaches with the stored loss curve, suspend and resume continue from the
checkpoint, the job succeeds; then every attempt's log is read after its pods are gone, and chat merges the adapter
onto its base model."""

from __future__ import annotations

import fcntl
import functools
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import termios
import time
from typing import Any

import pytest
from e2e_helpers import ftj, read_json, s3_keys, training_process

from finetune_client import Client
from localcluster import pytest_plugin
from localcluster.cluster import REPO, LocalCluster

pytestmark = pytest.mark.e2e

wait_until = functools.partial(pytest_plugin.wait_until, interval=0.5)
EXAMPLE = str(REPO / "examples" / "tiny-cpu.yaml")
NAME = "lifecycle"
ANSI = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")


def status(cluster: LocalCluster) -> dict[str, Any]:
    found: dict[str, Any] = cluster.get_job(NAME).get("status", {})
    return found


def newest_checkpoint(cluster: LocalCluster) -> int:
    """The step of the newest complete checkpoint in S3 (its manifest is written last), 0 when there is none."""
    manifests = [k for k in s3_keys(cluster, f"{NAME}/checkpoints/") if k.endswith("/manifest.json")]
    return max((int(k.split("/")[2].removeprefix("step-")) for k in manifests), default=0)


def live_view(env: dict[str, str], seconds: float) -> bytes:
    """What ``ftj wait NAME`` draws in a 110x30 terminal within ``seconds``, then Ctrl-C (it detaches)."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 110, 0, 0))
    process = subprocess.Popen(["ftj", "wait", NAME], env=env, stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    drawn = b""
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and b"tokens/s" not in drawn:
            if select.select([controller], [], [], 0.5)[0]:
                drawn += os.read(controller, 65536)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)
    return drawn


def first_loss_sparkline(drawn: bytes) -> str:
    """The loss line's bars in the view's first block, e.g. ``loss      2.3141  ▇▆▅▅▄▃``."""
    for line in ANSI.sub(b"", drawn).decode(errors="replace").splitlines():
        if line.startswith("loss      "):
            parts = line.split()
            return parts[2] if len(parts) > 2 else ""
    raise AssertionError(f"no loss line in the view: {drawn[-2000:]!r}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_and_give_up_waiting(user_env: dict[str, str]) -> None:
    # The kubelet's pods share the machine's network: ports of their own keep this job's rendezvous and metrics
    # apart from another local cluster's pods on the same machine.
    ports = ["--set", f"distributed.masterPort={free_port()}", "--set", f"metrics.port={free_port()}"]
    started = ftj(user_env, "run", NAME, "-f", EXAMPLE, "--model", "s3://models/tiny-gpt2", "--lora", "--lora-r",
                  "4", "--max-steps", "400", "--log-every", "2", "--eval-every", "100", "--checkpoint-every", "20",
                  "--cpu", "1", "--memory", "3Gi", *ports, "--detach")
    assert started.returncode == 0, started.stderr
    gave_up = ftj(user_env, "wait", NAME, "--timeout", "5")
    assert gave_up.returncode == 3, gave_up
    assert gave_up.stderr.count("\n") == 1 and re.fullmatch(
        rf"ftj: FineTuneJob default/{NAME} is \w+ after 5 s; it keeps running \(exit 3\)\n", gave_up.stderr)


def kill_rank0_and_see_the_gang_restart(cluster: LocalCluster) -> int:
    """Kill attempt 0's rank-0 training process after its first checkpoint; the newest checkpoint then."""
    wait_until(lambda: newest_checkpoint(cluster), timeout=400, what="a first complete checkpoint")
    pid = wait_until(lambda: training_process(cluster, f"{NAME}-a0-n0"), timeout=30, what="rank 0's process")
    os.kill(pid, signal.SIGKILL)
    saved = newest_checkpoint(cluster)
    running = wait_until(lambda: (s := status(cluster)).get("attempt") == 1 and s.get("phase") == "Running" and s,
                         timeout=300, what="attempt 1 running")
    assert running["restarts"] == 1
    return saved


def suspend_and_resume(cluster: LocalCluster, user_env: dict[str, str], after_step: int) -> int:
    """ftj suspend once attempt 1 has checkpointed beyond ``after_step``, then ftj resume; the step of the
    checkpoint written on the way out."""
    wait_until(lambda: newest_checkpoint(cluster) > after_step, timeout=300, what="attempt 1 checkpointing")
    suspended = ftj(user_env, "suspend", NAME)
    assert suspended.returncode == 0 and "suspended" in suspended.stdout, suspended
    wait_until(lambda: status(cluster).get("phase") == "Suspended" and not cluster.pods(NAME), timeout=300,
               what="Suspended with no pods")
    saved = newest_checkpoint(cluster)
    # The suspended attempt's pod is gone: its log comes from S3, SIGTERM and the exit for preemption included.
    log = ftj(user_env, "logs", NAME)
    assert log.returncode == 0 and "got signal 15" in log.stdout and "finetune-launch: exit 75" in log.stdout, log
    resumed = ftj(user_env, "resume", NAME)
    assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed
    wait_until(lambda: (s := status(cluster)).get("attempt") == 2 and s.get("phase") == "Running", timeout=300,
               what="Running again as attempt 2")
    return saved


def test_a_lora_job_through_timeout_crash_reattach_suspend_resume_then_its_logs_and_chat(
    cluster: LocalCluster, user_env: dict[str, str], client: Client
) -> None:
    start_and_give_up_waiting(user_env)
    resumed_from = kill_rank0_and_see_the_gang_restart(cluster)
    # Reattached in a terminal: the first block already holds the stored curve (status alone gives one bar).
    bars = first_loss_sparkline(live_view(user_env, seconds=60))
    assert len(bars) >= 5, f"the reattached view drew {bars!r}"
    saved = suspend_and_resume(cluster, user_env, after_step=resumed_from)

    done = ftj(user_env, "wait", NAME, "--timeout", "900", timeout=960)
    assert done.returncode == 0 and f"{NAME} Succeeded" in done.stdout, done
    result = read_json(cluster, f"{NAME}/result.json")
    assert result["resumedFromStep"] == saved and result["steps"] == 400
    wait_until(lambda: not cluster.pods(NAME), timeout=120, what="the finished job's pods deleted")

    latest = ftj(user_env, "logs", NAME)
    assert latest.returncode == 0 and "rank0 INFO" in latest.stdout, latest
    assert "finetune-launch: exit 0 after" in latest.stdout
    assert list(client.logs(NAME)) == latest.stdout.splitlines()
    crashed = ftj(user_env, "logs", NAME, "--attempt", "0")
    assert crashed.returncode == 0 and "rank0 INFO" in crashed.stdout, crashed
    assert "finetune-launch: exit 1 after" in crashed.stdout and "SIGKILL" in crashed.stdout
    missing = ftj(user_env, "logs", NAME, "--attempt", "9")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing
    assert f"no log of node 0 of FineTuneJob default/{NAME} (Succeeded), attempt 9: pod {NAME}-a9-n0 does not " \
           f"exist and nothing is stored at s3://finetune-output/{NAME}/logs/attempt-9/node-0.log" in missing.stderr

    chatted = ftj(user_env, "chat", NAME, "--prompt", "Where is my order?", "--max-new-tokens", "12", timeout=300)
    assert chatted.returncode == 0, chatted.stderr
    assert chatted.stdout.strip(), "the merged model answered nothing"
    loaded = rf"{NAME}: LoRA adapter s3://finetune-output/{NAME}/model/? \(r=4, alpha=\d+, modules [\w,.]+\) " \
             r"merged onto base model s3://models/tiny-gpt2, \d+ parameters"
    assert re.search(loaded, chatted.stderr), chatted.stderr

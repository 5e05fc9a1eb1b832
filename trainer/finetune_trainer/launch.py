"""The pod's command: validate the config, run torchrun over this node's ranks, map their outcome to one exit code.

    FINETUNE_CONFIG=/etc/finetune/config.json python -m finetune_trainer.launch
    python -m finetune_trainer.launch --config job.yaml      # same, by hand; PET_* decide the gang's shape
    python -m finetune_trainer.launch --help-config          # every setting with its default

torchrun reads ``PET_NNODES``, ``PET_NODE_RANK``, ``PET_NPROC_PER_NODE``, ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``
(or ``PET_RDZV_BACKEND``/``PET_RDZV_ENDPOINT``) from the environment itself; nothing else is passed on.

Exit codes (``exit_codes``): 0 success; 64 the config or the data is wrong (permanent: do not retry); 75 preempted
after an emergency checkpoint; 1 anything else. torchrun exits 1 whenever a worker fails, so each worker records
its intended code and a one-line reason in ``<local.workDir>/exit-status/rank-<RANK>.json``; the launcher exits
with the most significant one (64 > 75 > 1) and writes its reason to the termination message file.

Everything torchrun and the ranks print goes through ``node_log``: on to the pod's stream and, so that it outlives
the pod, to ``<output.uri>/logs/attempt-<N>/node-<rank>.log``, uploaded every 30 s and once more at exit.

SIGTERM/SIGINT are forwarded once to torchrun, which runs in a session of its own (so a signal to the whole
process group does not reach it twice) with ``--shutdown-timeout`` set to ``checkpoint.gracePeriodSeconds``:
torchrun's default would SIGKILL the workers 30 s after passing SIGTERM on, before a large emergency checkpoint
is uploaded. A torch whose torchrun lacks that flag (an image built on an older torch) keeps torchrun's default.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from finetune_trainer import exit_codes
from finetune_trainer.config import ConfigError, TrainerConfig, describe_fields, load_config
from finetune_trainer.node_log import NodeLog, open_node_log

CONFIG_ENV = "FINETUNE_CONFIG"
# Kubernetes' default terminationMessagePath; the variable exists for runs outside a pod (tests, by hand).
TERMINATION_LOG_ENV = "FINETUNE_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
# The kubelet keeps at most 4096 bytes of a termination message.
TERMINATION_MESSAGE_LIMIT = 4096
# Most significant first: a permanent error hides the preemption it caused, a preemption the crashes it caused.
SIGNIFICANCE = (exit_codes.INVALID, exit_codes.PREEMPTED, exit_codes.FAILURE)
PR_SET_PDEATHSIG = 1


def status_dir(config: TrainerConfig) -> Path:
    """Where this node's workers record their exit code and reason."""
    return Path(config.local.workDir) / "exit-status"


def write_exit_status(config: TrainerConfig, rank: int, code: int, reason: str) -> None:
    """Record a worker's intended exit code; never raises (the exit matters more than the record)."""
    try:
        folder = status_dir(config)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"rank-{rank}.json"
        partial = target.with_suffix(".tmp")
        partial.write_text(json.dumps({"rank": rank, "code": code, "reason": one_line(reason)}))
        partial.replace(target)
    except OSError as exc:
        print(f"finetune-trainer: cannot record the exit status: {exc}", file=sys.stderr)


def read_exit_statuses(folder: Path) -> list[tuple[int, int, str]]:
    """(rank, code, reason) of every worker that recorded one, by rank."""
    found: list[tuple[int, int, str]] = []
    for path in sorted(folder.glob("rank-*.json")):
        try:
            data = json.loads(path.read_text())
            found.append((int(data["rank"]), int(data["code"]), str(data.get("reason", ""))))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(found)


def decide_exit(torchrun_code: int, statuses: list[tuple[int, int, str]], signalled: bool) -> tuple[int, str]:
    """One exit code and reason for the pod from torchrun's code and what the workers recorded."""
    failed = [(code, rank, reason) for rank, code, reason in statuses if code != exit_codes.SUCCESS]
    if torchrun_code == 0 and not failed:
        return exit_codes.SUCCESS, "training finished"
    for wanted in SIGNIFICANCE:
        for code, rank, reason in failed:
            if code == wanted:
                return code, f"rank {rank}: {reason}"
    if failed:
        code, rank, reason = failed[0]
        return exit_codes.FAILURE, f"rank {rank} exited {code}: {reason}"
    if signalled:
        return exit_codes.PREEMPTED, "terminated before the workers recorded an outcome"
    return exit_codes.FAILURE, f"torchrun exited {torchrun_code} and no worker recorded a reason (see the log)"


def one_line(text: str) -> str:
    return " ".join(text.split())[:TERMINATION_MESSAGE_LIMIT]


def write_termination_message(message: str) -> None:
    """The message `kubectl describe pod` shows; written only where the file exists (a pod), never created."""
    path = os.environ.get(TERMINATION_LOG_ENV, DEFAULT_TERMINATION_LOG)
    if not os.path.exists(path) or not os.access(path, os.W_OK):
        return
    try:
        with open(path, "w") as handle:
            handle.write(one_line(message))
    except OSError:
        pass


def describe_config() -> str:
    rows = describe_fields()
    width = max(len(path) for path, _, _ in rows)
    lines = []
    for path, default, help_text in rows:
        shown = f"  [default: {default}]" if default else ""
        lines.append(f"{path.ljust(width)}  {help_text}{shown}")
    return "\n".join(lines)


def torchrun_has_shutdown_timeout() -> bool:
    """Whether this torch's torchrun takes ``--shutdown-timeout`` (an image may bring an older torch than ours).

    Read from torchrun's source rather than by importing torch, which would hold ~300 MB in this small process for
    the whole run.
    """
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    source = Path(next(iter(spec.submodule_search_locations))) / "distributed" / "run.py"
    try:
        return "--shutdown-timeout" in source.read_text(errors="replace")
    except OSError:
        return False


def torchrun_command(config_path: str, grace_seconds: int, shutdown_timeout: bool = True) -> list[str]:
    # The operator restarts the whole gang from the newest checkpoint; an in-place restart would not.
    command = [sys.executable, "-m", "torch.distributed.run", "--max-restarts", "0"]
    if shutdown_timeout:
        command += ["--shutdown-timeout", str(grace_seconds)]
    return command + ["-m", "finetune_trainer", "--config", config_path]


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


# How long the tee may drain the pipe after torchrun exits (a stray worker could hold it open).
TEE_DRAIN_TIMEOUT_S = 10.0


def run_torchrun(config: TrainerConfig, config_path: str, node_log: NodeLog) -> tuple[int, bool]:
    """Run torchrun to completion, its output through ``node_log``, forwarding the first SIGTERM/SIGINT; (its exit
    code, whether signalled)."""
    signalled = False
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal signalled
        if signalled:
            return
        signalled = True
        node_log.say(f"got signal {signum}; asking the workers to checkpoint")
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    read_end, write_end = os.pipe()
    tee = node_log.tee(read_end)
    try:
        try:
            child = subprocess.Popen(
                torchrun_command(config_path, config.checkpoint.gracePeriodSeconds, torchrun_has_shutdown_timeout()),
                stdout=write_end,
                stderr=write_end,
                start_new_session=True,
                # torchrun lives in its own session: a process-group kill of the pod command would orphan it.
                preexec_fn=die_with_parent,
            )
        finally:
            os.close(write_end)  # the tee sees the end of the output once torchrun and its workers are gone
        if signalled:
            child.send_signal(signal.SIGTERM)
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:
                continue
        tee.join(TEE_DRAIN_TIMEOUT_S)
        return code, signalled
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_trainer.launch", description="Run this node's trainer ranks under torchrun."
    )
    parser.add_argument("--config", default=os.environ.get(CONFIG_ENV), help=f"config file (default ${CONFIG_ENV})")
    parser.add_argument("--help-config", action="store_true", help="print every setting with its default and exit")
    args = parser.parse_args(argv)
    if args.help_config:
        print(describe_config())
        return exit_codes.SUCCESS
    if not args.config:
        return _fail(exit_codes.INVALID, f"config: no config file given (--config or ${CONFIG_ENV})")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        return _fail(exit_codes.INVALID, f"invalid config: {exc}")

    folder = status_dir(config)
    shutil.rmtree(folder, ignore_errors=True)
    summary_file = config.local.result_summary_file
    summary_file.unlink(missing_ok=True)
    started = time.monotonic()
    node_log = open_node_log(config)
    try:
        torchrun_code, signalled = run_torchrun(config, args.config, node_log)
        code, reason = decide_exit(torchrun_code, read_exit_statuses(folder), signalled)
        node_log.say(f"exit {code} after {time.monotonic() - started:.0f} s: {reason}")
    finally:
        node_log.close()
    if code == exit_codes.SUCCESS and summary_file.exists():
        # On node rank 0 the final numbers (JSON) are the message: the operator fills the job's status from them.
        reason = summary_file.read_text()
    write_termination_message(reason)
    return code


def _fail(code: int, message: str) -> int:
    print(f"finetune-launch: {message}", file=sys.stderr, flush=True)
    write_termination_message(message)
    return code


if __name__ == "__main__":
    sys.exit(main())

"""Stopping the servers the local cluster starts, each in its own process group, and reading their logs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def stop_process_group(
    process: subprocess.Popen[bytes], timeout: float, first_signal: signal.Signals = signal.SIGTERM
) -> None:
    """Signal the group ``process`` leads (``start_new_session=True``), SIGKILL it after ``timeout``, reap it."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, first_signal)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def log_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a server's log, headed by its name, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no {path.name})"
    return f"--- {path.name} (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

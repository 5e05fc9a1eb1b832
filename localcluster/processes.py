"""Stopping the servers the local cluster starts (each in its own process group), reading their logs, and running
an asynchronous server on a thread of its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any


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


Step = Callable[[], Coroutine[Any, Any, Any]]


class LoopThread:
    """An asyncio event loop on a thread of its own, for an asynchronous server used from synchronous code."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)

    def start(self, start: Step, stop: Step, timeout: float) -> None:
        """Start the thread and run ``start()`` on it; if that fails, run ``stop()`` and end the thread."""
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=timeout)
            self._end()
            raise

    def stop(self, stop: Step, timeout: float) -> None:
        """Run ``stop()`` on the loop, then end the thread and close the loop."""
        try:
            asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=timeout)
        finally:
            self._end()

    def _end(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        self.loop.close()

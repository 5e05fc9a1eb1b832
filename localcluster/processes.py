"""Starting and stopping the servers the local cluster runs (each in its own process group), reading their logs, and
running an asynchronous server on a thread of its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, Self


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


def free_port() -> int:
    """A port nothing listens on now, chosen by the kernel."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalServer:
    """One program in its own process group on 127.0.0.1, logging to ``<name>.log`` in ``data_dir``, ready when
    ``ready_path`` answers 200. Subclasses give the command (and the environment, what to prepare first)."""

    name = "server"
    ready_path = "/-/ready"
    start_timeout_s = 60.0
    stop_timeout_s = 10.0
    # Raised when it does not start; the message carries the log's tail.
    error: type[Exception] = RuntimeError

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        # Kept across stop() and start(): tests take a server away and bring it back at the same address.
        self.port = port or free_port()
        self.log_path = self.data_dir / f"{self.name}.log"
        self.start_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """host:port, as a scrape target or a client's gateway address."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _environment(self) -> dict[str, str] | None:
        """The process's environment; None: this process's."""
        return None

    def _prepare(self) -> None:
        """What must exist before the process starts."""

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + self.ready_path, timeout=1) as response:
                return int(response.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    def start(self) -> None:
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        command = self._command()
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                command, cwd=self.data_dir, env=self._environment(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        while time.monotonic() - began < self.start_timeout_s:
            if self._process.poll() is not None:
                code, self._process = self._process.returncode, None
                raise self.error(f"{self.name} exited with code {code} while starting\n{self.log_tail()}")
            if self.healthy():
                self.start_seconds = time.monotonic() - began
                return
            time.sleep(0.1)
        self.stop()
        raise self.error(f"{self.name} on {self.url} not ready within {self.start_timeout_s:.0f} s\n{self.log_tail()}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process_group(process, self.stop_timeout_s)

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


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

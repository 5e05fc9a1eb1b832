"""The real operator (``python -m finetune_operator``) as a restartable subprocess, for the local cluster and tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

from localcluster.processes import log_tail, stop_process_group
from localcluster.seaweedfs import free_ports

REPO = Path(__file__).resolve().parent.parent


class OperatorError(RuntimeError):
    """The operator exited or did not become healthy."""


class OperatorProcess:
    """One operator process on 127.0.0.1 ports of its own, with an explicit kubeconfig (kopf would otherwise read
    ``KUBECONFIG`` at import) and its log appended to ``log`` across restarts."""

    def __init__(
        self,
        kubeconfig: Path,
        log: Path,
        *,
        args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.log = log
        self.args = list(args)
        self.env = dict(env or {})
        self.metrics_port, self.health_port = free_ports(2)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 60) -> None:
        """Start the operator (if it is not running) and wait for its liveness endpoint."""
        if self.running:
            return
        # The local addresses come last: they win over the same flags in ``args`` (a chart's Deployment args).
        command = [
            sys.executable, "-m", "finetune_operator", *self.args,
            "--kubeconfig", str(self.kubeconfig),
            "--bind-address", "127.0.0.1",
            "--metrics-port", str(self.metrics_port),
            "--health-port", str(self.health_port),
        ]
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), **self.env}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=REPO
            )
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise OperatorError(f"the operator did not become healthy in {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def healthy(self) -> bool:
        """True when the liveness endpoint answers 200; raises when the process has exited."""
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise OperatorError(f"the operator is not running (exit code {code}):\n{self.log_tail()}")
        with contextlib.suppress(OSError):
            url = f"http://127.0.0.1:{self.health_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        return False

    def stop(self, *, kill: bool = False) -> None:
        """Stop the operator: SIGTERM, or SIGKILL with ``kill=True`` to simulate a crash."""
        process, self.process = self.process, None
        if process is not None:
            stop_process_group(process, 20, signal.SIGKILL if kill else signal.SIGTERM)

    def metrics(self) -> str:
        """The operator's Prometheus exposition text."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def reconciles(self, namespace: str, name: str) -> int:
        """Reconciles of one job finished so far, counted in the log (the operator logs each at DEBUG): a later
        count proves the operator has looked at the job since."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return 0
        return text.count(f"reconciled {namespace}/{name} in ")

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log, lines)

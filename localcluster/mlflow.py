"""A real MLflow tracking server for the local cluster: runs in SQLite in the state folder, artifacts in SeaweedFS.

``mlflow server`` (PyPI's, the ``localcluster`` extra) bound to 127.0.0.1 on a free port that it keeps across
``stop()``/``start()`` (tests take it away and bring it back), one worker, telemetry off. Artifacts are proxied:
clients upload through the server (``mlflow-artifacts:``), which stores them under ``s3://<bucket>/artifacts`` on
SeaweedFS (``--artifacts-destination`` with ``MLFLOW_S3_ENDPOINT_URL``), so a trainer needs no S3 keys for them.
Pods are local processes sharing the host's network, so they reach it at its 127.0.0.1 URL.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from localcluster.processes import log_tail, stop_process_group
from localcluster.seaweedfs import REGION, SeaweedFS

# A fresh database runs MLflow's migrations first: tens of seconds on a busy 2-core machine.
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0
ARTIFACTS_BUCKET = "mlflow"


class MlflowServerError(RuntimeError):
    """The server did not start; the message carries its log tail."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class MlflowServer:
    """``mlflow server`` in its own process group, logging to ``mlflow.log`` in ``data_dir``."""

    def __init__(self, data_dir: Path, s3: SeaweedFS, *, bucket: str = ARTIFACTS_BUCKET, port: int | None = None):
        self.data_dir = Path(data_dir).resolve()
        self.s3 = s3
        self.bucket = bucket
        self.port = port or _free_port()
        self.log_path = self.data_dir / "mlflow.log"
        self.start_seconds: float | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def artifacts_uri(self) -> str:
        return f"s3://{self.bucket}/artifacts"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.data_dir / 'mlflow.db'}",
            "--artifacts-destination", self.artifacts_uri,
        ]

    def environment(self) -> dict[str, str]:
        """The server's environment: SeaweedFS for the artifacts, and nothing reported anywhere."""
        env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "AWS_"))}
        env.update(
            MLFLOW_S3_ENDPOINT_URL=self.s3.endpoint_url,
            AWS_ACCESS_KEY_ID=self.s3.access_key,
            AWS_SECRET_ACCESS_KEY=self.s3.secret_key,
            AWS_DEFAULT_REGION=REGION,
            MLFLOW_DISABLE_TELEMETRY="true",
            DO_NOT_TRACK="1",
        )
        return env

    def start(self) -> None:
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        existing = {bucket["Name"] for bucket in self.s3.client().list_buckets().get("Buckets", [])}
        if self.bucket not in existing:
            self.s3.create_bucket(self.bucket)
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self.command(), cwd=self.data_dir, env=self.environment(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        while time.monotonic() - began < START_TIMEOUT_S:
            if self._process.poll() is not None:
                code, self._process = self._process.returncode, None
                raise MlflowServerError(f"mlflow server exited with code {code} while starting\n{self.log_tail()}")
            if self.healthy():
                self.start_seconds = time.monotonic() - began
                return
            time.sleep(0.2)
        self.stop()
        raise MlflowServerError(f"mlflow server on {self.url} not ready in {START_TIMEOUT_S:.0f} s\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                return int(response.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    # --- reading it back as an outside client would (its REST API) --------------------------------------------

    def api(self, path: str, body: dict[str, Any] | None = None, **query: Any) -> dict[str, Any]:
        """GET (or with ``body`` POST) ``/api/2.0/mlflow/<path>``; the JSON answer, or MlflowServerError."""
        url = f"{self.url}/api/2.0/mlflow/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query, doseq=True)
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                answer: dict[str, Any] = json.loads(response.read() or b"{}")
                return answer
        except urllib.error.HTTPError as error:
            raise MlflowServerError(f"{path}: HTTP {error.code}: {error.read()[:500]!r}") from error

    def runs(self, experiment: str) -> list[dict[str, Any]]:
        """Every live run of the experiment named ``experiment`` ([] when there is no such experiment)."""
        try:
            found = self.api("experiments/get-by-name", experiment_name=experiment)
        except MlflowServerError:
            return []
        experiment_id = found["experiment"]["experiment_id"]
        runs: list[dict[str, Any]] = self.api("runs/search", {"experiment_ids": [experiment_id]}).get("runs", [])
        return runs

    def metric_history(self, run_id: str, key: str) -> list[dict[str, Any]]:
        """Every point of one metric of a run, in step order."""
        points: list[dict[str, Any]] = self.api("metrics/get-history", run_id=run_id, metric_key=key,
                                                max_results=25000).get("metrics", [])
        return sorted(points, key=lambda point: (int(point["step"]), int(point["timestamp"])))

    def artifacts(self, run_id: str) -> list[str]:
        """The paths of the run's top-level artifacts."""
        files = self.api("artifacts/list", run_id=run_id).get("files", [])
        return sorted(str(item["path"]) for item in files)

    def model_versions(self, name: str) -> list[dict[str, Any]]:
        versions: list[dict[str, Any]] = self.api("model-versions/search", filter=f"name = '{name}'").get(
            "model_versions", [])
        return versions

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process_group(process, STOP_TIMEOUT_S)

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

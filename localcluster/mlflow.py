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
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from localcluster.processes import LocalServer
from localcluster.seaweedfs import REGION, SeaweedFS

# A fresh database runs MLflow's migrations first: tens of seconds on a busy 2-core machine.
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0
ARTIFACTS_BUCKET = "mlflow"


class MlflowServerError(RuntimeError):
    """The server did not start; the message carries its log tail."""


class MlflowServer(LocalServer):
    """``mlflow server`` in its own process group, logging to ``mlflow.log`` in ``data_dir``."""

    name = "mlflow"
    ready_path = "/health"
    start_timeout_s = START_TIMEOUT_S
    stop_timeout_s = STOP_TIMEOUT_S
    error = MlflowServerError

    def __init__(self, data_dir: Path, s3: SeaweedFS, *, bucket: str = ARTIFACTS_BUCKET, port: int | None = None):
        super().__init__(data_dir, port)
        self.s3 = s3
        self.bucket = bucket

    @property
    def artifacts_uri(self) -> str:
        return f"s3://{self.bucket}/artifacts"

    def _command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.data_dir / 'mlflow.db'}",
            "--artifacts-destination", self.artifacts_uri,
        ]

    def _environment(self) -> dict[str, str]:
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

    def _prepare(self) -> None:
        existing = {bucket["Name"] for bucket in self.s3.client().list_buckets().get("Buckets", [])}
        if self.bucket not in existing:
            self.s3.create_bucket(self.bucket)

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

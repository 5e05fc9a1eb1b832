"""Debian's Prometheus and Pushgateway, when installed, on 127.0.0.1 for the local cluster: launch, scrape, query."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from localcluster.processes import LocalServer

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
SCRAPE_INTERVAL = "2s"


class PrometheusError(RuntimeError):
    """A server did not start, or a query failed; the message carries the log tail or the API error."""


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def pushgateway_binary() -> str | None:
    return shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")


def prometheus_available() -> bool:
    """For tests: `pytest.mark.skipif(not prometheus_available(), reason=...)`."""
    return prometheus_binary() is not None


def pushgateway_available() -> bool:
    return pushgateway_binary() is not None


def _http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), bytes(error.read())


class PrometheusServer(LocalServer):
    """Prometheus's servers: ready at /-/ready, their start failures PrometheusError."""

    start_timeout_s = START_TIMEOUT_S
    stop_timeout_s = STOP_TIMEOUT_S
    error = PrometheusError


class Prometheus(PrometheusServer):
    """Prometheus scraping static targets, the kubelet's file_sd pods and a Pushgateway every 2 s."""

    name = "prometheus"

    def __init__(
        self,
        data_dir: Path,
        *,
        static_targets: Sequence[str] = (),
        static_job: str = "finetune-operator",
        file_sd_files: Sequence[Path] = (),
        pushgateway: str | None = None,
        scrape_interval: str = SCRAPE_INTERVAL,
        port: int | None = None,
    ) -> None:
        """`static_targets` and `pushgateway` are host:port; `file_sd_files` are Kubelet.file_sd_path files."""
        super().__init__(data_dir, port)
        self.static_targets = list(static_targets)
        self.static_job = static_job
        self.file_sd_files = [Path(path).resolve() for path in file_sd_files]
        self.pushgateway = pushgateway
        self.scrape_interval = scrape_interval
        self.config_path = self.data_dir / "prometheus.yml"

    def config(self) -> dict[str, Any]:
        # A timeout longer than the interval is a config error in Prometheus.
        timing = {"scrape_interval": self.scrape_interval, "scrape_timeout": self.scrape_interval}
        jobs: list[dict[str, Any]] = []
        if self.static_targets:
            jobs.append({"job_name": self.static_job, **timing,
                         "static_configs": [{"targets": self.static_targets}]})
        if self.file_sd_files:
            jobs.append({"job_name": "pods", **timing,
                         "file_sd_configs": [{"files": [str(path) for path in self.file_sd_files],
                                              "refresh_interval": self.scrape_interval}]})
        if self.pushgateway:
            # honor_labels keeps the pushed job/instance labels instead of the gateway's own.
            jobs.append({"job_name": "pushgateway", "honor_labels": True, **timing,
                         "static_configs": [{"targets": [self.pushgateway]}]})
        return {"global": {**timing, "evaluation_interval": self.scrape_interval}, "scrape_configs": jobs}

    def _command(self) -> list[str]:
        binary = prometheus_binary()
        if binary is None:
            raise PrometheusError("prometheus is not installed (Debian: apt-get install prometheus)")
        for path in self.file_sd_files:
            if not path.exists():
                # Prometheus tolerates a missing file_sd file only until it first reads it.
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("[]")
        # JSON is YAML, and needs no YAML writer.
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        return [
            binary,
            f"--config.file={self.config_path}",
            f"--web.listen-address={self.address}",
            f"--storage.tsdb.path={self.data_dir / 'tsdb'}",
            "--storage.tsdb.retention.time=1d",
            # Debian's default console paths may be absent; nothing here uses consoles.
            f"--web.console.templates={self.data_dir}",
            f"--web.console.libraries={self.data_dir}",
            "--log.level=warn",
        ]

    def _api(self, path: str, params: dict[str, str] | None = None) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = _http_get(url, timeout=10)
        try:
            answer = json.loads(body)
        except json.JSONDecodeError as error:
            raise PrometheusError(f"GET {url}: {status} {body[:200]!r}") from error
        if status != 200 or answer.get("status") != "success":
            raise PrometheusError(f"GET {url}: {status} {answer.get('errorType')}: {answer.get('error')}")
        return answer["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector: [{"metric": {labels}, "value": [time, "text"]}, ...]."""
        data = self._api("query", {"query": promql})
        result: list[dict[str, Any]] = data.get("result") or []
        return result

    def query_value(self, promql: str) -> float | None:
        """The value of a query that yields one series, or None when it yields none yet."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"{promql!r} yields {len(result)} series, not one")
        return float(result[0]["value"][1])

    def wait_for(
        self, promql: str, predicate: Callable[[list[dict[str, Any]]], bool] = bool, timeout: float = 30.0
    ) -> list[dict[str, Any]]:
        """Poll the query until predicate(result) holds; raise with the last result after `timeout`."""
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if predicate(result):
                return result
            time.sleep(0.5)
        raise PrometheusError(f"{promql!r} did not reach the expected result within {timeout:.0f} s: {result}")

    def active_targets(self) -> list[dict[str, Any]]:
        data = self._api("targets", {"state": "active"})
        targets: list[dict[str, Any]] = data.get("activeTargets") or []
        return targets



class Pushgateway(PrometheusServer):
    """Prometheus Pushgateway, where batch jobs push final metrics; `address` is what clients push to."""

    name = "pushgateway"

    def _command(self) -> list[str]:
        binary = pushgateway_binary()
        if binary is None:
            raise PrometheusError("the Pushgateway is not installed (Debian: apt-get install prometheus-pushgateway)")
        return [binary, f"--web.listen-address={self.address}", "--log.level=warn"]



"""The operator's own Prometheus metrics, served on their own port (kopf serves liveness on another)."""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from finetune_operator import constants as c

RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Submitted-to-running spans image pulls and autoscaling: seconds to hours.
STARTUP_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)


class _PhaseCollector(Collector):
    """``finetune_operator_jobs{phase}`` counted at scrape time from the phases the reconciler last saw."""

    def __init__(self) -> None:
        self._phases: dict[str, str] = {}
        self._lock = threading.Lock()

    def set(self, uid: str, phase: str | None) -> None:
        with self._lock:
            if phase is None:
                self._phases.pop(uid, None)
            else:
                self._phases[uid] = phase

    def counts(self) -> dict[str, int]:
        with self._lock:
            tally = Tally(self._phases.values())
        return {phase: tally.get(phase, 0) for phase in c.PHASES}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("finetune_operator_jobs", "FineTuneJobs by phase.", labels=["phase"])
        for phase, count in self.counts().items():
            family.add_metric([phase], count)
        yield family


class OperatorMetrics:
    """Every operator metric in a registry of its own (tests run several operators in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.phases = _PhaseCollector()
        self.registry.register(self.phases)
        self.jobs_created = Counter("finetune_operator_jobs_created", "FineTuneJobs seen for the first time.",
                                    registry=self.registry)
        self.jobs_succeeded = Counter("finetune_operator_jobs_succeeded", "FineTuneJobs that succeeded.",
                                      registry=self.registry)
        self.jobs_failed = Counter("finetune_operator_jobs_failed", "FineTuneJobs that failed, by reason.",
                                   ["reason"], registry=self.registry)
        self.jobs_restarted = Counter("finetune_operator_jobs_restarted", "Gang restarts, by reason.",
                                      ["reason"], registry=self.registry)
        self.reconcile_seconds = Histogram("finetune_operator_reconcile_seconds",
                                           "Wall time of one reconcile (observe, decide, act).",
                                           buckets=RECONCILE_BUCKETS, registry=self.registry)
        self.submitted_to_running_seconds = Histogram(
            "finetune_operator_submitted_to_running_seconds",
            "From a FineTuneJob's creation to all its pods running for the first time.",
            buckets=STARTUP_BUCKETS, registry=self.registry,
        )
        self.api_requests = Counter("finetune_operator_api_requests", "Kubernetes API requests, by verb.",
                                    ["verb"], registry=self.registry)
        self.api_errors = Counter("finetune_operator_api_errors", "Failed Kubernetes API requests, by verb.",
                                  ["verb"], registry=self.registry)
        self._server: Any = None

    def serve(self, port: int, address: str) -> int:
        """Start the /metrics endpoint in a thread; returns the bound port (useful with port 0)."""
        self._server, _ = start_http_server(port, addr=address, registry=self.registry)
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

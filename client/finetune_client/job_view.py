"""A FineTuneJob as read from the API server: its status fields under names a notebook can tab-complete."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True)
class Job:
    """One FineTuneJob object; ``raw`` is the whole object as the API server returned it."""

    raw: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.raw["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.raw["metadata"].get("namespace", ""))

    @property
    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.raw.get("spec") or {}
        return spec

    @property
    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.raw.get("status") or {}
        return status

    @property
    def phase(self) -> str:
        return str(self.status.get("phase") or "Pending")

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL_PHASES

    @property
    def step(self) -> int:
        return int((self.status.get("progress") or {}).get("step") or 0)

    @property
    def total_steps(self) -> int | None:
        total = (self.status.get("progress") or {}).get("totalSteps")
        return int(total) if total else None

    @property
    def percent(self) -> float:
        return float((self.status.get("progress") or {}).get("percent") or 0.0)

    @property
    def eta_seconds(self) -> float | None:
        eta = (self.status.get("progress") or {}).get("etaSeconds")
        return float(eta) if isinstance(eta, int | float) else None

    def metric(self, name: str) -> float | None:
        value = (self.status.get("metrics") or {}).get(name)
        return float(value) if isinstance(value, int | float) else None

    @property
    def loss(self) -> float | None:
        return self.metric("loss")

    @property
    def eval_loss(self) -> float | None:
        return self.metric("evalLoss")

    @property
    def tokens_per_second(self) -> float | None:
        return self.metric("tokensPerSecond")

    @property
    def restarts(self) -> int:
        return int(self.status.get("restarts") or 0)

    @property
    def attempt(self) -> int:
        return int(self.status.get("attempt") or 0)

    @property
    def message(self) -> str:
        return str(self.status.get("message") or "")

    @property
    def conditions(self) -> list[dict[str, Any]]:
        return list(self.status.get("conditions") or [])

    @property
    def output_uri(self) -> str:
        return str((self.spec.get("output") or {}).get("uri", "")).rstrip("/")

    @property
    def model_uri(self) -> str:
        """Where the exported model is (status.model.uri once written, else ``<output.uri>/model/``)."""
        return str((self.status.get("model") or {}).get("uri") or f"{self.output_uri}/model/")

    def summary(self) -> dict[str, Any]:
        """The fields ``ftj ls`` and ``ftj status -o json`` show."""
        return {
            "name": self.name,
            "namespace": self.namespace,
            "phase": self.phase,
            "step": self.step,
            "totalSteps": self.total_steps,
            "percent": self.percent,
            "loss": self.loss,
            "evalLoss": self.eval_loss,
            "tokensPerSecond": self.tokens_per_second,
            "etaSeconds": self.eta_seconds,
            "attempt": self.attempt,
            "restarts": self.restarts,
            "message": self.message,
            "created": self.raw["metadata"].get("creationTimestamp"),
        }

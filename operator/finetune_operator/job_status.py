"""The next status of a FineTuneJob, built by ``decide`` and its policies on a copy of the current one: phase
transitions (each remembered for its Event), conditions (lastTransitionTime moves only on a flip), times."""

from __future__ import annotations

import copy
import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finetune_operator import constants as c
from finetune_operator.spec import format_time, parse_time


@dataclass(frozen=True)
class EventToEmit:
    type: str
    reason: str
    message: str


class JobStatus:
    """The next status, built on a copy of the current one; remembers the phase transition for its Event."""

    def __init__(self, current: Mapping[str, Any], now: datetime.datetime, generation: int) -> None:
        self.old_phase: str | None = current.get("phase")
        self.data: dict[str, Any] = copy.deepcopy(dict(current))
        self.now = now
        self.generation = generation
        self.transition: EventToEmit | None = None
        self.extra_events: list[EventToEmit] = []

    @property
    def phase(self) -> str | None:
        return self.data.get("phase")

    def get_int(self, key: str) -> int:
        value = self.data.get(key)
        return value if isinstance(value, int) else 0

    def time(self, key: str) -> datetime.datetime | None:
        return parse_time(self.data.get(key))

    def set_time(self, key: str, value: datetime.datetime) -> None:
        self.data[key] = format_time(value)

    def enter(self, phase: str, reason: str, message: str, event_type: str = c.EVENT_NORMAL) -> None:
        self.data["phase"] = phase
        self.data["message"] = message
        self.transition = EventToEmit(event_type, reason, message)

    def condition(self, kind: str) -> dict[str, Any] | None:
        for item in self.data.get("conditions") or []:
            if item.get("type") == kind:
                return dict(item)
        return None

    def condition_true(self, kind: str) -> bool:
        found = self.condition(kind)
        return found is not None and found.get("status") == "True"

    def set_condition(self, kind: str, status: bool, reason: str, message: str) -> None:
        """Add or update a condition; lastTransitionTime moves only when the status flips."""
        conditions = list(self.data.get("conditions") or [])
        text = "True" if status else "False"
        new = {"type": kind, "status": text, "reason": reason, "message": message,
               "lastTransitionTime": format_time(self.now), "observedGeneration": self.generation}
        for i, item in enumerate(conditions):
            if item.get("type") == kind:
                if item.get("status") == text and item.get("lastTransitionTime"):
                    new["lastTransitionTime"] = item["lastTransitionTime"]
                conditions[i] = new
                break
        else:
            conditions.append(new)
        self.data["conditions"] = conditions

    def clear_condition(self, kind: str, reason: str, message: str) -> None:
        """Turn an existing True condition False; a condition never set stays absent."""
        if self.condition_true(kind):
            self.set_condition(kind, False, reason, message)

    def finalize(self) -> dict[str, Any]:
        self.data["observedGeneration"] = self.generation
        for item in self.data.get("conditions") or []:
            item["observedGeneration"] = self.generation
        return self.data

"""Kubernetes status conditions: one per type, whose lastTransitionTime moves only when the status flips."""

from __future__ import annotations

from typing import Any


def upsert_condition(conditions: list[dict[str, Any]], new: dict[str, Any]) -> None:
    """Put ``new`` in place of the condition of its type, or append it; an unchanged status keeps its
    lastTransitionTime."""
    for index, item in enumerate(conditions):
        if item.get("type") == new["type"]:
            if item.get("status") == new["status"] and item.get("lastTransitionTime"):
                new["lastTransitionTime"] = item["lastTransitionTime"]
            conditions[index] = new
            return
    conditions.append(new)

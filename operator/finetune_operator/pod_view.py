"""What the decision reads from one pod of a job: rank, attempt, phase, how it ended, scheduling, disruption."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from finetune_operator import constants as c
from finetune_operator.spec import parse_time


@dataclass(frozen=True)
class PodView:
    """One pod of the job as the decision sees it; rank and attempt come from its labels."""

    name: str
    rank: int
    attempt: int
    phase: str
    deleting: bool
    scheduled: bool
    scheduled_at: datetime.datetime | None
    unschedulable_message: str | None
    exit_code: int | None
    termination_reason: str | None
    termination_message: str | None
    pod_reason: str | None
    disrupted: bool
    waiting_reason: str | None
    waiting_message: str | None
    pod_ip: str | None

    @property
    def terminal(self) -> bool:
        return self.phase in ("Succeeded", "Failed")

    @property
    def active(self) -> bool:
        """Still holds (or is about to hold) resources: not finished yet, whether deleting or not."""
        return not self.terminal


def _int_label(labels: Mapping[str, Any], key: str) -> int | None:
    try:
        return int(labels.get(key, ""))
    except (TypeError, ValueError):
        return None


def observe_pod(pod: Mapping[str, Any]) -> PodView | None:
    """The facts ``decide`` uses from one pod; None for pods without rank/attempt labels (not ours)."""
    metadata = pod.get("metadata") or {}
    labels = metadata.get("labels") or {}
    rank = _int_label(labels, c.LABEL_NODE_RANK)
    attempt = _int_label(labels, c.LABEL_ATTEMPT)
    if rank is None or attempt is None:
        return None
    status = pod.get("status") or {}
    spec = pod.get("spec") or {}
    conditions = {cond.get("type"): cond for cond in status.get("conditions") or [] if isinstance(cond, Mapping)}
    scheduled_condition = conditions.get("PodScheduled") or {}
    scheduled = bool(spec.get("nodeName")) or scheduled_condition.get("status") == "True"
    scheduled_at = None
    if scheduled:
        scheduled_at = (
            parse_time(scheduled_condition.get("lastTransitionTime"))
            or parse_time(status.get("startTime"))
            or parse_time(metadata.get("creationTimestamp"))
        )
    unschedulable = None
    if scheduled_condition.get("status") == "False" and scheduled_condition.get("reason") == c.UNSCHEDULABLE_REASON:
        unschedulable = str(scheduled_condition.get("message") or "the scheduler found no node for the pod")
    statuses = [s for s in status.get("containerStatuses") or [] if isinstance(s, Mapping)]
    trainer = next((s for s in statuses if s.get("name") == c.CONTAINER_NAME), statuses[0] if statuses else {})
    state = trainer.get("state") or {}
    terminated = state.get("terminated") or {}
    waiting = state.get("waiting") or {}
    exit_code = terminated.get("exitCode")
    disruption = conditions.get(c.CONDITION_DISRUPTION_TARGET) or {}
    pod_reason = status.get("reason")
    return PodView(
        name=str(metadata.get("name", "")),
        rank=rank,
        attempt=attempt,
        phase=str(status.get("phase") or "Pending"),
        deleting=bool(metadata.get("deletionTimestamp")),
        scheduled=scheduled,
        scheduled_at=scheduled_at,
        unschedulable_message=unschedulable,
        exit_code=exit_code if isinstance(exit_code, int) else None,
        termination_reason=terminated.get("reason"),
        termination_message=(terminated.get("message") or status.get("message") or None),
        pod_reason=pod_reason if isinstance(pod_reason, str) else None,
        disrupted=pod_reason in c.DISRUPTION_POD_REASONS or disruption.get("status") == "True",
        waiting_reason=waiting.get("reason"),
        waiting_message=waiting.get("message"),
        pod_ip=status.get("podIP") or None,
    )


def observe_pods(pods: Iterable[Mapping[str, Any]]) -> list[PodView]:
    """The job's pods that carry rank and attempt labels, as the decision sees them."""
    return [view for view in (observe_pod(pod) for pod in pods) if view is not None]

"""Pods the API server refuses to create: which refusals are permanent, how one is recorded, when the job fails.

The reconcile records a refusal in the job's status (condition PodCreateFailed, its lastTransitionTime the first
refusal); the job fails of it at once when it is permanent, else once startupDeadlineSeconds have passed with pods
still missing.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from finetune_operator import constants as c
from finetune_operator.decision import DecisionDraft, ObservedJob
from finetune_operator.job_status import JobStatus
from finetune_operator.spec import parse_time


def refusal_is_permanent(http_status: int, message: str) -> bool:
    """Whether a refused pod create can never succeed for this spec: the pod is invalid (400, 422), or the
    namespace's Pod Security level forbids it. Other refusals (a PriorityClass or ServiceAccount not created yet,
    quota, RBAC) may pass later."""
    return http_status in (400, 422) or (http_status == 403 and "violates PodSecurity" in message)


def record_create_refusal(
    status: Mapping[str, Any], http_status: int, message: str, now: datetime.datetime, generation: int
) -> dict[str, Any]:
    """The status with PodCreateFailed set from a refused pod create (reason PodRejected when permanent)."""
    next_status = JobStatus(status, now, generation)
    reason = c.REASON_POD_REJECTED if refusal_is_permanent(http_status, message) else c.REASON_FAILED_CREATE
    next_status.set_condition(c.CONDITION_POD_CREATE_FAILED, True, reason, message)
    return next_status.finalize()


@dataclass(frozen=True)
class RefusalVerdict:
    """Fail the job (reason, message), or retry the creates until a moment, or nothing to do."""

    failure: tuple[str, str] | None = None
    retry_until: datetime.datetime | None = None


def create_refusal_verdict(status: JobStatus, startup_deadline_seconds: int, *, all_created: bool) -> RefusalVerdict:
    """What a recorded refusal means now; clears it once every pod of the attempt exists."""
    refused = status.condition(c.CONDITION_POD_CREATE_FAILED)
    if refused is None or refused.get("status") != "True":
        return RefusalVerdict()
    if all_created:
        status.clear_condition(c.CONDITION_POD_CREATE_FAILED, c.REASON_PODS_CREATED, "every pod was created")
        return RefusalVerdict()
    since = parse_time(refused.get("lastTransitionTime")) or status.now
    deadline = since + datetime.timedelta(seconds=startup_deadline_seconds)
    reason = str(refused.get("reason") or c.REASON_FAILED_CREATE)
    if reason == c.REASON_POD_REJECTED:
        return RefusalVerdict(failure=(reason, f"The API server refused the pods: {refused.get('message', '')}"))
    if status.now >= deadline:
        return RefusalVerdict(failure=(reason, f"The API server refused the pods for {startup_deadline_seconds}s "
                                               f"(startupDeadlineSeconds): {refused.get('message', '')}"))
    return RefusalVerdict(retry_until=deadline)


def fail_on_refused_creates(observed: ObservedJob, draft: DecisionDraft) -> bool:
    """Fail the job the API server refused pods for (at once when the refusal is permanent, else once
    startupDeadlineSeconds have passed with pods still missing); until then, look again at that deadline."""
    refusal = create_refusal_verdict(draft.status, observed.spec.startup_deadline_seconds,
                                     all_created=not observed.missing)
    if refusal.failure is not None:
        reason, message = refusal.failure
        draft.finish(succeeded=False, reason=reason, message=message)
        return True
    if refusal.retry_until is not None:
        draft.requeue_at(refusal.retry_until)
    return False

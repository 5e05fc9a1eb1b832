"""Invalid specs fail the job with an InvalidSpec condition naming the field; a corrected spec starts it again."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from finetune_operator import constants as c
from finetune_operator.decision import DecisionDraft
from finetune_operator.spec import FineTuneJob, InvalidSpecError, parse_job


def accept_spec(body: Mapping[str, Any], draft: DecisionDraft) -> FineTuneJob | None:
    """The parsed job, or None when the spec is invalid: the job fails with an InvalidSpec condition naming the
    field. A later edit that fixes it (a new generation) starts the job again."""
    status = draft.status
    try:
        parsed = parse_job(body)
    except InvalidSpecError as error:
        if status.phase in c.FINISHED_PHASES and not status.condition_true(c.CONDITION_INVALID_SPEC):
            return None
        message = str(error)
        status.set_condition(c.CONDITION_INVALID_SPEC, True, c.REASON_INVALID_SPEC, message)
        draft.finish(succeeded=False, reason=c.REASON_INVALID_SPEC, message=message)
        if status.old_phase == c.PHASE_FAILED:
            status.keep_completion_time()
        return None
    if status.condition_true(c.CONDITION_INVALID_SPEC):
        status.set_condition(c.CONDITION_INVALID_SPEC, False, c.REASON_SPEC_VALID, "the spec is valid")
        if status.phase == c.PHASE_FAILED:
            # Start over as a new job; a new attempt number keeps any pods left behind out of the way.
            status.reopen(c.REASON_SPEC_VALID, "the spec was corrected")
            if draft.pods:
                status.set_attempt(max(pod.attempt for pod in draft.pods) + 1)
    return parsed

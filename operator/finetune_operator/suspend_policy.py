"""spec.suspend: a suspended job has no pods; a gang that had started comes back as a new attempt on resume."""

from __future__ import annotations

from finetune_operator import constants as c
from finetune_operator.decision import DecisionDraft, ObservedJob


def suspend(observed: ObservedJob, draft: DecisionDraft) -> bool:
    """Complete the decision for a suspended job: its pods deleted, phase Suspended; leave any other alone."""
    if not observed.spec.suspend:
        return False
    status = draft.status
    draft.delete_pods(observed.current)
    if status.phase != c.PHASE_SUSPENDED:
        if observed.current:
            # Resuming starts a new attempt, so its pods never meet the suspended gang's while those terminate.
            status.record_restart()
        status.enter(c.PHASE_SUSPENDED, c.REASON_SUSPENDED, "Suspended: the job has no pods until resumed")
        status.set_condition(c.CONDITION_SUSPENDED, True, c.REASON_SUSPENDED, "spec.suspend is true")
        status.clear_condition(c.CONDITION_RUNNING, c.REASON_SUSPENDED, "the job is suspended")
        status.clear_condition(c.CONDITION_WAITING_FOR_CAPACITY, c.REASON_SUSPENDED, "the job is suspended")
        # The active deadline counts running time since the last resume, as for a Kubernetes Job.
        status.clear_time("startTime")
        status.clear_time("restartAfter")
    return True

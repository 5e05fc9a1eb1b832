"""Finished jobs stay finished: leftover pods cleaned by cleanPodPolicy, the job deleted after its TTL."""

from __future__ import annotations

import datetime

from finetune_operator import constants as c
from finetune_operator.decision import DecisionDraft, DeleteJob, ObservedJob


def keep_finished(observed: ObservedJob, draft: DecisionDraft) -> bool:
    """Complete the decision for a Succeeded or Failed job; leave any other to the next policies."""
    status = draft.status
    if status.phase not in c.FINISHED_PHASES:
        return False
    draft.clean_pods()
    finished_at = status.time("completionTime")
    if finished_at is None:
        # A finish whose status write carried no time (an older operator, a hand edit): the TTL counts from now.
        finished_at = draft.now
        status.set_time("completionTime", draft.now)
    ttl = observed.spec.ttl_seconds_after_finished
    if ttl is not None:
        expires = finished_at + datetime.timedelta(seconds=ttl)
        if draft.now >= expires:
            draft.actions.append(DeleteJob())
        else:
            draft.requeue_at(expires)
    return True

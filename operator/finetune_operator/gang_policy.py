"""Gang scheduling (spec.gang): the PodGroups follow the job, and a cluster without the PodGroup API fails it.

The reconcile lists the job's PodGroups (``GangObservation``); the attempt's PodGroup is created before its pods
(``decide``'s gang step, create-if-absent) and every other one is deleted: those of earlier attempts, and the
current one once the job has finished, is suspended or waits in a Kueue queue (no pods, so nothing for the gang
scheduler to hold capacity for). The garbage collector removes any left with the job (each names the job as its
controller). A cluster that does not serve the PodGroup API (its CRD is not installed) or does not let the
operator use it fails a job with pods to create at once, with reason PodGroupAPIUnavailable naming the CRD: pods
handed to a scheduler that is not there would wait forever.
"""

from __future__ import annotations

from finetune_operator import constants as c
from finetune_operator.decision import DecisionDraft, DeletePodGroup, ObservedJob
from finetune_operator.gang import GangObservation

# The phases in which no pod of the job exists or will be created without a new attempt or admission.
NO_GANG_PHASES = c.FINISHED_PHASES | {c.PHASE_SUSPENDED, c.PHASE_QUEUED}


def pod_group_crd(api_version: str) -> str:
    """The CRD that serves a PodGroup API: ``podgroups.scheduling.volcano.sh`` for Volcano's."""
    return f"{c.POD_GROUPS}.{api_version.split('/')[0]}"


def unavailable_message(scheduler: str, api_version: str, http_status: int, detail: str = "") -> str:
    """Why the job cannot have its PodGroup, in words that say what to install or grant."""
    crd = pod_group_crd(api_version)
    if http_status == 404:
        return (f"spec.gang.scheduler {scheduler} needs PodGroups ({api_version}), but this cluster does not serve "
                f"them: the CRD {crd} is not installed. Install the scheduler, or remove spec.gang")
    value = "volcano" if scheduler == c.GANG_VOLCANO else "coscheduling"
    return (f"spec.gang.scheduler {scheduler}: the operator may not use {crd} (HTTP {http_status}): install the "
            f"chart with gangScheduling.{value}=true. {detail}").strip()


def fail_without_pod_group_api(observed: ObservedJob, draft: DecisionDraft) -> bool:
    """Fail the job whose PodGroup API is missing or forbidden when pods of its attempt are still to be created,
    before they are handed to that scheduler. A gang whose pods all exist trains on (its scheduler has placed it
    already): a CRD removed or a permission lost in the meantime, a chart upgrade's moment without its Role, must
    not kill a running job."""
    gang = observed.gang
    if gang is None or gang.unavailable is None or not observed.missing:
        return False
    draft.finish(succeeded=False, reason=c.REASON_POD_GROUP_API_UNAVAILABLE, message=gang.unavailable)
    return True


def release_pod_groups(gang: GangObservation | None, draft: DecisionDraft) -> None:
    """Delete the PodGroups of other attempts, and the current one when the job has no gang to schedule."""
    if gang is None:
        return
    attempt, idle = draft.status.get_int("attempt"), draft.status.phase in NO_GANG_PHASES
    draft.actions += [DeletePodGroup(gang.api_version, group.name) for group in gang.pod_groups
                      if not group.deleting and (idle or group.attempt != attempt)]

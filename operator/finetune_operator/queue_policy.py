"""Kueue admission: a job with spec.queueName has no pods until Kueue admits its Workload, the whole gang at once.

Why the operator manages ``Workload`` objects itself rather than using Kueue's plain-pod group integration: the pod
groups need Kueue's pod webhook to gate every pod the operator creates (a webhook the API server must reach, and
a failure policy that decides whether pods slip through ungated while Kueue is down); every restart of the gang
is a new pod group that Kueue would see as a new workload (losing its place and its admission); and preemption
would be Kueue deleting pods behind the operator's back. With a Workload owned by the job, the gang exists in
Kueue's eyes from creation to the end, nothing is created before admission (so no startup or capacity deadline runs
while queued), an eviction is a condition the operator answers with a checkpointed gang restart, and a finished
job marks its Workload Finished so the quota is free at once. No webhook is involved.

The Workload is ``builders.build_workload``; the statuses it is read from and written with are in ``workload.py``.

A finished job (Succeeded, or Failed for any reason, an invalid spec included) marks its Workload Finished, as
Kueue's job integrations do (``workload.Finish`` in its jobframework), rather than deleting it: Kueue frees the
quota on the condition at once, and the Workload stays beside the job as the record of where it ran (the garbage
collector removes both together). A failed job that is started again (a corrected spec) gets a new Workload.
A cluster that does not serve Kueue's Workload API, or does not let the operator use it, fails a job with pods
still to create with reason WorkloadAPIUnavailable naming the CRD or the permission, as ``gang_policy`` does for
PodGroups: without Kueue nothing would ever admit it.
"""

from __future__ import annotations

from finetune_operator import constants as c
from finetune_operator.builders import build_workload
from finetune_operator.decision import (
    CreateChild,
    DecisionDraft,
    DeleteWorkload,
    ObservedJob,
    PatchWorkloadStatus,
)
from finetune_operator.workload import QueueObservation, WorkloadView, clear_admission_patch, finish_patch


def _matches(workload: WorkloadView, observed: ObservedJob) -> bool:
    """The Workload still describes the gang: same queue, size and priority class (they change only while the
    job is suspended, when the Workload is deleted anyway; this catches changes the operator did not see)."""
    spec = observed.spec
    return (workload.queue_name == spec.queue_name and workload.count == spec.distributed.nodes
            and workload.priority_class == spec.workload_priority_class)


def _queue(observed: ObservedJob, draft: DecisionDraft, reason: str, message: str, *, evicted: bool = False) -> None:
    """Phase Queued with Kueue's words in the Queued condition. A gang that has pods stops: its pods go (SIGTERM
    writes an emergency checkpoint) and it comes back as the next attempt, not counted against backoffLimit."""
    status = draft.status
    if observed.current:
        draft.delete_pods(observed.current)
        status.record_restart()
    status.set_condition(c.CONDITION_QUEUED, True, reason, message)
    if status.phase == c.PHASE_QUEUED:
        status.set_message(f"Queued: {message}")
        return
    if status.phase == c.PHASE_SUSPENDED:
        status.clear_condition(c.CONDITION_SUSPENDED, c.REASON_RESUMED, "spec.suspend is false")
    status.enter(c.PHASE_QUEUED, c.REASON_EVICTED if evicted else reason, f"Queued: {message}",
                 c.EVENT_WARNING if evicted else c.EVENT_NORMAL)
    status.clear_condition(c.CONDITION_RUNNING, c.CONDITION_QUEUED, "the job is queued")
    status.clear_condition(c.CONDITION_WAITING_FOR_CAPACITY, c.CONDITION_QUEUED, "the job is queued")
    # The active deadline counts running time since the last admission, as after a resume.
    status.clear_time("startTime")
    status.clear_time("restartAfter")


def _create_workload(observed: ObservedJob, draft: DecisionDraft) -> None:
    """The Workload, unless its WorkloadPriorityClass does not exist (Kueue could not order it): queued until it
    does (the resync looks again)."""
    spec, queue = observed.spec, observed.queue
    if queue.priority_class_missing:
        _queue(observed, draft, c.REASON_PRIORITY_CLASS_NOT_FOUND,
               f"WorkloadPriorityClass {spec.workload_priority_class} does not exist")
        return
    draft.actions.append(CreateChild(build_workload(observed.job, observed.trainer_image, queue.priority)))
    _queue(observed, draft, c.REASON_WORKLOAD_CREATED,
           f"waiting for Kueue to admit the gang of {spec.distributed.nodes} pod(s) in LocalQueue {spec.queue_name}")


def workload_unavailable_message(http_status: int, detail: str = "") -> str:
    """Why a job with spec.queueName cannot have its Workload, in words that say what to install or grant."""
    crd = f"{c.KUEUE_WORKLOADS}.{c.KUEUE_GROUP}"
    if http_status == 404:
        return (f"spec.queueName needs Kueue's Workloads ({c.KUEUE_API_VERSION}), but this cluster does not serve "
                f"them: the CRD {crd} is not installed. Install Kueue (then upgrade this chart, or install it with "
                f"kueue.enabled=true), or remove spec.queueName")
    return (f"spec.queueName: the operator may not use {crd} (HTTP {http_status}): the chart grants it only where "
            f"Kueue's API is served when the chart is rendered; install the chart with kueue.enabled=true, or "
            f"upgrade it now that Kueue is installed. {detail}").strip()


def fail_without_workload_api(observed: ObservedJob, draft: DecisionDraft) -> bool:
    """Fail the queued job whose Workload API is missing or forbidden while pods of its attempt are still to be
    created: nothing would ever admit it. A gang whose pods all exist trains on (it was admitted before the CRD or
    the permission went, a chart upgrade's moment without its rules must not kill it)."""
    if observed.spec.queue_name is None or observed.queue.unavailable is None or not observed.missing:
        return False
    draft.finish(succeeded=False, reason=c.REASON_WORKLOAD_API_UNAVAILABLE, message=observed.queue.unavailable)
    return True


def wait_for_admission(observed: ObservedJob, draft: DecisionDraft) -> bool:
    """Complete the decision while the job's Workload is not admitted: create it (or recreate it when the gang
    changed shape), stop a gang Kueue evicted and release the admission once its pods are gone, and report Kueue's
    reason while waiting. Once admitted, the Queued condition turns False and the gang is created by ``decide``."""
    if observed.spec.queue_name is None or observed.queue.unavailable is not None:
        return False
    workload = observed.queue.workload
    if workload is None:
        _create_workload(observed, draft)
        return True
    # A Finished Workload belongs to an ended run (a failed job started again): its quota is gone.
    if workload.deleting or workload.finished or not _matches(workload, observed):
        if not workload.deleting:
            draft.actions.append(DeleteWorkload(workload.name))
        _queue(observed, draft, c.REASON_WORKLOAD_CREATED, f"Workload {workload.name} is replaced by a new one")
        return True
    if workload.evicted:
        reason, message = workload.why(c.WORKLOAD_EVICTED, (c.REASON_EVICTED, "evicted"))
        _queue(observed, draft, reason, f"evicted by Kueue ({reason}): {message}", evicted=True)
        if workload.quota_reserved and not any(pod.active for pod in draft.pods):
            draft.actions.append(PatchWorkloadStatus(workload.name, clear_admission_patch(workload, draft.now)))
        return True
    if not workload.admitted:
        _queue(observed, draft, *workload.waiting())
        return True
    draft.status.clear_condition(c.CONDITION_QUEUED, c.REASON_ADMITTED,
                                 f"admitted by ClusterQueue {workload.cluster_queue}")
    return False


def finish_workload(queue: QueueObservation | None, draft: DecisionDraft) -> bool:
    """A finished job marks its Workload Finished with its outcome (Kueue frees the quota at once) and says it has
    left the queue; True when the job has finished. Also for a job failed for an invalid spec, whose spec is not
    parsed: the Workload was read for its raw spec.queueName."""
    status = draft.status
    if status.phase not in c.FINISHED_PHASES:
        return False
    status.clear_condition(c.CONDITION_QUEUED, c.REASON_FINISHED, "the job finished")
    workload = queue.workload if queue is not None else None
    if workload is not None and not workload.deleting and not workload.finished:
        patch = finish_patch(workload, draft.now, succeeded=status.phase == c.PHASE_SUCCEEDED,
                             message=str(status.data.get("message") or ""))
        draft.actions.append(PatchWorkloadStatus(workload.name, patch))
    return True


def release_workload(observed: ObservedJob, draft: DecisionDraft) -> None:
    """After the policies: a finished job marks its Workload Finished (``finish_workload``); a suspended job, or
    one no longer queued, deletes it (a resumed job queues anew with the gang's new shape)."""
    workload, status, spec = observed.queue.workload, draft.status, observed.spec
    if spec.suspend:
        status.clear_condition(c.CONDITION_QUEUED, c.REASON_SUSPENDED, "the job is suspended")
    if finish_workload(observed.queue, draft) or workload is None or workload.deleting:
        return
    if spec.suspend or spec.queue_name is None:
        draft.actions.append(DeleteWorkload(workload.name))

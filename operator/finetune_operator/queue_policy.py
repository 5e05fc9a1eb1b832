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
from finetune_operator.workload import WorkloadView, clear_admission_patch, finish_patch


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


def wait_for_admission(observed: ObservedJob, draft: DecisionDraft) -> bool:
    """Complete the decision while the job's Workload is not admitted: create it (or recreate it when the gang
    changed shape), stop a gang Kueue evicted and release the admission once its pods are gone, and report Kueue's
    reason while waiting. Once admitted, the Queued condition turns False and the gang is created by ``decide``."""
    if observed.spec.queue_name is None:
        return False
    workload = observed.queue.workload
    if workload is None:
        _create_workload(observed, draft)
        return True
    if workload.deleting or not _matches(workload, observed):
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


def release_workload(observed: ObservedJob, draft: DecisionDraft) -> None:
    """After the policies: a finished job marks its Workload Finished (Kueue frees the quota at once); a suspended
    job, or one no longer queued, deletes it (a resumed job queues anew with the gang's new shape)."""
    workload, status, spec = observed.queue.workload, draft.status, observed.spec
    if spec.suspend:
        status.clear_condition(c.CONDITION_QUEUED, c.REASON_SUSPENDED, "the job is suspended")
    if workload is None or workload.deleting:
        return
    if status.phase in c.FINISHED_PHASES:
        if not workload.finished:
            patch = finish_patch(workload, draft.now, succeeded=status.phase == c.PHASE_SUCCEEDED,
                                 message=str(status.data.get("message") or ""))
            draft.actions.append(PatchWorkloadStatus(workload.name, patch))
        return
    if spec.suspend or spec.queue_name is None:
        draft.actions.append(DeleteWorkload(workload.name))

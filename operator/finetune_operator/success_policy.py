"""Success: node rank 0 exits 0 once it has trained, exported and (by default) verified the model; its peers' exits
do not decide it."""

from __future__ import annotations

from finetune_operator import constants as c
from finetune_operator.builders import model_uri
from finetune_operator.decision import DecisionDraft, ObservedJob
from finetune_operator.model_verification import record_model_verification
from finetune_operator.progress import sample_from_result
from finetune_operator.tracking_status import record_tracking


def finish_on_success(observed: ObservedJob, draft: DecisionDraft) -> bool:
    """Complete the decision when rank 0 of the current attempt succeeded: the model, the final numbers,
    phase Succeeded and the pods cleaned by policy."""
    rank0 = next((pod for pod in observed.current if pod.rank == 0), None)
    if rank0 is None or rank0.phase != "Succeeded":
        return False
    spec = observed.spec
    model = model_uri(spec.output.uri)
    draft.status.record_model(model, spec.export)
    # The trainer's final summary (termination message) is authoritative; the last scrape may be older.
    final = sample_from_result(rank0.termination_message) or observed.sample
    if final is not None:
        draft.status.record_progress(final, spec.output.uri, spec.distributed.world_size)
        record_tracking(draft.status, final, spec)
    # The trainer's check of the exported model (spec.evaluation.verifyExport), when it ran.
    record_model_verification(draft.status, [rank0])
    draft.finish(succeeded=True, reason=c.REASON_SUCCEEDED, message=f"Model written to {model}")
    return True

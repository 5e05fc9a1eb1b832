"""ModelVerified: the trainer's verdict on the exported model, read from rank 0's termination message."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from finetune_operator import constants as c
from finetune_operator.job_status import JobStatus
from finetune_operator.pod_view import PodView


def verification_verdict(message: str | None) -> tuple[bool, str] | None:
    """(verified, condition message) from a trainer's termination message; None when it says nothing about the
    check (no verification ran, or the pod ended before the export).

    A succeeded rank 0 leaves its result summary (JSON) with ``verification: {ok, files, answers, seconds}``; a
    failed check leaves the reason ``... model verification failed: <file>: <problem>``.
    """
    if not message:
        return None
    text = message.strip()
    if text.startswith("{"):
        try:
            summary = json.loads(text)
        except ValueError:
            return None
        verification = summary.get("verification") if isinstance(summary, dict) else None
        if not isinstance(verification, dict) or not isinstance(verification.get("ok"), bool):
            return None
        return verification["ok"], _describe(verification)
    at = text.find(c.MODEL_VERIFICATION_FAILED)
    if at < 0:
        return None
    return False, text[at:]


def _describe(verification: dict[str, Any]) -> str:
    if not verification["ok"]:
        return c.MODEL_VERIFICATION_FAILED
    files, answers, seconds = (verification.get(key) for key in ("files", "answers", "seconds"))
    text = "the exported model loaded back from storage in a fresh process: every weight finite"
    if isinstance(files, int):
        text += f" in {files} files"
    if isinstance(answers, int):
        text += f", {answers} answers generated"
    if isinstance(seconds, int | float) and not isinstance(seconds, bool):
        text += f" ({seconds:.1f} s)"
    return text


def record_model_verification(status: JobStatus, pods: Iterable[PodView]) -> None:
    """Set ModelVerified from the first pod (by rank) whose termination message carries a verdict."""
    for pod in sorted(pods, key=lambda p: p.rank):
        verdict = verification_verdict(pod.termination_message)
        if verdict is not None:
            verified, message = verdict
            reason = c.REASON_MODEL_VERIFIED if verified else c.REASON_VERIFICATION_FAILED
            status.set_condition(c.CONDITION_MODEL_VERIFIED, verified, reason, message)
            return

"""Which remembered jobs are gone: the decision that closes watch gaps, from one consistent list of the jobs.

A watch that broke (the API server restarted, a connection dropped, history compacted away: 410 Gone) resumes with a
relist that shows the jobs that exist and says nothing of those deleted meanwhile, so their DELETED events are lost.
A job the operator still remembers is gone when the list, asked for after the job was last seen, holds no job of
that name or one with another uid (deleted and created again). A job seen only after the list was asked for may
be newer than the list and stays.

What is remembered of a job's body between watch events leaves out the metadata no reconcile reads: with a
thousand jobs their field-ownership maps alone would be tens of megabytes of the operator's memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

# Kept in the remembered body only by reference (never read by a reconcile) and often its biggest part: the API
# server's field ownership (a nested map of every field each writer set) and kubectl's copy of the applied object.
UNREAD_METADATA: Final = frozenset({"managedFields"})
UNREAD_ANNOTATIONS: Final = frozenset({"kubectl.kubernetes.io/last-applied-configuration"})

JobKey = tuple[str, str]
"""(namespace, name) of a FineTuneJob."""


@dataclass(frozen=True)
class RememberedJob:
    """What the operator knows of a job: its uid (None until its body is read) and when it last heard of it."""

    uid: str | None
    seen_at: float


def jobs_gone(
    remembered: Mapping[JobKey, RememberedJob], listed: Iterable[Mapping[str, Any]], listed_from: float
) -> list[JobKey]:
    """The remembered jobs to forget, given the objects (or their metadata) of a list asked for at ``listed_from``
    (the same clock as ``seen_at``)."""
    existing: dict[JobKey, str | None] = {}
    for item in listed:
        metadata = item.get("metadata") or {}
        existing[(str(metadata.get("namespace") or "default"), str(metadata.get("name")))] = metadata.get("uid")
    gone = []
    for key, job in remembered.items():
        if job.seen_at >= listed_from:
            continue
        if key not in existing or (job.uid is not None and existing[key] != job.uid):
            gone.append(key)
    return gone


def remembered_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The job as the operator keeps it between watch events: everything a reconcile reads, without the metadata
    no reconcile reads (``UNREAD_METADATA``, ``UNREAD_ANNOTATIONS``). Shares the unchanged parts with ``body``."""
    metadata = body.get("metadata")
    if not isinstance(metadata, Mapping):
        return dict(body)
    annotations = metadata.get("annotations")
    lean = {key: value for key, value in metadata.items() if key not in UNREAD_METADATA}
    if isinstance(annotations, Mapping) and not UNREAD_ANNOTATIONS.isdisjoint(annotations):
        lean["annotations"] = {key: value for key, value in annotations.items() if key not in UNREAD_ANNOTATIONS}
    return {**body, "metadata": lean}

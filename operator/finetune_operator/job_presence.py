"""Which remembered jobs are gone: the decision that closes watch gaps, from one consistent list of the jobs.

A watch that broke (the API server restarted, a connection dropped, history compacted away: 410 Gone) resumes with a
relist that shows the jobs that exist and says nothing of those deleted meanwhile, so their DELETED events are lost.
A job the operator still remembers is gone when the list, asked for after the job was last seen, holds no job of
that name or one with another uid (deleted and created again). A job seen only after the list was asked for may
be newer than the list and stays.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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

"""A job's logs across gang restarts and after its pods are gone: node ``rank``'s pod of each attempt
(``<job>-a<attempt>-n<rank>``) while it exists, else the copy its launcher uploaded to
``<output.uri>/logs/attempt-<attempt>/node-<rank>.log`` (every 30 s while it ran, and at its exit)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from finetune_client.errors import JobNotFound, LogNotFound
from finetune_client.job_view import Job
from finetune_client.kube import REQUEST_TIMEOUT_S, translated_errors
from finetune_client.storage import join_uri

if TYPE_CHECKING:
    from finetune_client.client import Client

STARTED_PHASES = ("Running", "Succeeded", "Failed")
STORED_LOG = re.compile(r"/logs/attempt-(\d+)/node-(\d+)\.log$")


def pod_name(job: str, attempt: int, rank: int) -> str:
    return f"{job}-a{attempt}-n{rank}"


def stored_log_uri(output_uri: str, attempt: int, rank: int) -> str:
    """Where the trainer's launcher uploads node ``rank``'s log of ``attempt`` (finetune_trainer.node_log)."""
    return join_uri(output_uri, "logs", f"attempt-{attempt}", f"node-{rank}.log")


def stored_attempts(keys: list[str], rank: int) -> list[int]:
    """The attempts with a stored log of node ``rank`` among ``keys``, in order."""
    found = (STORED_LOG.search(key) for key in keys)
    return sorted(int(m.group(1)) for m in found if m is not None and int(m.group(2)) == rank)


class PodLogs:
    """Reads one node's log of a job; following it moves on to the next attempt's pod when the gang restarts."""

    def __init__(self, client: Client, job: str, rank: int, poll_seconds: float = 1.0) -> None:
        self.client = client
        self.job = job
        self.rank = rank
        self.poll_seconds = poll_seconds

    def lines(self, attempt: int | None, follow: bool) -> Iterator[str]:
        job = self.client.get(self.job)
        current = job.attempt if attempt is None else attempt
        if not follow or job.finished:
            yield from self._lines_of_one(job, current, latest=attempt is None)
            return
        while True:
            pod = pod_name(self.job, current, self.rank)
            if self._wait_started(pod):
                yield from self._stream(pod)
            else:
                # Gone before it was seen running (a short attempt, or its pods already deleted).
                stored = self._stored(self.client.get(self.job), current)
                yield from stored.splitlines() if stored is not None else ()
            if attempt is not None:
                return
            following = self._next_attempt(current)
            if following is None:
                return
            current = following
            yield f"--- {self.job}: attempt {current} (the gang restarted) ---"

    def _lines_of_one(self, job: Job, attempt: int, latest: bool) -> Iterator[str]:
        """The pod's log, else the stored one; ``latest``: an earlier attempt's when this one left none."""
        pod = pod_name(self.job, attempt, self.rank)
        text: str | None
        try:
            text = self._read(pod)
        except JobNotFound:
            text = self._stored(job, attempt)
            if text is None and latest:
                earlier = [a for a in self._stored_attempts(job) if a < attempt]
                text = self._stored(job, earlier[-1]) if earlier else None
        if text is None:
            where = stored_log_uri(job.output_uri, attempt, self.rank)
            raise LogNotFound(f"no log of node {self.rank} of FineTuneJob {job.namespace}/{job.name} ({job.phase}), "
                              f"attempt {attempt}: pod {pod} does not exist and nothing is stored at {where}")
        yield from text.splitlines()

    def _stored(self, job: Job, attempt: int) -> str | None:
        data = self.client.storage_for(job).read(stored_log_uri(job.output_uri, attempt, self.rank))
        return None if data is None else data.decode(errors="replace")

    def _stored_attempts(self, job: Job) -> list[int]:
        listed = self.client.storage_for(job).list(join_uri(job.output_uri, "logs") + "/")
        return stored_attempts([key for key, _ in listed], self.rank)

    def _pod_phase(self, pod: str) -> str | None:
        try:
            with translated_errors(self.client.host, f"pod {self.client.namespace}/{pod}"):
                found = self.client.core.read_namespaced_pod(pod, self.client.namespace,
                                                             _request_timeout=REQUEST_TIMEOUT_S)
        except JobNotFound:
            return None
        return str(found.status.phase or "Pending")

    def _wait_started(self, pod: str) -> bool:
        """Wait until the pod runs or ran; False when the job ended (or moved on) without it ever starting."""
        while True:
            phase = self._pod_phase(pod)
            if phase in STARTED_PHASES:
                return True
            job = self.client.get(self.job)
            if job.finished or (phase is None and job.attempt > int(pod.rsplit("-a", 1)[1].split("-n")[0])):
                return False
            time.sleep(self.poll_seconds)

    def _next_attempt(self, current: int) -> int | None:
        """The attempt after ``current`` once it exists, or None when the job finished instead."""
        while True:
            job = self.client.get(self.job)
            if job.attempt > current:
                return job.attempt
            if job.finished:
                return None
            time.sleep(self.poll_seconds)

    def _read(self, pod: str) -> str:
        with translated_errors(self.client.host, f"pod {self.client.namespace}/{pod}"):
            text = self.client.core.read_namespaced_pod_log(pod, self.client.namespace,
                                                            _request_timeout=REQUEST_TIMEOUT_S)
        return str(text)

    def _stream(self, pod: str) -> Iterator[str]:
        with translated_errors(self.client.host, f"pod {self.client.namespace}/{pod}"):
            response: Any = self.client.core.read_namespaced_pod_log(
                pod, self.client.namespace, follow=True, _preload_content=False
            )
        pending = b""
        try:
            with translated_errors(self.client.host, f"pod {self.client.namespace}/{pod}"):
                for chunk in response.stream(4096):
                    pending += chunk
                    *complete, pending = pending.split(b"\n")
                    for line in complete:
                        yield line.decode(errors="replace")
        except JobNotFound:
            pass  # the pod was deleted (the gang restarted) while it was followed
        finally:
            response.release_conn()
        if pending:
            yield pending.decode(errors="replace")

"""A job's logs across gang restarts: node ``rank``'s pod of each attempt, ``<job>-a<attempt>-n<rank>``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from finetune_client.errors import JobNotFound
from finetune_client.kube import REQUEST_TIMEOUT_S, translated_errors

if TYPE_CHECKING:
    from finetune_client.client import Client

STARTED_PHASES = ("Running", "Succeeded", "Failed")


def pod_name(job: str, attempt: int, rank: int) -> str:
    return f"{job}-a{attempt}-n{rank}"


class PodLogs:
    """Reads one node's log of a job; following it moves on to the next attempt's pod when the gang restarts."""

    def __init__(self, client: Client, job: str, rank: int, poll_seconds: float = 1.0) -> None:
        self.client = client
        self.job = job
        self.rank = rank
        self.poll_seconds = poll_seconds

    def lines(self, attempt: int | None, follow: bool) -> Iterator[str]:
        current = self.client.get(self.job).attempt if attempt is None else attempt
        if not follow:
            try:
                yield from self._read(pod_name(self.job, current, self.rank))
            except JobNotFound as exc:
                # A finished job's pods are deleted unless spec.cleanPodPolicy says None.
                kept = "a finished job keeps its pods only with spec.cleanPodPolicy: None"
                raise JobNotFound(f"{exc} ({kept})") from None
            return
        while True:
            pod = pod_name(self.job, current, self.rank)
            if self._wait_started(pod):
                yield from self._stream(pod)
            if attempt is not None:
                return
            following = self._next_attempt(current)
            if following is None:
                return
            current = following
            yield f"--- {self.job}: attempt {current} (the gang restarted) ---"

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

    def _read(self, pod: str) -> Iterator[str]:
        with translated_errors(self.client.host, f"pod {self.client.namespace}/{pod}"):
            text = self.client.core.read_namespaced_pod_log(pod, self.client.namespace,
                                                            _request_timeout=REQUEST_TIMEOUT_S)
        yield from str(text).splitlines()

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

"""This node's log kept beyond its pod: torchrun's output teed to a local file, uploaded to the job's output.

The launcher passes everything torchrun and the ranks print (stdout and stderr, combined) through ``NodeLog``:
each chunk goes on to the pod's own stream (``kubectl logs`` is unchanged) and into ``<local.workDir>/logs/``.
A background thread uploads the file to ``<output.uri>/logs/attempt-<N>/node-<rank>.log`` every
``UPLOAD_INTERVAL_S`` when it changed, and ``close`` uploads it once more at exit (after success, failure or
SIGTERM), so ``ftj logs`` can show a finished job's log after its pods are deleted and an earlier attempt's log
after a gang restart. A pod killed outright loses at most the last interval.

Bounded cost: one PUT per interval at most, of at most ``UPLOAD_LIMIT_BYTES`` (a longer log keeps its first
``HEAD_BYTES`` and its end, with a line saying how much was left out). The tee never waits for an upload, so a
slow or unreachable S3 never stalls training; a failed upload is reported once on the pod's stream and retried
at the next interval.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO

from finetune_trainer.config import TrainerConfig
from finetune_trainer.storage import MiB, ObjectStore, StorageError, open_store

# Set by the operator on every pod (finetune_operator.constants.ENV_ATTEMPT); by hand, config.job.attempt.
ATTEMPT_ENV = "FINETUNE_ATTEMPT"
NODE_RANK_ENV = "PET_NODE_RANK"
UPLOAD_INTERVAL_S = 30.0
# The last upload after torchrun exits must fit the pod's termination margin beyond the checkpoint grace period.
FINAL_UPLOAD_BUDGET_S = 20.0
UPLOAD_LIMIT_BYTES = 16 * MiB
HEAD_BYTES = 1 * MiB
CHUNK_BYTES = 64 * 1024


def log_key(attempt: int, node_rank: int) -> str:
    """The log's key below the output URI (the client reads the same layout)."""
    return f"logs/attempt-{attempt}/node-{node_rank}.log"


def attempt_and_rank(config_attempt: int, environ: dict[str, str] | None = None) -> tuple[int, int]:
    """(attempt, node rank) of this pod: the operator's variables, else the config's attempt and rank 0."""
    env = os.environ if environ is None else environ
    try:
        attempt = int(env.get(ATTEMPT_ENV, config_attempt))
        rank = int(env.get(NODE_RANK_ENV, 0))
    except ValueError:
        return config_attempt, 0
    return attempt, rank


def bounded_contents(path: Path, limit: int = UPLOAD_LIMIT_BYTES, head: int = HEAD_BYTES) -> bytes:
    """The file's bytes, or when it is longer than ``limit`` its first ``head`` bytes and its end."""
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size <= limit:
            return handle.read(size)
        start = handle.read(head)
        notice = f"\n[... {size - limit} bytes of this log left out ...]\n".encode()
        tail = limit - head - len(notice)
        handle.seek(size - tail)
        return start + notice + handle.read(tail)


class NodeLog:
    """Tees bytes to ``out`` and ``path``; uploads ``path`` to ``key`` of ``store`` (None: kept locally only)."""

    def __init__(
        self,
        path: Path,
        store: ObjectStore | None,
        key: str,
        out: BinaryIO | None = None,
        interval_s: float = UPLOAD_INTERVAL_S,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.store = store
        self.key = key
        self.out = out if out is not None else sys.stderr.buffer
        self.interval_s = interval_s
        # Unbuffered: every chunk is in the file before an upload reads it.
        self._file = path.open("wb", buffering=0)
        # Reentrant: the launcher's SIGTERM handler may report while the main thread is writing.
        self._write_lock = threading.RLock()
        self._upload_lock = threading.Lock()
        self._stop = threading.Event()
        self._uploaded_size = -1
        self._warned = False
        self._uploader = threading.Thread(target=self._upload_periodically, name="node-log-upload", daemon=True)

    def start(self) -> NodeLog:
        if self.store is not None:
            self._uploader.start()
        return self

    def write(self, data: bytes) -> None:
        with self._write_lock:
            try:
                self._file.write(data)
            except (OSError, ValueError):
                pass  # a full scratch disk must not stop the pod's own log
            try:
                self.out.write(data)
                self.out.flush()
            except (OSError, ValueError):
                pass  # the tee must keep draining the pipe, or torchrun would block on a full one

    def say(self, message: str) -> None:
        """One line of the launcher's own, on the pod's stream and in the file."""
        self.write(f"finetune-launch: {message}\n".encode())

    def tee(self, fd: int) -> threading.Thread:
        """Copy the pipe ``fd`` into the log until its writers close it; the thread closes ``fd``."""

        def copy() -> None:
            try:
                while chunk := os.read(fd, CHUNK_BYTES):
                    self.write(chunk)
            except OSError:
                pass
            finally:
                os.close(fd)

        thread = threading.Thread(target=copy, name="node-log-tee", daemon=True)
        thread.start()
        return thread

    def upload(self, deadline: float) -> bool:
        """Upload the file if it changed since the last upload, retrying until the monotonic ``deadline``; True
        when what the file holds now is stored."""
        if self.store is None:
            return False
        if not self._upload_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        try:
            size = self.path.stat().st_size
            if size == self._uploaded_size:
                return True
            data = bounded_contents(self.path)
            self.store.retrying_until(deadline).put_bytes(self.key, data)
            self._uploaded_size = size
            return True
        except Exception as exc:  # the log is best effort: nothing here may end the pod or the uploads
            if not self._warned:
                self._warned = True
                self.say(f"cannot upload this log to {self.store.uri_for(self.key)} (retrying later): {exc}")
            return False
        finally:
            self._upload_lock.release()

    def _upload_periodically(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.upload(time.monotonic() + self.interval_s / 2)

    def close(self, budget_s: float = FINAL_UPLOAD_BUDGET_S) -> bool:
        """Stop the periodic uploads and upload what is left within ``budget_s``; True when the whole log is
        stored."""
        self._stop.set()
        # An upload in flight holds the lock: the final one waits for it, within the same budget.
        stored = self.upload(time.monotonic() + budget_s)
        with self._write_lock:
            self._file.close()
        if self.store is not None:
            self.store.close()
        return stored


def open_node_log(config: TrainerConfig) -> NodeLog:
    """This node's log under ``local.workDir``, uploading below ``output.uri`` (kept locally only when the store
    cannot be opened), started."""
    attempt, rank = attempt_and_rank(config.job.attempt)
    store: ObjectStore | None
    try:
        store = open_store(config.output.uri, config.storage)
    except StorageError as exc:
        print(f"finetune-launch: this log stays in the pod: {exc}", file=sys.stderr, flush=True)
        store = None
    name = f"node-{rank}.log"
    try:
        node_log = NodeLog(Path(config.local.workDir) / "logs" / name, store, log_key(attempt, rank))
    except OSError:
        node_log = NodeLog(Path(tempfile.gettempdir()) / f"finetune-{name}", store, log_key(attempt, rank))
    return node_log.start()

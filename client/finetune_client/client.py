"""The Python client of FineTuneJobs: submit, watch, read logs and results, fetch the model, upload data.

    from finetune_client import Client
    client = Client()                                   # kubeconfig's namespace, or the pod's own
    uri = client.upload_dataset(rows, "s3://datasets/support.jsonl", data_format="chat")
    client.create(job)                                  # a FineTuneJob builder or a manifest dict
    job = client.wait("support-bot", progress=True)     # tqdm bar; or progress=callback(Job)
    client.history("support-bot")                       # [{"step": 10, "loss": 2.3, ...}, ...]
    client.download_model("support-bot", "./model")

Every method raises a ``ClientError`` subclass whose message is one line (``finetune_client.errors``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from kubernetes import client as k8s

from finetune_client import datasets
from finetune_client.errors import ClientError, JobNotFound, StorageFailed
from finetune_client.job import FineTuneJob
from finetune_client.job_view import TERMINAL_PHASES, Job
from finetune_client.kube import REQUEST_TIMEOUT_S, load_api_client, translated_errors
from finetune_client.pod_logs import PodLogs
from finetune_client.schema import GROUP, PLURAL, VERSION, validate_manifest
from finetune_client.storage import ObjectStorage, join_uri

HISTORY_NAME = "history.jsonl"
ProgressCallback = Callable[[Job], None]
# Aliases: inside the class ``list`` names the method.
JobList = list[Job]
Records = list[dict[str, Any]]


class Client:
    """FineTuneJobs of one namespace. ``kubeconfig`` None: ``$KUBECONFIG``/``~/.kube/config``, or the in-cluster
    configuration inside a pod. ``s3_endpoint``/``force_path_style`` are for uploads made before a job exists
    (a job's own storage section is used for its outputs)."""

    def __init__(
        self,
        namespace: str | None = None,
        kubeconfig: str | Path | None = None,
        *,
        context: str | None = None,
        s3_endpoint: str | None = None,
        force_path_style: bool | None = None,
    ) -> None:
        self.api_client, default_namespace = load_api_client(kubeconfig, context)
        self.namespace = namespace or default_namespace
        self.host = str(self.api_client.configuration.host)
        self.custom = k8s.CustomObjectsApi(self.api_client)
        self.core = k8s.CoreV1Api(self.api_client)
        self._storage = (s3_endpoint, force_path_style)

    def _call(self, what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with translated_errors(self.host, what):
            return call(*args, _request_timeout=REQUEST_TIMEOUT_S, **kwargs)

    def _what(self, name: str) -> str:
        return f"FineTuneJob {self.namespace}/{name}"

    # --- jobs -----------------------------------------------------------------------------------------------

    def _manifest(self, job: FineTuneJob | Mapping[str, Any]) -> dict[str, Any]:
        manifest = job.to_manifest() if isinstance(job, FineTuneJob) else json.loads(json.dumps(job))
        validate_manifest(manifest)
        manifest["metadata"]["namespace"] = self.namespace
        return manifest

    def create(self, job: FineTuneJob | Mapping[str, Any]) -> Job:
        """Create the job after checking it against the CRD's schema; an existing name is an ``InvalidJob``."""
        manifest = self._manifest(job)
        created = self._call(self._what(manifest["metadata"]["name"]), self.custom.create_namespaced_custom_object,
                             GROUP, VERSION, self.namespace, PLURAL, manifest, field_validation="Strict")
        return Job(created)

    def apply(self, job: FineTuneJob | Mapping[str, Any]) -> Job:
        """Create the job, or update the spec of an existing one (the CRD's rules decide what may change)."""
        manifest = self._manifest(job)
        name = manifest["metadata"]["name"]
        try:
            self.get(name)
        except JobNotFound:
            return self.create(manifest)
        patched = self._call(self._what(name), self.custom.patch_namespaced_custom_object, GROUP, VERSION,
                             self.namespace, PLURAL, name, {"metadata": {"labels": manifest["metadata"].get(
                                 "labels") or {}}, "spec": manifest["spec"]}, field_validation="Strict")
        return Job(patched)

    def get(self, name: str) -> Job:
        return Job(self._call(self._what(name), self.custom.get_namespaced_custom_object, GROUP, VERSION,
                              self.namespace, PLURAL, name))

    def list(self) -> JobList:
        listed = self._call(f"FineTuneJobs in {self.namespace}", self.custom.list_namespaced_custom_object, GROUP,
                            VERSION, self.namespace, PLURAL)
        return sorted((Job(item) for item in listed.get("items", [])), key=lambda j: j.name)

    def _patch_spec(self, name: str, spec: dict[str, Any]) -> Job:
        return Job(self._call(self._what(name), self.custom.patch_namespaced_custom_object, GROUP, VERSION,
                              self.namespace, PLURAL, name, {"spec": spec}))

    def suspend(self, name: str) -> Job:
        """Stop the job's pods (they write a checkpoint on the way out); ``resume`` continues from it."""
        return self._patch_spec(name, {"suspend": True})

    def resume(self, name: str) -> Job:
        return self._patch_spec(name, {"suspend": False})

    def delete(self, name: str) -> None:
        """Delete the job; its pods, Service and ConfigMap go with it. What it wrote to S3 stays."""
        self._call(self._what(name), self.custom.delete_namespaced_custom_object, GROUP, VERSION, self.namespace,
                   PLURAL, name, body=k8s.V1DeleteOptions(propagation_policy="Background"))

    def wait(
        self,
        name: str,
        until: Iterable[str] = TERMINAL_PHASES,
        timeout: float | None = None,
        progress: ProgressCallback | bool | None = None,
        poll_seconds: float = 1.0,
    ) -> Job:
        """Wait until the job's phase is one of ``until`` (or it finished) and return it.

        ``progress``: a callback given the job at every poll, or True for a tqdm bar (``tqdm.auto``: a widget in
        notebooks). Raises ``TimeoutError`` after ``timeout`` seconds."""
        wanted = set(until)
        deadline = None if timeout is None else time.monotonic() + timeout
        callback, close = _progress_callback(progress)
        try:
            while True:
                job = self.get(name)
                if callback is not None:
                    callback(job)
                if job.phase in wanted or job.finished:
                    return job
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{self._what(name)} is {job.phase} after {timeout:g} s")
                time.sleep(poll_seconds)
        finally:
            close()

    def events(self, name: str) -> Records:
        """The job's events, oldest first: ``{"time", "type", "reason", "message", "count"}``."""
        selector = f"involvedObject.name={name},involvedObject.kind=FineTuneJob"
        listed = self._call(f"events of {self._what(name)}", self.core.list_namespaced_event, self.namespace,
                            field_selector=selector)
        events = []
        for event in listed.items:
            when = (event.last_timestamp or event.event_time or event.first_timestamp
                    or event.metadata.creation_timestamp)
            events.append({"time": when.isoformat() if when else None, "type": event.type, "reason": event.reason,
                           "message": event.message, "count": event.count or 1})
        return sorted(events, key=lambda e: e["time"] or "")

    def logs(self, name: str, rank: int = 0, attempt: int | None = None, follow: bool = False) -> Iterator[str]:
        """Lines of node ``rank``'s log of ``attempt``: its pod's (``<job>-a<attempt>-n<rank>``) while the pod
        exists, else the copy the trainer uploaded to ``<output.uri>/logs/attempt-<N>/node-<rank>.log`` (so a
        finished job's log, and an earlier attempt's after a gang restart, can still be read). ``attempt`` None:
        the latest; with ``follow``, the next attempts' pods too as the gang restarts. ``LogNotFound`` when
        neither exists."""
        self.get(name)
        return PodLogs(self, name, rank).lines(attempt, follow)

    # --- what the job wrote to S3 ------------------------------------------------------------------------------

    def storage_for(self, job: Job) -> ObjectStorage:
        return ObjectStorage.for_job(job.spec)

    def _read_output(self, name: str, file: str) -> bytes:
        job = self.get(name)
        uri = join_uri(job.output_uri, file)
        data = self.storage_for(job).read(uri)
        if data is None:
            raise StorageFailed(f"{uri} does not exist yet ({self._what(name)} is {job.phase})")
        return data

    def result(self, name: str) -> dict[str, Any]:
        """result.json: eval loss before and after, best eval loss, steps, tokens, wall time, the model's URI."""
        result: dict[str, Any] = json.loads(self._read_output(name, "result.json"))
        return result

    def history(self, name: str) -> Records:
        """history.jsonl: one entry per training log and evaluation (``step``, ``loss`` or ``evalLoss``,
        ``learningRate``, ``tokensPerSecond``, ``time``); uploaded at every checkpoint and at the end."""
        return parse_history(self._read_output(name, HISTORY_NAME))

    def download_model(self, name: str, dest: str | Path) -> Path:
        """The exported model (or LoRA adapter) into ``dest``; returns ``dest``."""
        job = self.get(name)
        target = Path(dest)
        files = self.storage_for(job).download_prefix(job.model_uri, target)
        if not files:
            raise StorageFailed(f"no model at {job.model_uri} ({self._what(name)} is {job.phase})")
        return target

    # --- data -------------------------------------------------------------------------------------------------

    def upload_dataset(
        self,
        data: str | Path | Iterable[Mapping[str, Any]] | Any,
        uri: str,
        data_format: str = "chat",
        fields: Mapping[str, str] | None = None,
    ) -> str:
        """Check every row against ``data_format`` (text, promptCompletion, chat), then upload; returns the URI.

        ``data``: a file path (JSON lines, JSON, Parquet), a list of dicts or a pandas DataFrame. ``uri``: the
        object to write, or a prefix ending in ``/`` (the file's name, or ``data.jsonl`` for rows, is added).
        A malformed row raises ``DataRejected`` (``<file>:<line>: <problem>``) before anything is sent."""
        storage = ObjectStorage(*self._storage)
        if isinstance(data, str | Path):
            path = Path(data)
            datasets.check_file(path, data_format, fields)
            target = uri + path.name if uri.endswith("/") else uri
            storage.upload_file(path, target)
            return target
        payload = datasets.rows_to_jsonl(data, data_format, fields)
        target = uri + "data.jsonl" if uri.endswith("/") else uri
        storage.write(target, payload)
        return target


def parse_history(data: bytes) -> Records:
    """history.jsonl's entries; a line that is not a JSON object is skipped."""
    entries = []
    for line in data.decode(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _progress_callback(progress: ProgressCallback | bool | None) -> tuple[ProgressCallback | None, Callable[[], None]]:
    """The callback ``wait`` calls, and what closes it; True gives a tqdm bar over the job's steps."""
    if progress is None or progress is False:
        return None, lambda: None
    if callable(progress):
        return progress, lambda: None
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ClientError("progress=True needs tqdm (pip install tqdm)") from exc
    bar = tqdm(total=None, unit="step")

    def update(job: Job) -> None:
        if job.total_steps and bar.total != job.total_steps:
            bar.total = job.total_steps
        bar.n = job.step
        loss = f"{job.loss:.4f}" if job.loss is not None else "-"
        bar.set_postfix_str(f"{job.phase} loss {loss}", refresh=False)
        bar.refresh()

    return update, bar.close

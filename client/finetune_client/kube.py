"""The Kubernetes side of the client: configuration (kubeconfig, or in-cluster inside a pod) and one-line errors."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from finetune_client.errors import ClientError, ClusterUnreachable, InvalidJob, JobNotFound

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# Seconds one API call may take; an unreachable server fails fast instead of after urllib3's retries.
REQUEST_TIMEOUT_S = 15


def load_api_client(kubeconfig: str | Path | None, context: str | None) -> tuple[k8s.ApiClient, str]:
    """An API client and the namespace its configuration names (``default`` when none does).

    An explicit ``kubeconfig`` is used as given; otherwise ``$KUBECONFIG`` or ``~/.kube/config``, and inside a pod
    (no kubeconfig, a service account mounted) the in-cluster configuration."""
    configuration = k8s.Configuration()
    try:
        if kubeconfig is None and SERVICE_ACCOUNT_NAMESPACE.exists():
            k8s_config.load_incluster_config(client_configuration=configuration)
            namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
        else:
            file = str(kubeconfig) if kubeconfig else None
            k8s_config.load_kube_config(config_file=file, context=context, client_configuration=configuration)
            contexts, active = k8s_config.list_kube_config_contexts(config_file=file)
            chosen = next((c for c in contexts if c["name"] == context), active) if context else active
            namespace = (chosen.get("context") or {}).get("namespace") or "default"
    except (ConfigException, OSError, TypeError, ValueError) as exc:
        where = kubeconfig or "$KUBECONFIG or ~/.kube/config"
        raise ClusterUnreachable(f"no usable Kubernetes configuration ({where}): {exc}") from None
    configuration.retries = 0
    return k8s.ApiClient(configuration), namespace


def api_message(exc: ApiException) -> str:
    """The API server's own message of a refusal."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return str(message or exc.reason or exc.status).replace("\n", " ")


@contextlib.contextmanager
def translated_errors(host: str, what: str) -> Iterator[None]:
    """Turn the Kubernetes client's exceptions into the client's one-line errors; ``what`` names the object."""
    try:
        yield
    except ApiException as exc:
        if exc.status == 404:
            raise JobNotFound(f"{what} not found") from None
        if exc.status in (400, 409, 422):
            raise InvalidJob(f"{what}: {api_message(exc)}") from None
        if exc.status in (401, 403):
            raise ClientError(f"{what}: not allowed: {api_message(exc)}") from None
        if exc.status == 0 or exc.status is None:
            raise ClusterUnreachable(f"cannot reach the Kubernetes API at {host}: {exc.reason}") from None
        raise ClientError(f"{what}: {exc.status} {api_message(exc)}") from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ClusterUnreachable(f"cannot reach the Kubernetes API at {host}: {reason}") from None


def as_dict(obj: Any) -> dict[str, Any]:
    """A typed Kubernetes model as the plain dict the API sends."""
    result: dict[str, Any] = k8s.ApiClient().sanitize_for_serialization(obj)
    return result

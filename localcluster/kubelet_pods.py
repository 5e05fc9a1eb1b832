"""Pure translations for the process kubelet: quantities, env, hosts files, pod conditions, events, file_sd."""

from __future__ import annotations

import base64
import datetime
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

Obj = Mapping[str, Any]

NODE_NAME = "localnode"
GPU_RESOURCE = "nvidia.com/gpu"
TERMINATION_MESSAGE_LIMIT = 4096
# What the real kubelet keeps of the log for FallbackToLogsOnError.
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
CLUSTER_DOMAIN = "cluster.local"

_BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL_SUFFIXES = {
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
    "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
    "P": Decimal("1e15"), "E": Decimal("1e18"),
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")


class QuantityError(ValueError):
    """A resource quantity the API server would have rejected."""


class ContainerConfigError(Exception):
    """The container cannot be created yet (missing secret, configmap or key); the kubelet retries."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes quantity ("500m", "24Gi", "1e3", 2) as an exact Decimal in base units."""
    if isinstance(value, int | float):
        return Decimal(str(value))
    match = _QUANTITY.match(value.strip())
    if match is None:
        raise QuantityError(f"quantities must match the regular expression of Kubernetes: {value!r}")
    number, suffix = match.group(1), match.group(2) or ""
    try:
        base = Decimal(number)
    except InvalidOperation as error:
        raise QuantityError(f"invalid quantity {value!r}") from error
    if suffix in _BINARY_SUFFIXES:
        return base * _BINARY_SUFFIXES[suffix]
    return base * _DECIMAL_SUFFIXES[suffix]


def format_quantity(name: str, amount: Decimal) -> str:
    """How the scheduler and kubectl would print an amount of resource `name`."""
    if name == "cpu" and amount != amount.to_integral_value():
        return f"{int(amount * 1000)}m"
    if name == "memory" and amount >= 2**20 and amount % 2**20 == 0:
        return f"{int(amount / 2**20)}Mi"
    return str(int(amount)) if amount == amount.to_integral_value() else str(amount)


Resources = dict[str, Decimal]


def container_requests(container: Obj) -> Resources:
    """Requests of one container; a limit stands in for a missing request, as the API server defaults it."""
    resources = container.get("resources") or {}
    limits = resources.get("limits") or {}
    requests = {**limits, **(resources.get("requests") or {})}
    return {name: parse_quantity(value) for name, value in requests.items()}


def pod_requests(pod: Obj) -> Resources:
    """Effective pod requests: the sum over containers, at least the largest init container, plus overhead."""
    spec = pod.get("spec") or {}
    total: Resources = {}
    for container in spec.get("containers") or []:
        for name, amount in container_requests(container).items():
            total[name] = total.get(name, Decimal(0)) + amount
    for container in spec.get("initContainers") or []:
        for name, amount in container_requests(container).items():
            total[name] = max(total.get(name, Decimal(0)), amount)
    for name, value in (spec.get("overhead") or {}).items():
        total[name] = total.get(name, Decimal(0)) + parse_quantity(value)
    return total


# ---- env ----------------------------------------------------------------------------------------------


def expand(text: str, variables: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known names are replaced, `$$` escapes, unknown references stay as is."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "$" or i + 1 == len(text):
            out.append(char)
            i += 1
            continue
        following = text[i + 1]
        if following == "$":
            out.append("$")
            i += 2
        elif following == "(":
            close = text.find(")", i + 2)
            if close == -1:
                out.append(text[i:])
                break
            name = text[i + 2 : close]
            out.append(variables[name] if name in variables else text[i : close + 1])
            i = close + 1
        else:
            out.append(char)
            i += 1
    return "".join(out)


@dataclass
class PodContext:
    """What env and downward-API volumes may refer to besides the pod itself."""

    pod_ip: str
    host_ip: str = "127.0.0.1"
    node_allocatable: Resources = field(default_factory=dict)
    # Projected serviceAccountToken sources' tokens (from the TokenRequest API), by (volume, path).
    service_account_tokens: dict[tuple[str, str], str] = field(default_factory=dict)


def field_ref_value(pod: Obj, path: str, context: PodContext) -> str:
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    labelled = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if labelled:
        return str((metadata.get(labelled.group(1)) or {}).get(labelled.group(2), ""))
    simple = {
        "metadata.name": metadata.get("name", ""),
        "metadata.namespace": metadata.get("namespace", "default"),
        "metadata.uid": metadata.get("uid", ""),
        "spec.nodeName": spec.get("nodeName") or NODE_NAME,
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.podIP": context.pod_ip,
        "status.podIPs": context.pod_ip,
        "status.hostIP": context.host_ip,
        "status.hostIPs": context.host_ip,
    }
    if path in simple:
        return str(simple[path])
    if path in ("metadata.labels", "metadata.annotations"):
        values = metadata.get(path.split(".")[1]) or {}
        return "\n".join(f'{key}="{value}"' for key, value in sorted(values.items()))
    raise ContainerConfigError("CreateContainerConfigError", f"unsupported fieldRef fieldPath {path!r}")


def resource_field_value(pod: Obj, container: Obj, ref: Obj, context: PodContext) -> str:
    """limits.cpu / requests.memory & co; a missing limit is the node's allocatable, like the real kubelet."""
    name = ref.get("containerName")
    if name:
        container = next(
            (c for c in (pod.get("spec") or {}).get("containers") or [] if c.get("name") == name), container
        )
    kind, _, resource = str(ref.get("resource", "")).partition(".")
    resources = container.get("resources") or {}
    raw = (resources.get(kind) or {}).get(resource)
    if raw is None and kind == "requests":
        raw = (resources.get("limits") or {}).get(resource)
    amount = parse_quantity(raw) if raw is not None else None
    if amount is None:
        amount = context.node_allocatable.get(resource, Decimal(0)) if kind == "limits" else Decimal(0)
    divisor = parse_quantity(ref.get("divisor") or "1")
    return str(math.ceil(amount / divisor))


def _decoded(data: Mapping[str, str], kind: str) -> dict[str, str]:
    if kind == "Secret":
        return {key: base64.b64decode(value).decode("utf-8", errors="replace") for key, value in data.items()}
    return dict(data)


def resolve_env(
    pod: Obj,
    container: Obj,
    context: PodContext,
    configmaps: Mapping[str, Obj | None],
    secrets: Mapping[str, Obj | None],
) -> dict[str, str]:
    """The container's own environment (envFrom, then env) with `$(VAR)` expanded in order.

    `configmaps`/`secrets` map the names the container refers to onto objects (None when absent); a missing
    non-optional reference raises ContainerConfigError with the real kubelet's message.
    """
    namespace = (pod.get("metadata") or {}).get("namespace", "default")
    env: dict[str, str] = {}

    def source(kind: str, name: str, optional: bool) -> dict[str, str] | None:
        objects = secrets if kind == "Secret" else configmaps
        obj = objects.get(name)
        if obj is None:
            if optional:
                return None
            raise ContainerConfigError("CreateContainerConfigError", f'{kind.lower()} "{name}" not found')
        data = _decoded(obj.get("data") or {}, kind)
        if kind == "Secret":
            data.update(obj.get("stringData") or {})
        else:
            data.update({k: base64.b64decode(v).decode("utf-8", "replace")
                         for k, v in (obj.get("binaryData") or {}).items()})
        return data

    for entry in container.get("envFrom") or []:
        prefix = entry.get("prefix") or ""
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            ref = entry.get(key)
            if ref:
                data = source(kind, ref.get("name", ""), bool(ref.get("optional")))
                for name, value in (data or {}).items():
                    env[prefix + name] = value

    for item in container.get("env") or []:
        name = item["name"]
        if "valueFrom" not in item:
            env[name] = expand(str(item.get("value", "")), env)
            continue
        value_from = item["valueFrom"]
        for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
            ref = value_from.get(key)
            if ref is None:
                continue
            optional = bool(ref.get("optional"))
            data = source(kind, ref.get("name", ""), optional)
            if data is None:
                break
            if ref.get("key") not in data:
                if optional:
                    break
                raise ContainerConfigError(
                    "CreateContainerConfigError",
                    f"couldn't find key {ref.get('key')} in {kind} {namespace}/{ref.get('name')}",
                )
            env[name] = data[ref["key"]]
            break
        else:
            if "fieldRef" in value_from:
                env[name] = field_ref_value(pod, value_from["fieldRef"].get("fieldPath", ""), context)
            elif "resourceFieldRef" in value_from:
                env[name] = resource_field_value(pod, container, value_from["resourceFieldRef"], context)
    return env


def token_requests(pod: Obj) -> list[tuple[str, str, dict[str, Any]]]:
    """(volume, path, TokenRequest spec) for every projected serviceAccountToken source of the pod, the token
    bound to the pod so that it dies with it."""
    meta = pod.get("metadata") or {}
    requests = []
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        for entry in (volume.get("projected") or {}).get("sources") or []:
            source = entry.get("serviceAccountToken")
            if not source:
                continue
            spec: dict[str, Any] = {
                "audiences": [source["audience"]] if source.get("audience") else [],
                "expirationSeconds": int(source.get("expirationSeconds", 3600)),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta.get("name"),
                                   "uid": meta.get("uid")},
            }
            requests.append((str(volume.get("name", "")), str(source.get("path", "")), spec))
    return requests


def referenced_objects(pod: Obj) -> tuple[set[str], set[str]]:
    """Names of the ConfigMaps and Secrets the pod's env and volumes use, to fetch before starting it."""
    configmaps: set[str] = set()
    secrets: set[str] = set()
    spec = pod.get("spec") or {}
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        for entry in container.get("envFrom") or []:
            if entry.get("configMapRef"):
                configmaps.add(entry["configMapRef"].get("name", ""))
            if entry.get("secretRef"):
                secrets.add(entry["secretRef"].get("name", ""))
        for item in container.get("env") or []:
            value_from = item.get("valueFrom") or {}
            if value_from.get("configMapKeyRef"):
                configmaps.add(value_from["configMapKeyRef"].get("name", ""))
            if value_from.get("secretKeyRef"):
                secrets.add(value_from["secretKeyRef"].get("name", ""))
    for volume in spec.get("volumes") or []:
        if volume.get("configMap"):
            configmaps.add(volume["configMap"].get("name", ""))
        if volume.get("secret"):
            secrets.add(volume["secret"].get("secretName", ""))
        for projected in (volume.get("projected") or {}).get("sources") or []:
            if projected.get("configMap"):
                configmaps.add(projected["configMap"].get("name", ""))
            if projected.get("secret"):
                secrets.add(projected["secret"].get("name", ""))
    return configmaps, secrets


# ---- DNS via /etc/hosts -------------------------------------------------------------------------------


def pod_hostname(pod: Obj) -> str:
    spec = pod.get("spec") or {}
    return str(spec.get("hostname") or (pod.get("metadata") or {}).get("name", "pod"))[:63]


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def headless_records(
    pods: Iterable[tuple[Obj, str]], services: Iterable[Obj]
) -> dict[str, list[tuple[str, list[str]]]]:
    """Per namespace, (ip, names) lines that a cluster DNS would answer for headless Services.

    `pods` are (pod, ip) pairs of pods that have an address. A pod is a member of a headless Service when
    the Service selects it or its `subdomain` names the Service; it answers to
    `<hostname>.<service>[.<ns>[.svc[.cluster.local]]]`, and the Service's own name answers with every member.
    """
    pods = list(pods)
    records: dict[str, list[tuple[str, list[str]]]] = {}
    for service in services:
        if (service.get("spec") or {}).get("clusterIP") != "None":
            continue
        metadata = service.get("metadata") or {}
        namespace, service_name = metadata.get("namespace", "default"), metadata.get("name", "")
        selector = (service.get("spec") or {}).get("selector") or {}
        for pod, ip in pods:
            pod_meta = pod.get("metadata") or {}
            if pod_meta.get("namespace", "default") != namespace:
                continue
            selected = selector_matches(selector, pod_meta.get("labels") or {})
            if not (selected or (pod.get("spec") or {}).get("subdomain") == service_name):
                continue
            base = f"{pod_hostname(pod)}.{service_name}"
            names = [f"{base}.{namespace}.svc.{CLUSTER_DOMAIN}", f"{base}.{namespace}.svc", f"{base}.{namespace}",
                     base, f"{service_name}.{namespace}.svc.{CLUSTER_DOMAIN}", f"{service_name}.{namespace}.svc"]
            records.setdefault(namespace, []).append((ip, names))
    return records


def hosts_file(pod: Obj, ip: str, namespace_records: Sequence[tuple[str, list[str]]]) -> str:
    """/etc/hosts for one pod: localhost, its own names, then the headless-Service names of its namespace."""
    hostname = pod_hostname(pod)
    spec = pod.get("spec") or {}
    namespace = (pod.get("metadata") or {}).get("namespace", "default")
    own = [hostname]
    if spec.get("subdomain"):
        own.insert(0, f"{hostname}.{spec['subdomain']}.{namespace}.svc.{CLUSTER_DOMAIN}")
    lines = [
        "# Kubernetes-managed hosts file (local kubelet): pod names of headless Services stand in for DNS.",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{ip}\t{' '.join(own)}",
    ]
    seen = {(ip, name) for name in own}
    for peer_ip, names in namespace_records:
        fresh = [name for name in names if (peer_ip, name) not in seen]
        seen.update((peer_ip, name) for name in fresh)
        if fresh:
            lines.append(f"{peer_ip}\t{' '.join(fresh)}")
    for alias in spec.get("hostAliases") or []:
        lines.append(f"{alias.get('ip')}\t{' '.join(alias.get('hostnames') or [])}")
    return "\n".join(lines) + "\n"


# ---- status -------------------------------------------------------------------------------------------


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def termination_message(
    message_file_text: str, policy: str, exit_code: int, log_tail: str
) -> str:
    """The container's termination message: its file, or the log tail for FallbackToLogsOnError failures."""
    message = message_file_text[:TERMINATION_MESSAGE_LIMIT]
    if not message.strip() and policy == "FallbackToLogsOnError" and exit_code != 0:
        lines = log_tail.splitlines()[-FALLBACK_LOG_LINES:]
        tail = "\n".join(lines).encode()[-FALLBACK_LOG_BYTES:]
        return tail.decode("utf-8", errors="ignore")
    return message


def exit_code_of(returncode: int) -> int:
    """A process returncode as a container runtime reports it: killed by signal N → 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def condition(
    kind: str, status: bool, previous: Sequence[Obj], reason: str | None = None, message: str | None = None
) -> dict[str, Any]:
    """A pod condition keeping its lastTransitionTime while its status does not change."""
    text = "True" if status else "False"
    old = next((c for c in previous if c.get("type") == kind), None)
    since = old.get("lastTransitionTime") if old and old.get("status") == text else None
    result: dict[str, Any] = {
        "type": kind, "status": text, "lastProbeTime": None, "lastTransitionTime": since or now_iso(),
    }
    if reason:
        result["reason"] = reason
    if message:
        result["message"] = message
    return result


def qos_class(pod: Obj) -> str:
    containers = (pod.get("spec") or {}).get("containers") or []
    requests = [(c.get("resources") or {}).get("requests") or {} for c in containers]
    limits = [(c.get("resources") or {}).get("limits") or {} for c in containers]
    if not any(requests) and not any(limits):
        return "BestEffort"
    guaranteed = all(
        lim.get("cpu") and lim.get("memory")
        and all(parse_quantity(req.get(k, lim[k])) == parse_quantity(lim[k]) for k in ("cpu", "memory"))
        for req, lim in zip(requests, limits, strict=True)
    )
    return "Guaranteed" if guaranteed else "Burstable"


# ---- Prometheus service discovery ---------------------------------------------------------------------


def _label_name(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def file_sd_targets(pods: Iterable[tuple[Obj, str]]) -> list[dict[str, Any]]:
    """Prometheus file_sd groups for pods annotated prometheus.io/scrape="true" and prometheus.io/port."""
    groups: list[dict[str, Any]] = []
    for pod, ip in pods:
        metadata = pod.get("metadata") or {}
        annotations = metadata.get("annotations") or {}
        if str(annotations.get("prometheus.io/scrape", "")).lower() != "true":
            continue
        port = str(annotations.get("prometheus.io/port", "")).strip()
        if not port.isdigit():
            continue
        labels = {"namespace": metadata.get("namespace", "default"), "pod": metadata.get("name", "")}
        for key, value in (metadata.get("labels") or {}).items():
            if key.startswith("finetune.dev/"):
                labels[_label_name(key)] = str(value)
        if annotations.get("prometheus.io/path"):
            labels["__metrics_path__"] = str(annotations["prometheus.io/path"])
        groups.append({"targets": [f"{ip}:{port}"], "labels": labels})
    return sorted(groups, key=lambda group: (group["labels"]["namespace"], group["labels"]["pod"]))


def pod_event(pod: Obj, reason: str, message: str, kind: str, node: str) -> dict[str, Any]:
    """A core/v1 Event about the pod from the kubelet of ``node``, as the real kubelet's recorder writes it."""
    meta = pod["metadata"]
    namespace = meta.get("namespace", "default")
    now = now_iso()
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
        "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "namespace": namespace,
                           "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")},
        "reason": reason,
        "message": message,
        "type": kind,
        "source": {"component": "kubelet", "host": node},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "reportingComponent": "kubelet",
        "reportingInstance": node,
    }

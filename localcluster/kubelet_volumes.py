"""Pod volumes on the process kubelet's node: what each volume kind holds, written into the pod's folder, and the
bind mounts that put them at their mount paths.

One table per kind of volume: those made of generated files (configMap, secret, downwardAPI, projected with
service-account tokens) and emptyDir, a plain or memory-backed folder. Any other kind fails the mount, naming it.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localcluster.kubelet_api import APIStatusError, KubeAPI
from localcluster.kubelet_pods import (
    ContainerConfigError,
    PodContext,
    field_ref_value,
    referenced_objects,
    resource_field_value,
    token_requests,
)
from localcluster.kubelet_sandbox import BindMount

Obj = Mapping[str, Any]
Files = dict[str, tuple[bytes, int]]
"""Relative path → (content, mode)."""

DEFAULT_MODE = 0o644
# Memory-backed emptyDirs live here, so they take RAM as on a node (tmpfs), not disk.
MEMORY_VOLUMES = Path("/dev/shm/localkubelet")
READ_ONLY_KINDS = ("configMap", "secret", "downwardAPI", "projected")


@dataclass(frozen=True)
class VolumeSources:
    """What a volume's files may come from: the pod itself, its context, and the objects it references."""

    volume: str
    pod: Obj
    context: PodContext
    configmaps: Mapping[str, Obj | None]
    secrets: Mapping[str, Obj | None]

    def failed(self, why: str) -> ContainerConfigError:
        return ContainerConfigError("FailedMount", f'MountVolume.SetUp failed for volume "{self.volume}" : {why}')


def _object_data(obj: Obj, secret: bool) -> dict[str, bytes]:
    data = {key: base64.b64decode(value) if secret else str(value).encode()
            for key, value in (obj.get("data") or {}).items()}
    data.update({key: base64.b64decode(value) for key, value in (obj.get("binaryData") or {}).items()})
    data.update({key: str(value).encode() for key, value in (obj.get("stringData") or {}).items()})
    return data


def _object_files(source: Obj, name: str, secret: bool, default_mode: int, sources: VolumeSources) -> Files:
    """The keys of a ConfigMap or Secret (``items`` picks and renames them), as the kubelet projects them."""
    obj = (sources.secrets if secret else sources.configmaps).get(name)
    if obj is None:
        if source.get("optional"):
            return {}
        raise sources.failed(f'{"secret" if secret else "configmap"} "{name}" not found')
    data = _object_data(obj, secret)
    mode = int(source.get("defaultMode", default_mode))
    items = source.get("items")
    if not items:
        return {key: (value, mode) for key, value in data.items()}
    files: Files = {}
    for item in items:
        key = item.get("key")
        if key not in data:
            if source.get("optional"):
                continue
            raise sources.failed(f"references non-existent secret key: {key}" if secret else
                                 f"configmap references non-existent config key: {key}")
        files[item.get("path") or key] = (data[key], int(item.get("mode", mode)))
    return files


def _downward_files(items: Iterable[Obj], default_mode: int, sources: VolumeSources) -> Files:
    files: Files = {}
    for item in items:
        if item.get("fieldRef"):
            value = field_ref_value(sources.pod, item["fieldRef"].get("fieldPath", ""), sources.context)
        else:
            value = resource_field_value(sources.pod, {}, item.get("resourceFieldRef") or {}, sources.context)
        files[item.get("path", "")] = (value.encode(), int(item.get("mode", default_mode)))
    return files


def _token_file(source: Obj, mode: int, sources: VolumeSources) -> Files:
    path = str(source.get("path", ""))
    token = sources.context.service_account_tokens.get((sources.volume, path))
    if token is None:
        raise sources.failed(f"no token for {path!r}")
    return {path: (token.encode(), mode)}


# A projected volume's sources, each like the volume kind of the same name.
PROJECTED_SOURCES: dict[str, Callable[[Obj, int, VolumeSources], Files]] = {
    "configMap": lambda s, mode, src: _object_files(s, s.get("name", ""), False, mode, src),
    "secret": lambda s, mode, src: _object_files(s, s.get("name", ""), True, mode, src),
    "downwardAPI": lambda s, mode, src: _downward_files(s.get("items") or [], mode, src),
    "serviceAccountToken": _token_file,
}


def _projected_files(spec: Obj, sources: VolumeSources) -> Files:
    mode = int(spec.get("defaultMode", DEFAULT_MODE))
    files: Files = {}
    for entry in spec.get("sources") or []:
        for kind, project in PROJECTED_SOURCES.items():
            if entry.get(kind):
                files.update(project(entry[kind], mode, sources))
    return files


# Volume kinds made of files: spec of the kind → its files.
FILE_VOLUMES: dict[str, Callable[[Obj, VolumeSources], Files]] = {
    "configMap": lambda spec, src: _object_files(spec, spec.get("name", ""), False, DEFAULT_MODE, src),
    "secret": lambda spec, src: _object_files(spec, spec.get("secretName", ""), True, DEFAULT_MODE, src),
    "downwardAPI": lambda spec, src: _downward_files(spec.get("items") or [], int(
        spec.get("defaultMode", DEFAULT_MODE)), src),
    "projected": _projected_files,
}


def volume_files(
    volume: Obj,
    pod: Obj,
    context: PodContext,
    configmaps: Mapping[str, Obj | None],
    secrets: Mapping[str, Obj | None],
) -> Files | None:
    """The files of a configMap/secret/downwardAPI/projected volume; None for a kind that is a folder.

    A missing non-optional source raises ContainerConfigError with reason FailedMount.
    """
    sources = VolumeSources(str(volume.get("name", "")), pod, context, configmaps, secrets)
    for kind, files in FILE_VOLUMES.items():
        if volume.get(kind) is not None:
            return files(volume[kind] or {}, sources)
    return None


def safe_relative(path: str) -> bool:
    """A volume item path may not escape its volume, as the API server validates."""
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and ".." not in parts


def _write_files(target: Path, files: Files, volume: str) -> None:
    # Written into a fresh folder and swapped in, so a retry never leaves a half-written volume.
    staging = target.parent / f".{volume}.{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    for relative, (content, mode) in files.items():
        if not safe_relative(relative):
            raise ContainerConfigError("FailedMount", f'invalid path {relative!r} in volume "{volume}"')
        path = staging / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode & 0o777)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def _make_empty_dir(target: Path, spec: Obj, uid: str) -> None:
    if target.exists() or target.is_symlink():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if spec.get("medium") == "Memory" and MEMORY_VOLUMES.parent.is_dir():
        memory = MEMORY_VOLUMES / uid / target.name
        memory.mkdir(parents=True, exist_ok=True)
        target.symlink_to(memory)
    else:
        target.mkdir()


def materialise_volumes(
    pod_dir: Path,
    pod: Obj,
    context: PodContext,
    configmaps: Mapping[str, Obj | None],
    secrets: Mapping[str, Obj | None],
) -> None:
    """Write every volume of the pod under ``<pod_dir>/volumes/<name>`` (file volumes rewritten each time)."""
    uid = str((pod.get("metadata") or {}).get("uid", ""))
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        name = str(volume["name"])
        target = pod_dir / "volumes" / name
        files = volume_files(volume, pod, context, configmaps, secrets)
        if files is not None:
            _write_files(target, files, name)
        elif volume.get("emptyDir") is not None:
            _make_empty_dir(target, volume["emptyDir"] or {}, uid)
        else:
            kinds = sorted(key for key in volume if key != "name")
            raise ContainerConfigError("FailedMount",
                                       f'volume "{name}": the local kubelet does not support {kinds} volumes')


def bind_mounts(pod_dir: Path, pod: Obj, container: Obj, message_file: Path) -> list[BindMount]:
    """The container's volumeMounts (subPath folders made as needed) and its termination-message file."""
    volumes = {volume["name"]: volume for volume in (pod.get("spec") or {}).get("volumes") or []}
    mounts: list[BindMount] = []
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount.get("name", ""))
        if volume is None:
            raise ContainerConfigError("CreateContainerConfigError",
                                       f"cannot find volume {mount.get('name')!r} to mount")
        source = (pod_dir / "volumes" / volume["name"]).resolve()
        if mount.get("subPath"):
            source = source / mount["subPath"]
            if not source.exists():
                source.mkdir(parents=True)
        read_only = bool(mount.get("readOnly")) or any(key in volume for key in READ_ONLY_KINDS)
        mounts.append(BindMount(source, mount["mountPath"], read_only))
    mounts.append(BindMount(message_file, container.get("terminationMessagePath") or "/dev/termination-log"))
    return mounts


# ---- what volumes and env draw from the API ------------------------------------------------------------


async def request_tokens(api: KubeAPI, pod: Obj, context: PodContext) -> None:
    """Tokens for the pod's projected serviceAccountToken sources, from the TokenRequest API (the Node
    authorizer allows it only for a pod bound to this node and its own service account)."""
    meta = pod["metadata"]
    account = (pod.get("spec") or {}).get("serviceAccountName") or "default"
    path = f"/api/v1/namespaces/{meta.get('namespace', 'default')}/serviceaccounts/{account}/token"
    for volume, token_path, spec in token_requests(pod):
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        try:
            answer = await api.create(path, body)
        except APIStatusError as error:
            raise ContainerConfigError(
                "FailedMount", f'MountVolume.SetUp failed for volume "{volume}" : failed to fetch token: {error}'
            ) from error
        context.service_account_tokens[(volume, token_path)] = str(answer["status"]["token"])

async def fetch_references(
    api: KubeAPI, pod: Obj
) -> tuple[dict[str, dict[str, Any] | None], dict[str, dict[str, Any] | None]]:
    """The ConfigMaps and Secrets the pod's env and volumes name (None for those that do not exist)."""
    namespace = pod["metadata"].get("namespace", "default")
    configmap_names, secret_names = referenced_objects(pod)
    base = f"/api/v1/namespaces/{namespace}"
    names = [("configmaps", n) for n in sorted(configmap_names)] + [("secrets", n) for n in sorted(secret_names)]
    try:
        objects = await asyncio.gather(*(api.get(f"{base}/{kind}/{name}") for kind, name in names))
    except APIStatusError as error:
        # Typically 403 for a moment after binding, until the Node authorizer's graph has the pod: retried.
        raise ContainerConfigError("CreateContainerConfigError", str(error)) from error
    configmaps: dict[str, dict[str, Any] | None] = {}
    secrets: dict[str, dict[str, Any] | None] = {}
    for (kind, name), obj in zip(names, objects, strict=True):
        (configmaps if kind == "configmaps" else secrets)[name] = obj
    return configmaps, secrets

"""Helpers of the end-to-end tests: job manifests from the demo example, S3 listings, the ftj command, a pod's
training processes."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from localcluster.cluster import REPO, LocalCluster


def make_job(name: str, **spec_overrides: Any) -> dict[str, Any]:
    """examples/tiny-cpu.yaml renamed, with its output under the name and spec sections merged in."""
    job: dict[str, Any] = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    job["metadata"]["name"] = name
    job["spec"]["output"]["uri"] = f"s3://finetune-output/{name}"
    job["spec"]["restartBackoff"] = {"initialSeconds": 1, "maxSeconds": 5}
    for key, value in spec_overrides.items():
        if isinstance(value, dict) and isinstance(job["spec"].get(key), dict):
            job["spec"][key] = {**job["spec"][key], **copy.deepcopy(value)}
        else:
            job["spec"][key] = copy.deepcopy(value)
    return job


def apply(cluster: LocalCluster, job: dict[str, Any]) -> str:
    return cluster.kubectl("apply", "-f", "-", input=json.dumps(job))


def s3_keys(cluster: LocalCluster, prefix: str, bucket: str = "finetune-output") -> list[str]:
    paginator = cluster.s3.client().get_paginator("list_objects_v2")
    return [o["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix) for o in page.get("Contents", [])]


def read_json(cluster: LocalCluster, key: str, bucket: str = "finetune-output") -> Any:
    return json.loads(cluster.s3.client().get_object(Bucket=bucket, Key=key)["Body"].read())


def ftj(env: dict[str, str], *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The ftj command as a user runs it in ``env``, its output captured."""
    return subprocess.run(["ftj", *argv], env=env, capture_output=True, text=True, timeout=timeout)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc's parent links."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def training_process(cluster: LocalCluster, pod: str, rank: int = 0) -> int | None:
    """The pid of the pod's trainer rank (``-m finetune_trainer`` with RANK=rank; not torchrun, not the launcher)."""
    assert cluster.kubelet is not None
    container = cluster.kubelet.container_pid("default", pod)
    for pid in descendants(container) if container else []:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        modules = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == b"-m"]
        if modules[:1] == [b"finetune_trainer"] and f"RANK={rank}".encode() in environ:
            return pid
    return None

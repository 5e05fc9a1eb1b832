"""One container as a local process: its environment, its launch in the pod's sandbox, its exit as the kubelet
reports it (exit code, reason, termination message), and stopping it (SIGTERM, grace, SIGKILL)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from localcluster.kubelet_pods import exit_code_of, expand, hosts_file, now_iso, pod_hostname, termination_message
from localcluster.kubelet_records import ContainerRun, PodRecord
from localcluster.kubelet_sandbox import create_mount_point, sandbox_command
from localcluster.kubelet_volumes import bind_mounts

# Names the kubelet's own environment must not hand to pods: the pod spec alone decides credentials, cluster
# access and distributed-training variables, as on a real node.
ENV_DENYLIST_PREFIXES = ("AWS_", "KUBERNETES_", "PET_", "PYTEST_", "TORCHELASTIC_")
ENV_DENYLIST = frozenset({
    "KUBECONFIG", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
    "GROUP_RANK", "NODE_RANK", "CUDA_VISIBLE_DEVICES", "VIRTUAL_ENV", "PYTHONHOME",
})
LOG_TAIL_BYTES = 64 * 1024


class LaunchError(Exception):
    """The container cannot start (no command, executable not found): the kubelet reports a StartError."""


def node_environment(venv_bin: str, api_url: str, extra_env: Mapping[str, str]) -> dict[str, str]:
    """What every container on this node starts from: this process's environment less the denied names, PATH
    with the virtualenv first, the API server's address, and the node's own additions (S3 endpoint, region)."""
    env = {key: value for key, value in os.environ.items()
           if key not in ENV_DENYLIST and not key.startswith(ENV_DENYLIST_PREFIXES)}
    api = urlsplit(api_url)
    env.update({
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '/usr/local/bin:/usr/bin:/bin')}",
        "KUBERNETES_SERVICE_HOST": api.hostname or "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(api.port or 80),
        **extra_env,
    })
    return env


def container_environment(node_env: Mapping[str, str], record: PodRecord, own: Mapping[str, str],
                          gpus: bool) -> dict[str, str]:
    env = {**node_env, "HOSTNAME": pod_hostname(record.pod)}
    if gpus:
        # Like the NVIDIA device plugin: a pod sees only the GPUs it was given.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(index) for index in record.gpu_ids)
    env.update(own)
    return env


@dataclass(frozen=True)
class Launch:
    """A container ready to start: the sandboxed command, its environment, and the files it reports through."""

    command: list[str]
    env: dict[str, str]
    message_file: Path
    started_marker: Path


def prepare_launch(record: PodRecord, container: Mapping[str, Any], run: ContainerRun, env: dict[str, str],
                   own: Mapping[str, str], created_paths: list[Path]) -> Launch:
    """Log file, termination-message file, mount points and hosts file for one run of the container; raises
    LaunchError when there is nothing to run."""
    argv = [expand(str(part), own) for part in [*(container.get("command") or []), *(container.get("args") or [])]]
    logs = record.directory / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    run.log_path = logs / f"{run.name}-{run.restart_count}.log"
    message_file = record.directory / f"termination-log-{run.name}"
    message_file.write_bytes(b"")
    started_marker = record.directory / f".started-{run.name}"
    started_marker.unlink(missing_ok=True)
    if not argv:
        raise LaunchError("no command given (the local kubelet cannot run an image's entrypoint)")
    if shutil.which(argv[0], path=env["PATH"]) is None and "/" not in argv[0]:
        raise LaunchError(f'exec: "{argv[0]}": executable file not found in $PATH')
    mounts = bind_mounts(record.directory, record.pod, container, message_file)
    hosts = record.directory / "hosts"
    if not hosts.exists():
        hosts.write_text(record.hosts_text or hosts_file(record.pod, record.ip, []))
    for mount in mounts:
        create_mount_point(mount, created_paths)
    working_dir = str(container.get("workingDir") or record.directory)
    command = sandbox_command(argv, pod_hostname(record.pod), hosts, mounts, working_dir, started_marker)
    return Launch(command, env, message_file, started_marker)


def record_exit(run: ContainerRun, container: Mapping[str, Any], code: int, started_at: str,
                message_file: Path) -> None:
    """The container's terminated state from its exit code, its message file and (by policy) its log."""
    try:
        written = message_file.read_text(errors="replace")
    except OSError:
        written = ""
    policy = container.get("terminationMessagePolicy") or "File"
    terminated: dict[str, Any] = {
        "exitCode": code,
        "reason": "Completed" if code == 0 else "Error",
        "startedAt": started_at,
        "finishedAt": now_iso(),
        "containerID": f"local://{uuid.uuid4().hex}",
    }
    message = termination_message(written, policy, code, log_tail(run.log_path))
    if message:
        terminated["message"] = message
    run.state = {"terminated": terminated}


def record_start_failure(run: ContainerRun, message: str) -> int:
    """The container could not start: exit 128, reason StartError, as the real kubelet reports it."""
    run.running = False
    now = now_iso()
    run.state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": message[-2048:],
                                "startedAt": now, "finishedAt": now}}
    return 128


def signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def stop_process(process: asyncio.subprocess.Process, grace: float) -> int:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds; the container's exit code."""
    if process.returncode is None:
        signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), max(grace, 0.0))
        except TimeoutError:
            signal_group(process.pid, signal.SIGKILL)
            await process.wait()
    return exit_code_of(process.returncode if process.returncode is not None else 0)


def log_tail(path: Path | None, limit: int = LOG_TAIL_BYTES) -> str:
    if path is None:
        return ""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - limit))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""

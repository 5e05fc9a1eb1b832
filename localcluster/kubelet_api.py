"""A small asynchronous Kubernetes REST client (aiohttp) for the process kubelet: CRUD, merge patches, watches."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp

logger = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
WATCH_TIMEOUT_S = 300
RELIST_DELAY_S = 0.5


class APIStatusError(Exception):
    """The API server answered with an error status (the Status object is in `body`)."""

    def __init__(self, status: int, body: Any, method: str, path: str) -> None:
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{method} {path}: {status} {message}")
        self.status = status
        self.body = body


class KubeAPI:
    """REST calls against one API server URL as one identity: the TLS context carries the cluster's CA and the
    client certificate that names the caller (the kubelet is ``system:node:<name>``)."""

    def __init__(self, base_url: str, tls: ssl.SSLContext | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._tls = tls
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        if self._session is None:
            # Many pods at once means many concurrent status writes and a few long watches.
            connector = aiohttp.TCPConnector(limit=64, ssl=self._tls if self._tls is not None else True)
            self._session = aiohttp.ClientSession(connector=connector)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("KubeAPI.open() was not called")
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        async with self.session.request(
            method, self.base_url + path, data=data, params=params, headers=headers,
            timeout=aiohttp.ClientTimeout(total=30),
        ) as response:
            text = await response.text()
            try:
                parsed = json.loads(text) if text else None
            except json.JSONDecodeError:
                parsed = text
            if response.status >= 400:
                raise APIStatusError(response.status, parsed, method, path)
            return parsed

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            result: dict[str, Any] = await self.request("GET", path)
        except APIStatusError as error:
            if error.status == 404:
                return None
            raise
        return result

    async def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("POST", path, body)
        return result

    async def merge_patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the object; None when it is gone."""
        try:
            result: dict[str, Any] = await self.request("PATCH", path, body, content_type=MERGE_PATCH)
        except APIStatusError as error:
            if error.status == 404:
                return None
            raise
        return result

    async def delete(self, path: str, body: Mapping[str, Any] | None = None) -> bool:
        """Delete; False when it was already gone (or the uid precondition names an older object)."""
        try:
            await self.request("DELETE", path, body)
        except APIStatusError as error:
            if error.status in (404, 409):
                return False
            raise
        return True

    async def watch(
        self, path: str, resource_version: str, selectors: Mapping[str, str] | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch events from resource_version until the server ends the stream."""
        params = {
            **(selectors or {}),
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_TIMEOUT_S),
        }
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=WATCH_TIMEOUT_S + 30)
        async with self.session.get(self.base_url + path, params=params, timeout=timeout) as response:
            if response.status >= 400:
                raise APIStatusError(response.status, await response.text(), "WATCH", path)
            async for line in response.content:
                if line.strip():
                    yield json.loads(line)


Handler = Callable[[str, dict[str, Any]], Awaitable[None]]


async def inform(
    api: KubeAPI,
    path: str,
    handler: Handler,
    synced: asyncio.Event | None = None,
    selectors: Mapping[str, str] | None = None,
) -> None:
    """List then watch `path` (narrowed by `selectors`: fieldSelector, labelSelector) for ever, calling
    handler(type, object) for every change.

    After a list, handler gets "SYNC" with a List object (so it can drop what vanished meanwhile); then
    ADDED/MODIFIED/DELETED. A closed or expired (410) watch relists, like client-go's reflector.
    """
    while True:
        try:
            listing = await api.request("GET", path, params=selectors)
            await handler("SYNC", listing)
            if synced is not None:
                synced.set()
            version = str((listing.get("metadata") or {}).get("resourceVersion", ""))
            while True:
                expired = False
                async for event in api.watch(path, version, selectors):
                    kind, obj = event.get("type", ""), event.get("object") or {}
                    if kind == "ERROR":
                        expired = obj.get("code") == 410
                        break
                    version = str((obj.get("metadata") or {}).get("resourceVersion", version))
                    if kind != "BOOKMARK":
                        await handler(kind, obj)
                if expired:
                    break
        except asyncio.CancelledError:
            raise
        except APIStatusError as error:
            if error.status != 410:
                logger.warning("watch of %s failed: %s", path, error)
        except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError) as error:
            logger.warning("watch of %s interrupted: %r", path, error)
        await asyncio.sleep(RELIST_DELAY_S)

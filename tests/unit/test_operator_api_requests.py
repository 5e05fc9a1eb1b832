"""KubeApi against a small local HTTP server: throttled requests retried as the server asks, bounded concurrency,
lists read in pages, one events list per gang."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import kopf
import pytest
from aiohttp import web

from finetune_operator.api import LIST_CHUNK, ApiError, KubeApi
from finetune_operator.retry_policy import JITTER, MAX_REQUEST_ATTEMPTS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def serving(handler: Handler, **api_options: Any) -> AsyncIterator[tuple[KubeApi, list[float]]]:
    """A KubeApi talking to ``handler``; the delays it slept are recorded instead of slept."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    slept: list[float] = []

    async def sleep(delay: float) -> None:
        slept.append(delay)

    api = KubeApi(lambda: kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}"), sleep=sleep,
                  jitter=lambda: 0.5, **api_options)
    try:
        yield api, slept
    finally:
        await api.close()
        await runner.cleanup()


def throttled(times: int, status: int = 429, retry_after: str | None = "2") -> tuple[Handler, list[str]]:
    """A handler answering ``status`` (with Retry-After) ``times`` times, then the job."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.method)
        if len(seen) <= times:
            headers = {"Retry-After": retry_after} if retry_after is not None else {}
            return web.json_response({"message": "too many requests"}, status=status, headers=headers)
        return web.json_response({"metadata": {"name": "job", "uid": "u"}})

    return handle, seen


@pytest.mark.parametrize(
    ("status", "retry_after", "times", "slept", "succeeds"),
    [
        pytest.param(429, "2", 2, [2 * (1 + JITTER / 2)] * 2, True, id="429 with Retry-After"),
        pytest.param(503, "1", 1, [1 + JITTER / 2], True, id="503 with Retry-After"),
        pytest.param(500, None, 1, [], False, id="500 without Retry-After is not retried"),
        pytest.param(429, "1", 99, [1 + JITTER / 2] * (MAX_REQUEST_ATTEMPTS - 1), False, id="bounded"),
        pytest.param(429, "120", 1, [], False, id="too long a wait is left to the reconcile's requeue"),
    ],
)
def test_throttled_requests_wait_as_the_server_asks(status: int, retry_after: str | None, times: int,
                                                    slept: list[float], succeeds: bool) -> None:
    handler, seen = throttled(times, status, retry_after)

    async def scenario() -> None:
        async with serving(handler) as (api, delays):
            if succeeds:
                assert await api.get_job("ns", "job") == {"metadata": {"name": "job", "uid": "u"}}
            else:
                with pytest.raises(ApiError) as caught:
                    await api.get_job("ns", "job")
                assert caught.value.status == status
                expected = float(retry_after) if retry_after is not None else None
                assert caught.value.retry_after == expected  # the reconcile's requeue honours it too
            assert delays == pytest.approx(slept)

    asyncio.run(scenario())
    assert len(seen) == len(slept) + 1


def test_concurrent_requests_are_bounded_by_the_pool() -> None:
    running, most = 0, 0

    async def handle(request: web.Request) -> web.Response:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.01)
        running -= 1
        return web.json_response({"metadata": {"name": "job"}})

    async def scenario() -> None:
        async with serving(handle, pool_size=3) as (api, _):
            await asyncio.gather(*(api.get_job("ns", f"job-{i}") for i in range(30)))

    asyncio.run(scenario())
    assert most == 3


def test_lists_are_read_in_pages_and_events_once_for_the_whole_gang() -> None:
    requests: list[dict[str, str]] = []
    events = [{"metadata": {"name": f"e{i}"}, "involvedObject": {"kind": "Pod", "name": f"pod-{i % 4}"}}
              for i in range(12)]

    async def handle(request: web.Request) -> web.Response:
        query = dict(request.query)
        requests.append(query)
        start = int(query.get("continue", "0"))
        page = events[start:start + 5]  # this server pages by 5, whatever the limit
        token = str(start + 5) if start + 5 < len(events) else ""
        return web.Response(text=json.dumps({"items": page, "metadata": {"continue": token}}),
                            content_type="application/json")

    async def scenario() -> list[dict[str, Any]]:
        async with serving(handle) as (api, _):
            return await api.list_pod_events("ns", ["pod-1", "pod-2"])

    found = asyncio.run(scenario())
    assert sorted(e["metadata"]["name"] for e in found) == ["e1", "e10", "e2", "e5", "e6", "e9"]
    assert requests == [
        {"fieldSelector": "involvedObject.kind=Pod", "resourceVersion": "0", "limit": str(LIST_CHUNK)},
        {"fieldSelector": "involvedObject.kind=Pod", "limit": str(LIST_CHUNK), "continue": "5"},
        {"fieldSelector": "involvedObject.kind=Pod", "limit": str(LIST_CHUNK), "continue": "10"},
    ]


# kube-apiserver's answers: a missing object of a served resource names it in the details; a path no API serves
# does not (tests/integration/test_kueue_unavailable.py sees that answer); discovery lists a version's resources.
WORKLOAD_NOT_FOUND = {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404,
                      "message": 'workloads.kueue.x-k8s.io "finetunejob-job" not found',
                      "details": {"name": "finetunejob-job", "group": "kueue.x-k8s.io", "kind": "workloads"}}
PATH_NOT_FOUND = {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404,
                  "message": "the server could not find the requested resource", "details": {}}
DISCOVERY = {"kind": "APIResourceList", "groupVersion": "kueue.x-k8s.io/v1beta2",
             "resources": [{"name": "workloads", "namespaced": True, "kind": "Workload"},
                           {"name": "workloads/status", "namespaced": True, "kind": "Workload"}]}


def answering(status: int, body: dict[str, Any]) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        return web.json_response(body, status=status)

    return handle


@pytest.mark.parametrize(("status", "body", "expected"), [
    pytest.param(200, {"metadata": {"name": "finetunejob-job"}}, {"metadata": {"name": "finetunejob-job"}},
                 id="found"),
    pytest.param(404, WORKLOAD_NOT_FOUND, None, id="no-such-workload"),
    pytest.param(404, PATH_NOT_FOUND, 404, id="workloads-not-served"),
    pytest.param(403, {"kind": "Status", "code": 403, "message": "forbidden"}, 403, id="forbidden"),
])
def test_get_workload_tells_a_missing_workload_from_a_missing_api(status: int, body: dict[str, Any],
                                                                 expected: Any) -> None:
    async def run() -> None:
        async with serving(answering(status, body)) as (api, _):
            if isinstance(expected, int):
                with pytest.raises(ApiError) as raised:
                    await api.get_workload("ns", "finetunejob-job")
                assert raised.value.status == expected
            else:
                assert await api.get_workload("ns", "finetunejob-job") == expected

    asyncio.run(run())


@pytest.mark.parametrize(("status", "body", "served"), [
    pytest.param(200, DISCOVERY, True, id="listed"),
    pytest.param(200, {**DISCOVERY, "resources": [{"name": "localqueues"}]}, False, id="group-without-it"),
    pytest.param(404, PATH_NOT_FOUND, False, id="group-not-served"),
])
def test_serves_reads_the_discovery_document(status: int, body: dict[str, Any], served: bool) -> None:
    async def run() -> None:
        async with serving(answering(status, body)) as (api, _):
            assert await api.serves("kueue.x-k8s.io/v1beta2", "workloads") is served

    asyncio.run(run())

"""Retry delays: the server's Retry-After honoured (never shortened, stretched by jitter), every retry bounded."""

from __future__ import annotations

import datetime

import pytest

from finetune_operator.retry_policy import (
    ERROR_BACKOFF_SECONDS,
    JITTER,
    MAX_REQUEST_ATTEMPTS,
    parse_retry_after,
    reconcile_retry_delay,
    request_retry_delay,
)

NOW = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        pytest.param(None, None, id="absent"),
        pytest.param("", None, id="empty"),
        pytest.param("3", 3.0, id="delta-seconds"),
        pytest.param(" 1.5 ", 1.5, id="fractional, padded"),
        pytest.param("-2", 0.0, id="negative is now"),
        pytest.param("Wed, 01 Jan 2025 00:00:07 GMT", 7.0, id="HTTP date"),
        pytest.param("Tue, 31 Dec 2024 23:59:00 GMT", 0.0, id="HTTP date in the past"),
        pytest.param("soon", None, id="unreadable"),
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, NOW) == seconds


@pytest.mark.parametrize(
    ("status", "retry_after", "attempt", "fraction", "delay"),
    [
        pytest.param(429, 2.0, 1, 0.0, 2.0, id="429 waits exactly what the server asks at the least"),
        pytest.param(429, 2.0, 1, 0.999, 2.0 * (1 + JITTER * 0.999), id="429 stretched by jitter at the most"),
        pytest.param(429, None, 1, 0.0, 0.5, id="429 without header: backoff"),
        pytest.param(429, None, 3, 0.0, 2.0, id="429 without header: backoff doubles"),
        pytest.param(503, 1.0, 1, 0.5, 1.0 * (1 + JITTER * 0.5), id="5xx with Retry-After is retried"),
        pytest.param(504, 0.0, 2, 0.0, 0.0, id="5xx asking for no wait"),
        pytest.param(500, None, 1, 0.0, None, id="5xx without Retry-After fails the reconcile"),
        pytest.param(409, 1.0, 1, 0.0, None, id="a conflict is never retried here"),
        pytest.param(403, None, 1, 0.0, None, id="a refusal is never retried here"),
        pytest.param(429, 60.0, 1, 0.0, None, id="asked for longer than a request waits: requeue instead"),
        pytest.param(429, 1.0, MAX_REQUEST_ATTEMPTS, 0.0, None, id="bounded number of tries"),
    ],
)
def test_request_retry_delay(status: int, retry_after: float | None, attempt: int, fraction: float,
                             delay: float | None) -> None:
    assert request_retry_delay(status, retry_after, attempt, fraction) == pytest.approx(delay)


@pytest.mark.parametrize(
    ("failures", "retry_after", "fraction", "delay"),
    [
        pytest.param(1, None, 0.0, ERROR_BACKOFF_SECONDS[0], id="first failure"),
        pytest.param(3, None, 0.0, ERROR_BACKOFF_SECONDS[2], id="grows with failures"),
        pytest.param(99, None, 0.0, ERROR_BACKOFF_SECONDS[-1], id="bounded"),
        pytest.param(1, 20.0, 0.0, 20.0, id="never sooner than the server asked"),
        pytest.param(6, 1.0, 0.0, ERROR_BACKOFF_SECONDS[-1], id="backoff longer than Retry-After wins"),
        pytest.param(1, None, 0.999, ERROR_BACKOFF_SECONDS[0] * (1 + JITTER * 0.999), id="jitter stretches"),
    ],
)
def test_reconcile_retry_delay(failures: int, retry_after: float | None, fraction: float, delay: float) -> None:
    assert reconcile_retry_delay(failures, retry_after, fraction) == pytest.approx(delay)

"""When to retry an API request and a failed reconcile: the server's Retry-After first, with jitter, and bounded.

The API server answers 429 when API Priority and Fairness sheds load and may answer 5xx with a Retry-After while
it is overloaded or restarting. Retrying sooner than it asks only adds to the load; retrying all at the same
moment (every reconcile of a 128-node gang throttled together) makes the next wave just as large, so every delay
is stretched by a random fraction. A request is retried a few times in place; past that, or when the server asks
for longer than a request should wait, the reconcile fails and is requeued no sooner than the server asked.
"""

from __future__ import annotations

import datetime
import email.utils
from typing import Final

# Tries of one request (the first and its retries) before the reconcile gives up on it.
MAX_REQUEST_ATTEMPTS: Final = 4
# A request waits at most this long before one retry; a server asking for more gets a requeue instead.
MAX_REQUEST_RETRY_SECONDS: Final = 10.0
# A 429 without Retry-After (a proxy, an old server) waits this long, doubled at each retry.
THROTTLED_BACKOFF_SECONDS: Final = 0.5
# Every delay is stretched by up to this fraction, never shortened: the server asked for at least its figure.
JITTER: Final = 0.25
# Requeue delays after failed reconciles of one job, growing with its consecutive failures.
ERROR_BACKOFF_SECONDS: Final = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


def parse_retry_after(value: str | None, now: datetime.datetime | None = None) -> float | None:
    """Seconds asked for by a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - (now or datetime.datetime.now(datetime.UTC))).total_seconds())


def request_retry_delay(status: int, retry_after: float | None, attempt: int, fraction: float) -> float | None:
    """Seconds to wait before trying a request again after ``attempt`` tries answered ``status``; None: don't.

    ``fraction`` is a random number in [0, 1) that spreads the retries of many requests.
    """
    if attempt >= MAX_REQUEST_ATTEMPTS:
        return None
    if status == 429:
        base = retry_after if retry_after is not None else THROTTLED_BACKOFF_SECONDS * 2 ** (attempt - 1)
    elif status >= 500 and retry_after is not None:
        base = retry_after
    else:
        return None
    if base > MAX_REQUEST_RETRY_SECONDS:
        return None
    return base * (1 + JITTER * fraction)


def reconcile_retry_delay(failures: int, retry_after: float | None, fraction: float) -> float:
    """Seconds before a job's reconcile runs again after its ``failures``-th consecutive failure (1 = first)."""
    backoff = ERROR_BACKOFF_SECONDS[min(max(failures, 1), len(ERROR_BACKOFF_SECONDS)) - 1]
    return max(backoff, retry_after or 0.0) * (1 + JITTER * fraction)

"""Storage errors: which failures no retry can fix, which a retry may, and the one retry loop every request uses.

botocore's own retries are off; every request goes through ``call_with_retries``: throttling, 5xx, refused or reset
connections and timeouts are retried with exponential backoff and jitter for up to ``RetryPolicy``'s deadline (90 s
by default, so an S3 endpoint that restarts in ~10-60 s is survived; ``RetryPolicy.until`` bounds a caller's whole
series of requests by one deadline instead). NoSuchBucket, NoSuchKey, AccessDenied, InvalidAccessKeyId,
SignatureDoesNotMatch (and missing credentials) raise ``StorageError(permanent=True)`` at once; the message starts
with the URI. Other client errors raise a non-permanent ``StorageError`` at once. Local errors (a full disk) are not
wrapped.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# Error codes that no retry can fix: the job's spec or credentials are wrong.
PERMANENT_ERROR_CODES = frozenset(
    {
        "NoSuchBucket",
        "NoSuchKey",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidBucketName",
        "AllAccessDisabled",
        "AccountProblem",
        "NotFound",
        "404",
        "403",
    }
)
TRANSIENT_ERROR_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequests",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
    }
)


class StorageError(RuntimeError):
    """A storage operation failed; ``permanent`` means retrying the job cannot help. The message names the URI."""

    def __init__(self, message: str, *, uri: str, permanent: bool = False) -> None:
        super().__init__(message if message.startswith(uri) else f"{uri}: {message}")
        self.uri = uri
        self.permanent = permanent


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with equal jitter, bounded by attempts and by a deadline from the first try."""

    max_attempts: int = 30
    base_delay_s: float = 0.25
    max_delay_s: float = 8.0
    deadline_s: float = 90.0
    # A monotonic time after which no retry is started, however few attempts a request has made: one budget for
    # every request of a series (a checkpoint's files, the grace period after SIGTERM).
    give_up_at: float | None = None

    def delay(self, retry: int, rng: random.Random) -> float:
        ceiling = min(self.max_delay_s, self.base_delay_s * 2.0**retry)
        return ceiling / 2 + rng.uniform(0, ceiling / 2)

    def until(self, deadline: float) -> RetryPolicy:
        """This backoff, bounded by the monotonic ``deadline`` alone (not by attempts or time per request)."""
        return replace(self, max_attempts=sys.maxsize, deadline_s=math.inf, give_up_at=deadline)


def client_error_code(exc: BaseException) -> tuple[str, int] | None:
    """``(error code, HTTP status)`` of a botocore ClientError; None for anything else."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return None
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "")), int(status or 0)


def is_transient(exc: BaseException) -> bool:
    """Whether a retry may succeed: throttling, 5xx, connection and timeout errors."""
    import urllib3.exceptions
    from botocore import exceptions as bce

    coded = client_error_code(exc)
    if coded is not None:
        code, status = coded
        return code in TRANSIENT_ERROR_CODES or status == 429 or status >= 500 or (code.isdigit() and int(code) >= 500)
    return isinstance(
        exc,
        bce.ConnectionError  # refused, connect timeout, endpoint unreachable
        | bce.HTTPClientError  # reset, closed, read timeout, broken stream
        | bce.IncompleteReadError
        | urllib3.exceptions.HTTPError
        | ConnectionError
        | TimeoutError,
    )


def is_permanent(exc: BaseException) -> bool:
    """Whether the request can never succeed as configured (missing bucket or key, refused credentials)."""
    from botocore import exceptions as bce

    coded = client_error_code(exc)
    if coded is not None:
        return coded[0] in PERMANENT_ERROR_CODES
    return isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError)


def describe_error(exc: BaseException) -> str:
    coded = client_error_code(exc)
    if coded is not None:
        code, status = coded
        message = getattr(exc, "response", {}).get("Error", {}).get("Message") or ""
        return f"{code} (HTTP {status}){': ' + message if message else ''}"
    return f"{type(exc).__name__}: {exc}"


def call_with_retries(
    operation: Callable[[], T],
    *,
    uri: str,
    what: str,
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> T:
    """Run ``operation``; retry transient errors per ``policy``; turn storage errors into ``StorageError``."""
    from botocore.exceptions import BotoCoreError, ClientError

    rng = rng or random.Random()
    started = clock()
    retry = 0
    while True:
        try:
            return operation()
        except StorageError:
            raise
        except Exception as exc:
            if is_permanent(exc):
                raise StorageError(f"{uri}: {what} failed: {describe_error(exc)}", uri=uri, permanent=True) from exc
            if not is_transient(exc):
                if isinstance(exc, BotoCoreError | ClientError):
                    raise StorageError(f"{uri}: {what} failed: {describe_error(exc)}", uri=uri) from exc
                raise
            delay = policy.delay(retry, rng)
            now = clock()
            elapsed = now - started
            if (
                retry + 1 >= policy.max_attempts
                or elapsed + delay > policy.deadline_s
                or (policy.give_up_at is not None and now + delay > policy.give_up_at)
            ):
                raise StorageError(
                    f"{uri}: {what} still failing after {retry + 1} attempts over {elapsed:.0f} s: "
                    f"{describe_error(exc)}",
                    uri=uri,
                ) from exc
            retry += 1
            log.warning("%s: %s failed (%s); retry %d in %.1f s", uri, what, describe_error(exc), retry, delay)
            sleep(delay)

"""The client's exceptions: one base class, one subclass per way a request can fail.

::

    SplitserveError
    ├── ConnectionFailed        could not connect, or the connection dropped   (retried)
    ├── RequestTimeout          the server sent nothing for ``timeout`` seconds (not retried)
    ├── MalformedResponse       the body is not the JSON / SSE the protocol promises
    ├── APIError(status, message)  the server answered with an error status
    │   ├── BadRequest          4xx: the request itself is wrong (not retried)
    │   │   └── AuthenticationFailed   401 / 403
    │   └── ServerError         5xx (and 408)                                    (retried)
    │       └── Overloaded      429 / 503, with ``retry_after_s``                (retried, slows the batch)
    └── BatchFailed             ``return_exceptions=False`` and some item failed; holds every result

``retryable`` says whether sending the same request again can help.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any


class SplitserveError(Exception):
    """Base class of every error the client raises."""

    retryable = False


class ConnectionFailed(SplitserveError):
    """The server could not be reached, or closed the connection before the response ended."""

    retryable = True


class RequestTimeout(SplitserveError):
    """No byte arrived for ``timeout`` seconds. Not retried: the server may still be working on it."""


class MalformedResponse(SplitserveError):
    """The response is not what the OpenAI protocol promises (bad JSON, missing fields, bad SSE)."""


class APIError(SplitserveError):
    """The server answered with an error status; ``message`` is the server's own text."""

    def __init__(self, status: int, message: str, *, type_: str | None = None, param: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.retry_after_s = retry_after_s


class BadRequest(APIError):
    """4xx (except 408 and 429): the request is wrong; sending it again will fail again."""


class AuthenticationFailed(BadRequest):
    """401 / 403: a missing or wrong API key."""


class ServerError(APIError):
    """5xx (and 408): the server failed; usually transient."""

    retryable = True


class Overloaded(ServerError):
    """429 / 503: the server cannot take the request now; ``retry_after_s`` is its hint (or None)."""


class BatchFailed(SplitserveError):
    """Raised by a batch with ``return_exceptions=False`` once every item has finished.

    ``results`` holds one entry per input, in input order: a result or the error.
    """

    def __init__(self, results: list[Any]) -> None:
        self.results = results
        self.errors = [r for r in results if isinstance(r, BaseException)]
        first = self.errors[0] if self.errors else None
        super().__init__(f"{len(self.errors)} of {len(results)} requests failed; first: {first!r}")


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), or None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def error_message(body: Any, fallback: str) -> tuple[str, str | None, str | None]:
    """(message, type, param) from an error body: OpenAI's ``{"error": {...}}``, FastAPI's ``{"detail"}``, or text."""
    if isinstance(body, Mapping):
        err = body.get("error")
        if isinstance(err, Mapping) and err.get("message"):
            return str(err["message"]), err.get("type"), err.get("param")
        if isinstance(err, str) and err:
            return err, None, None
        if body.get("detail"):
            detail = body["detail"]
            return (detail if isinstance(detail, str) else json.dumps(detail)), None, None
        if body.get("message"):
            return str(body["message"]), None, None
    return fallback, None, None


def error_for_status(status: int, text: str, headers: Mapping[str, str] | None = None) -> APIError:
    """The exception for an error response with this status, body text and headers."""
    try:
        body: Any = json.loads(text) if text else None
    except ValueError:
        body = None
    excerpt = text.strip()[:500] or "(empty body)"
    message, type_, param = error_message(body, excerpt)
    retry_after = parse_retry_after((headers or {}).get("retry-after"))
    return error_for_code(status, message, type_=type_, param=param, retry_after_s=retry_after)


def error_for_code(status: int, message: str, **kw: Any) -> APIError:
    """The ``APIError`` subclass for an HTTP status (also used for error events inside a stream)."""
    if status in (429, 503):
        cls: type[APIError] = Overloaded
    elif status in (401, 403):
        cls = AuthenticationFailed
    elif 400 <= status < 500 and status != 408:
        cls = BadRequest
    else:  # 5xx, 408, and anything unexpected
        cls = ServerError
    return cls(status, message, **kw)

"""The checks every HTTP request passes before a route runs, and the one place unexpected errors become responses.

``HTTPGuard`` is a plain ASGI middleware (not Starlette's ``BaseHTTPMiddleware``,
which wraps ``receive`` in a task group that swallows the ``http.disconnect``
read under ``Request.is_disconnected()``, so a route could never notice a
client leave). In order, for each HTTP request:

1. a request id (``x-request-id`` on every response; the route reads it from
   ``request.state.request_id`` and uses it as the request's id everywhere);
2. the API key, when one is set: every path but ``/health`` needs it (also
   ``/metrics``, whose tenant names are the operators' business, unless
   ``http.public_metrics``; and ``/docs``, ``/openapi.json``, ``/admin/*``);
3. ``Content-Type: application/json`` on a request with a body: a web page can
   send a ``text/plain`` or typeless body to a local server without a CORS
   preflight, so anything else is 415;
4. the body size as announced (the route enforces it again while reading);
5. any exception that escapes a route: logged with the request id and its
   traceback, answered with a 500 saying only "internal error (request id X)".

``public_message`` is what a client may read of an internal error: tracebacks,
file paths, IP addresses, pids and Ray actor ids are cut out.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import uuid
from typing import Any

from fastapi.responses import JSONResponse

from splitserve import openai_protocol as oai

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health"})
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


class APIError(Exception):
    """A request refused or failed with an HTTP status and OpenAI's error body (``param`` names the field)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(oai.error_body(self.message, self.type, self.param, self.status), status_code=self.status, headers=self.headers)


def internal_error_message(request_id: str | None) -> str:
    return f"internal error (request id {request_id})" if request_id else "internal error"


def json_error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
               headers: dict[str, str] | None = None) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """(status, body, headers) of an OpenAI-shaped error response."""
    body = json.dumps(oai.error_body(message, type_, param, status)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    return status, body, raw_headers


class HTTPGuard:
    """See the module docstring. ``api_key`` is the resolved key (from the config or its file), or None."""

    def __init__(self, app: Any, http: Any, api_key: str | None) -> None:
        self.app, self.cfg = app, http
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        refusal = self._check(scope)
        if refusal is not None:
            await _send_error(send_with_id, refusal)
            return
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if started:  # a stream carries its own error event: what escapes now is the client leaving (the server's business)
                raise
            logger.exception("request %s %s %s failed", request_id, scope.get("method"), scope.get("path"))
            await _send_error(send_with_id, json_error(500, internal_error_message(request_id), "InternalServerError"))

    def _check(self, scope: dict) -> tuple[int, bytes, list] | None:
        cfg, path = self.cfg, scope["path"]
        headers = {k.lower(): v for k, v in scope["headers"]}
        if self.expected is not None and path not in OPEN_PATHS and not (path == "/metrics" and cfg.public_metrics):
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return json_error(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", "AuthenticationError")
        if scope.get("method", "").encode() in _BODY_METHODS:
            media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if media_type != b"application/json":
                shown = media_type.decode("latin-1")[:64] or "none"
                return json_error(415, f"Content-Type must be application/json (got {shown})", param="content-type")
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > cfg.max_request_bytes:
            return json_error(413, f"request body of {length} bytes exceeds the limit of {cfg.max_request_bytes} bytes")
        return None


async def _send_error(send: Any, error: tuple[int, bytes, list]) -> None:
    status, body, headers = error
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---- what a client may read of an internal error ------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_HEADER = re.compile(r"ray::\S*\s*(\([^)]*\))?")  # "ray::ServeReplica:app:decode-0() (pid=.., ip=.., actor_id=.., repr=<..>)"
_KEYED = re.compile(r"\b(pid|ip|node_ip|actor_id|node_id|worker_id|job_id|task_id|repr|namespace|name|class_name)\s*[=:]\s*\S+", re.I)
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.@+~-]+){2,}[\\/]?")
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b")
_IPV6 = re.compile(r"(?<![\w:])(?=[0-9a-fA-F:]*[0-9a-fA-F])[0-9a-fA-F]{0,4}(?::[0-9a-fA-F]{0,4}){2,7}(?![\w:])")
_LONG_HEX = re.compile(r"\b(?:0x)?[0-9a-fA-F]{20,}\b")
_FINAL_CAUSE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit|Timeout|Died|Failed)\b[^\n]*$")
MAX_PUBLIC_CHARS = 300


def public_message(error: BaseException | str, request_id: str | None = None) -> str:
    """A short, single-line reason with no traceback, path, address, pid or actor id; ends with the request id."""
    text = _ANSI.sub("", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return internal_error_message(request_id)
    head = lines[0]
    cause = next((line for line in reversed(lines[1:]) if _FINAL_CAUSE.match(line)), None)
    if head.startswith("Traceback"):  # a bare traceback: only its last line says what happened
        head = cause or ""
    elif cause is not None and cause not in head:  # a Ray task error: the header, then the traceback, then the cause
        head = f"{head} {cause}"
    for pattern, replacement in ((_RAY_HEADER, ""), (_KEYED, ""), (_OBJECT_REPR, ""), (_PATH, "<path>"),
                                 (_IPV4, "<address>"), (_IPV6, "<address>")):
        head = pattern.sub(replacement, head)
    if request_id:
        head = head.replace(request_id, "\0")  # the request's own id is public; other long hex ids (actors) are not
    head = _LONG_HEX.sub("<id>", head).replace("\0", request_id or "")
    head = re.sub(r"\s+", " ", head).strip(" :;,")
    if len(head) > MAX_PUBLIC_CHARS:
        head = head[: MAX_PUBLIC_CHARS - 3] + "..."
    suffix = f" (request id {request_id})" if request_id else ""
    return (head or "internal error") + suffix

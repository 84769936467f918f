"""The client against misbehaving servers: overload with Retry-After, 5xx, refused and silent sockets, bad bodies.

Fake servers are ``httpx.MockTransport`` handlers (real bytes through httpx's
parsing, no sockets) or bare sockets for connection-level failures. No model.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from splitserve.client import (
    AIMDController, BatchFailed, Client, Completion, ConnectionFailed, MalformedResponse, Overloaded, Request,
    RequestTimeout, RetryPolicy, ServerError,
)
from splitserve.client.protocol import api_root

pytestmark = pytest.mark.unit

FAST_RETRY = RetryPolicy(max_attempts=4, backoff_base_s=0.001, backoff_max_s=0.005)


def sse(*events: dict | str) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)


def completion_events(text: str = "ab") -> str:
    chunks = [{"id": "c1", "model": "m", "choices": [{"index": 0, "text": ch, "finish_reason": None}]} for ch in text]
    chunks[-1]["choices"][0]["finish_reason"] = "length"
    usage = {"id": "c1", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": len(text), "total_tokens": 1 + len(text)}}
    return sse(*chunks, usage, "[DONE]")


def ok_response(body: dict) -> httpx.Response:
    if body.get("stream"):
        return httpx.Response(200, text=completion_events(), headers={"content-type": "text/event-stream"})
    return httpx.Response(200, json={"id": "c1", "choices": [{"index": 0, "text": "ab", "finish_reason": "stop"}],
                                     "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})


class FlakyServer:
    """Answers the first ``num_failures`` requests with ``status`` (and headers), then normally; records bodies."""

    def __init__(self, num_failures: int, status: int = 503, headers: dict | None = None, body: str | None = None):
        self.num_failures = num_failures
        self.status, self.headers = status, headers or {}
        self.body = body or json.dumps({"error": {"message": "busy", "type": "ServiceUnavailableError", "code": status}})
        self.bodies: list[dict] = []
        self.times: list[float] = []
        self.requests: list[httpx.Request] = []
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.requests.append(request)
            self.bodies.append(json.loads(request.content))
            self.times.append(time.monotonic())
            fail = len(self.bodies) <= self.num_failures
        if fail:
            return httpx.Response(self.status, text=self.body, headers=self.headers)
        return ok_response(self.bodies[-1])

    def client(self, **kw) -> Client:
        kw.setdefault("retry", FAST_RETRY)
        return Client("http://fake:8000", transport=httpx.MockTransport(self), **kw)


class MinTrackingController(AIMDController):
    min_limit = 10**9

    def on_overload(self, ticket, now, retry_after_s=None):
        super().on_overload(ticket, now, retry_after_s)
        self.min_limit = min(self.min_limit, self.limit)


def test_503_with_retry_after_is_retried_after_the_pause():
    server = FlakyServer(2, headers={"Retry-After": "0.05"})
    with server.client() as c:
        out = c.complete("hi")
    assert out.text == "ab" and out.timings.num_attempts == 3
    gaps = [b - a for a, b in zip(server.times, server.times[1:])]
    assert all(g >= 0.045 for g in gaps), gaps  # the server's Retry-After, not the tiny backoff
    assert out.timings.queue_s >= 0.09


def test_batch_slows_down_on_503_and_loses_nothing():
    server = FlakyServer(6, headers={"Retry-After": "0.02"})
    ctrl = MinTrackingController(8)
    with server.client() as c:
        results = c.batch([f"p{i}" for i in range(20)], concurrency=8, controller=ctrl)
    assert all(isinstance(r, Completion) for r in results)
    assert ctrl.num_decreases >= 1 and ctrl.min_limit <= 4, (ctrl.num_decreases, ctrl.min_limit)
    # nothing was sent during the Retry-After pause that followed the first refusal
    first_refusal = server.times[0]
    assert not [t for t in server.times[8:] if t < first_refusal + 0.015]
    assert len(server.bodies) == 26  # 6 refusals retried, 20 successes
    assert sum(r.timings.num_attempts for r in results) == 26
    assert {b["prompt"] for b in server.bodies} == {f"p{i}" for i in range(20)}
    assert all(b["stream"] and b["stream_options"] == {"include_usage": True} for b in server.bodies)


def test_overload_in_a_stream_event_is_retried():
    """splitserve reports a streaming 503 as an error event after HTTP 200; that counts as overload too."""
    calls = []

    def handler(request):
        calls.append(1)
        if len(calls) == 1:
            err = {"error": {"message": "no worker can take the request now", "type": "ServiceUnavailableError", "code": 503}}
            return httpx.Response(200, text=sse(err, "[DONE]"), headers={"content-type": "text/event-stream"})
        return ok_response(json.loads(request.content))

    ctrl = AIMDController(4)
    with Client("http://fake", transport=httpx.MockTransport(handler), retry=FAST_RETRY) as c:
        [out] = c.batch(["x"], controller=ctrl)
    assert out.text == "ab" and out.timings.num_attempts == 2 and ctrl.num_decreases == 1


def test_5xx_retried_4xx_not():
    server = FlakyServer(2, status=500)
    with server.client() as c:
        assert c.complete("x").timings.num_attempts == 3
    server = FlakyServer(5, status=500)
    with server.client() as c, pytest.raises(ServerError) as e:
        c.complete("x")
    assert e.value.status == 500 and e.value.message == "busy" and len(server.bodies) == 4
    server = FlakyServer(1, status=422, body='{"detail": "unprocessable"}')
    with server.client() as c:
        [r] = c.batch(["x"])
    assert r.status == 422 and r.message == "unprocessable" and len(server.bodies) == 1


def test_overloaded_for_good_gives_the_error_after_retries():
    server = FlakyServer(100, status=429, headers={"Retry-After": "0"})
    with server.client() as c:
        results = c.batch(["a", "b", "c"], concurrency=2)
    assert all(isinstance(r, Overloaded) and r.status == 429 for r in results)
    assert len(server.bodies) == 3 * FAST_RETRY.max_attempts


def test_connection_refused(closed_port):
    with Client(f"http://127.0.0.1:{closed_port}", retry=FAST_RETRY) as c:
        with pytest.raises(ConnectionFailed, match="is the server running"):
            c.complete("x")
        with pytest.raises(ConnectionFailed):
            list(c.stream("x"))
        with pytest.raises(ConnectionFailed):
            c.models()
        results = c.batch([f"p{i}" for i in range(7)], concurrency=3)
        assert len(results) == 7 and all(isinstance(r, ConnectionFailed) for r in results)
        with pytest.raises(BatchFailed) as e:
            c.batch(["a", "b"], return_exceptions=False)
        assert len(e.value.results) == 2 and len(e.value.errors) == 2


def test_silent_server_times_out(silent_port):
    with Client(f"http://127.0.0.1:{silent_port}", timeout=0.3, retry=FAST_RETRY) as c:
        start = time.monotonic()
        with pytest.raises(RequestTimeout, match="sent nothing for 0.3 s"):
            c.complete("x")
        with pytest.raises(RequestTimeout):
            list(c.stream("x"))
        [r] = c.batch(["x"])
        assert isinstance(r, RequestTimeout)
        assert time.monotonic() - start < 5  # timeouts are not retried


@pytest.mark.parametrize("body, content_type, match", [
    ("{not json", "application/json", "not valid JSON"),
    ('{"id": "x"}', "application/json", "no 'choices'"),
    ('{"choices": [{"index": 0}]}', "application/json", "no text"),
])
def test_malformed_whole_response(body, content_type, match):
    handler = lambda request: httpx.Response(200, text=body, headers={"content-type": content_type})  # noqa: E731
    with Client("http://fake", transport=httpx.MockTransport(handler), retry=FAST_RETRY) as c:
        with pytest.raises(MalformedResponse, match=match):
            c.complete("x")


@pytest.mark.parametrize("text, match", [
    ("data: {broken\n\n", "not valid JSON"),
    ("<html>oops</html>\n", "expected server-sent events"),
    ('data: {"choices": [{"index": 0, "text": "a", "finish_reason": null}]}\n\n', "ended before 'data: \\[DONE\\]'"),
    ('data: {"choices": [{"index": 0, "text": 5}]}\n\ndata: [DONE]\n\n', "not a string"),
])
def test_malformed_stream(text, match):
    handler = lambda request: httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})  # noqa: E731
    with Client("http://fake", transport=httpx.MockTransport(handler), retry=FAST_RETRY) as c:
        with pytest.raises(MalformedResponse, match=match):
            list(c.stream("x"))
        [r] = c.batch(["x"])
        assert isinstance(r, MalformedResponse)


def test_client_queue_sends_lower_priority_values_first():
    server = FlakyServer(0)
    reqs = [Request("low0", priority=9), Request("high", priority=-5), Request("mid", priority=0), Request("low1", priority=9)]
    with server.client() as c:
        results = c.run_batch(reqs, concurrency=1)
    assert [b["prompt"] for b in server.bodies] == ["high", "mid", "low0", "low1"]
    assert [b.get("priority") for b in server.bodies] == [-5, 0, 9, 9]
    assert len(results) == 4
    with server.client() as c:
        assert c.batch([]) == []


def test_headers_url_and_fields():
    server = FlakyServer(0)
    with server.client(api_key="sk-1", model="m1") as c:
        c.complete("x", max_tokens=3, tenant="team-a", stop=None)
        with pytest.raises(MalformedResponse, match="no 'message'"):  # the fake answers chat like a completion
            c.chat([{"role": "user", "content": "hi"}], model="m2")
    req = server.requests[0]
    assert req.url == "http://fake:8000/v1/completions"
    assert req.headers["authorization"] == "Bearer sk-1"
    assert server.bodies[0] == {"model": "m1", "prompt": "x", "max_tokens": 3, "tenant": "team-a", "stream": False}
    assert server.requests[1].url == "http://fake:8000/v1/chat/completions" and server.bodies[1]["model"] == "m2"
    for url in ("http://fake:8000", "http://fake:8000/", "http://fake:8000/v1", "http://fake:8000/v1/"):
        assert api_root(url) == "http://fake:8000/v1"
    with pytest.raises(ValueError, match="http://"):
        api_root("fake:8000")

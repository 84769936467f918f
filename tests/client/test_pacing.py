"""Pure client logic in milliseconds: the AIMD controller, retry policy, queue, error mapping, SSE and timing."""

from __future__ import annotations

import random
from email.utils import formatdate

import pytest

from splitserve.client import errors
from splitserve.client.errors import (
    AuthenticationFailed, BadRequest, ConnectionFailed, MalformedResponse, Overloaded, RequestTimeout, ServerError,
    error_for_status, parse_retry_after,
)
from splitserve.client.pacing import AIMDController, PendingQueue, RetryPolicy
from splitserve.client.protocol import SSEDecoder, StreamCollector, parse_chunk
from splitserve.client.rag import common_prefix, rag_messages, rag_prompt
from splitserve.client.types import Chunk, Request

pytestmark = pytest.mark.unit


# ---- AIMDController --------------------------------------------------------------------------------


def fill(ctrl: AIMDController, now: float = 0.0) -> list:
    tickets = []
    while ctrl.can_start(now):
        tickets.append(ctrl.on_start(now))
    return tickets


def test_starts_at_the_limit_and_never_exceeds_it():
    ctrl = AIMDController(4)
    tickets = fill(ctrl)
    assert len(tickets) == 4 and ctrl.in_flight == 4 and ctrl.wait_s(0.0) is None
    ctrl.on_failure(tickets.pop(), 0.1)
    assert ctrl.window == 4 and ctrl.wait_s(0.1) == 0.0 and len(fill(ctrl, 0.1)) == 1


def test_overload_halves_once_per_episode():
    ctrl = AIMDController(8)
    tickets = fill(ctrl)
    for t in tickets[:5]:  # five refusals from requests sent before the first one came back: one decrease
        ctrl.on_overload(t, 1.0)
    assert ctrl.limit == 4 and ctrl.num_decreases == 1
    for t in tickets[5:]:
        ctrl.on_success(t, 1.0)
    new = fill(ctrl, 1.0)  # sent after the decrease: a refusal now is a new episode
    ctrl.on_overload(new[0], 2.0)
    assert ctrl.limit == 2 and ctrl.num_decreases == 2


def test_window_never_below_min():
    ctrl = AIMDController(8, min_concurrency=3)
    for _ in range(5):
        ctrl.on_overload(ctrl.on_start(0.0), 0.0)
    assert ctrl.limit == 3 and ctrl.window == 3.0


def test_additive_increase_recovers_about_one_per_window():
    ctrl = AIMDController(10, initial_concurrency=2)
    for _ in range(2):
        ctrl.on_success(ctrl.on_start(0.0), 0.0)
    assert ctrl.limit == 2  # 2 + 1/2 + 1/2.5 = 2.9
    ctrl.on_success(ctrl.on_start(0.0), 0.0)
    assert ctrl.limit == 3
    for _ in range(1000):
        ctrl.on_success(ctrl.on_start(0.0), 0.0)
    assert ctrl.window == 10.0  # capped at max_concurrency


def test_retry_after_pauses_every_send():
    ctrl = AIMDController(4, max_pause_s=5.0)
    ctrl.on_overload(ctrl.on_start(0.0), 1.0, retry_after_s=2.0)
    assert not ctrl.can_start(2.9) and ctrl.wait_s(2.0) == pytest.approx(1.0)
    assert ctrl.can_start(3.0) and ctrl.wait_s(3.0) == 0.0
    ctrl.on_overload(ctrl.on_start(3.0), 3.0, retry_after_s=3600)  # capped
    assert ctrl.paused_until == 8.0


@pytest.mark.parametrize("kw, match", [
    ({"max_concurrency": 0}, "max_concurrency"),
    ({"max_concurrency": 4, "min_concurrency": 5}, "min_concurrency"),
    ({"max_concurrency": 4, "decrease_factor": 1.0}, "decrease_factor"),
    ({"max_concurrency": 4, "initial_concurrency": 9}, "initial_concurrency"),
])
def test_controller_rejects_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        AIMDController(**kw)


# ---- RetryPolicy and PendingQueue ------------------------------------------------------------


def test_backoff_grows_caps_and_honours_retry_after():
    policy = RetryPolicy(max_attempts=5, backoff_base_s=0.1, backoff_max_s=0.5, jitter=0.0)
    assert [policy.delay_s(n) for n in range(1, 6)] == [0.1, 0.2, 0.4, 0.5, 0.5]
    assert policy.delay_s(1, retry_after_s=3.0) == 3.0
    assert policy.delay_s(1, retry_after_s=3600.0) == 60.0
    jittered = RetryPolicy(backoff_base_s=1.0, backoff_max_s=1.0, jitter=0.5)
    rng = random.Random(0)
    assert all(0.5 <= jittered.delay_s(1, rng=rng) <= 1.0 for _ in range(100))


def test_what_is_retried():
    policy = RetryPolicy(max_attempts=3)
    for e in (ConnectionFailed("x"), ServerError(500, "x"), Overloaded(503, "x")):
        assert policy.should_retry(e, 1) and policy.should_retry(e, 2) and not policy.should_retry(e, 3)
    for e in (BadRequest(400, "x"), RequestTimeout("x"), MalformedResponse("x"), ValueError("x")):
        assert not policy.should_retry(e, 1)
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_queue_orders_by_priority_then_input_and_waits_out_backoff():
    q = PendingQueue()
    for i, prio in enumerate([0, 5, 0, 5, 9]):
        q.push(i, prio)
    q.push(5, 100, ready_at=1.0)
    assert [q.pop_ready(0.0) for _ in range(5)] == [0, 2, 1, 3, 4]  # lower value first, then input order
    assert q.pop_ready(0.5) is None and q.next_ready_at() == 1.0 and len(q) == 1
    assert q.pop_ready(1.0) == 5 and len(q) == 0 and q.next_ready_at() is None


# ---- errors --------------------------------------------------------------------------------------


def test_status_to_exception():
    body = '{"error": {"message": "n=2 is not supported", "type": "invalid_request_error", "param": "n", "code": 400}}'
    e = error_for_status(400, body)
    assert type(e) is BadRequest and e.message == "n=2 is not supported" and e.param == "n" and not e.retryable
    assert type(error_for_status(401, "{}")) is AuthenticationFailed
    e = error_for_status(503, "busy", {"retry-after": "2"})
    assert type(e) is Overloaded and e.retry_after_s == 2.0 and e.retryable and e.message == "busy"
    assert type(error_for_status(429, "")) is Overloaded
    e = error_for_status(502, "<html>bad gateway</html>")
    assert type(e) is ServerError and "bad gateway" in e.message and "HTTP 502" in str(e)
    assert issubclass(Overloaded, errors.SplitserveError)


def test_parse_retry_after():
    assert parse_retry_after("3") == 3.0 and parse_retry_after("0.25") == 0.25 and parse_retry_after("-1") == 0.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None and parse_retry_after("inf") is None
    import time

    assert 5 <= parse_retry_after(formatdate(time.time() + 10, usegmt=True)) <= 11


# ---- SSE, chunks, timing -------------------------------------------------------------------------


def test_sse_decoder():
    d = SSEDecoder()
    lines = [": keep-alive", "event: message", "data: {\"a\":", "data: 1}", "", "", "data: [DONE]", ""]
    assert [p for p in map(d.feed, lines) if p is not None] == ['{"a":\n1}', "[DONE]"]
    with pytest.raises(MalformedResponse, match="server-sent events"):
        d.feed("<html>")


def test_chat_chunk_and_error_event():
    chunk, usage, _ = parse_chunk('{"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": null}]}', chat=True)
    assert chunk == Chunk("", None, None) and usage is None
    with pytest.raises(Overloaded, match="no worker"):
        parse_chunk('{"error": {"message": "no worker", "code": 503}}', chat=False)


def test_collector_times_tokens():
    c = StreamCollector(sent_at=10.0)
    assert not c.add(Chunk(""), None, {"id": "r"}, 10.1)  # the chat role chunk: not a token
    c.add(Chunk("a", [1]), None, {}, 10.5)
    c.add(Chunk("bcd", [2, 3, 4]), None, {}, 10.8)  # three tokens in one chunk: three gaps of 0.1
    c.add(Chunk("e", [5], "length"), None, {}, 11.0)
    out = c.result(11.2, queue_s=0.3, num_attempts=2)
    assert out.text == "abcde" and out.token_ids == [1, 2, 3, 4, 5] and out.finish_reason == "length" and out.id == "r"
    t = out.timings
    assert t.ttft_s == pytest.approx(0.5) and t.total_s == pytest.approx(1.2) and t.e2e_s == pytest.approx(1.5)
    assert t.itl_s == pytest.approx([0.1, 0.1, 0.1, 0.2]) and t.median_itl_s == pytest.approx(0.1)


# ---- requests and RAG prompts -------------------------------------------------------------------


def test_request_body():
    r = Request("hi", max_tokens=4, tenant=None)
    assert r.body({"model": "m", "max_tokens": 9, "seed": None}) == {"model": "m", "max_tokens": 4, "prompt": "hi"}
    with pytest.raises(ValueError, match="exactly one"):
        Request("hi", messages=[{"role": "user", "content": "x"}])


def test_rag_prompts_share_the_document_prefix():
    docs = ["Whales are mammals.", "Rust is a language."]
    prompts = [rag_prompt(docs, q) for q in ("What are whales?", "What is Rust?")]
    prefix = common_prefix(prompts)
    assert "Rust is a language." in prefix and prompts[0].endswith("What are whales?\nAnswer:")
    assert rag_messages(docs, "Q?")[0]["content"] == rag_messages(docs, "Other?")[0]["content"]

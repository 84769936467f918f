"""The response cache in the ingress, over real in-process workers: a repeat of a greedy or seeded request is
answered from the cache (no worker sees it) with the reference's text and tokens, in either response shape."""

from __future__ import annotations

import contextlib

import pytest

from splitserve.router import RoutedRequest
from splitserve.engine.sampling_params import SamplingParams
from tests.splitserve.conftest import Stack, metric_value, settle
from tests.splitserve.ingress_helpers import CHAT, completion_body, parse_sse
from tests.splitserve.router_helpers import MAX_TOKENS, PROMPTS, cold_caches, shared  # noqa: F401 - fixtures

pytestmark = pytest.mark.engine

CACHE = {"response_cache": {"max_entries": 16}}
ROUTING = {"routing": {"prefix_aware": False, "local_prefill_threshold_tokens": 0}}


def served(stack: Stack) -> int:
    """Requests the stack's workers have been given."""
    return sum(w.num_requests for w in stack.workers)


def lookups(stack: Stack, result: str) -> float:
    return metric_value(stack.metrics_text(), "splitserve_response_cache_lookups_total", result=result) or 0.0


def test_a_repeated_greedy_completion_is_answered_from_the_cache_in_both_shapes(aio, shared, tiny_model, reference):
    prompt = PROMPTS[1]

    async def body():
        async with Stack(tiny_model, [shared["p0"]], [shared["d"]], **CACHE, **ROUTING) as s, s.client() as c:
            req = completion_body(prompt, MAX_TOKENS, return_token_ids=True)
            first = await c.post("/v1/completions", json=req)
            given = served(s)
            again = await c.post("/v1/completions", json=req)
            streamed = await c.post("/v1/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}})
            assert served(s) == given  # neither repeat reached a worker
            assert (lookups(s, "miss"), lookups(s, "hit")) == (1, 2)
        return first, again, streamed

    first, again, streamed = aio.run(body())
    assert first.status_code == again.status_code == streamed.status_code == 200
    assert (first.headers["x-splitserve-cache"], again.headers["x-splitserve-cache"]) == ("miss", "hit")
    assert streamed.headers["x-splitserve-cache"] == "hit"
    a, b = first.json(), again.json()
    assert b["choices"][0]["token_ids"] == a["choices"][0]["token_ids"] == reference.tokens(prompt, MAX_TOKENS)
    assert b["choices"][0]["text"] == a["choices"][0]["text"] == reference.text(prompt, MAX_TOKENS)
    assert b["choices"][0]["finish_reason"] == "length" and b["usage"] == a["usage"]
    assert b["id"] != a["id"]  # a new response, not the stored one
    events = parse_sse(streamed.text)
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == a["choices"][0]["text"]
    assert [t for e in events if e["choices"] for t in e["choices"][0].get("token_ids", [])] == a["choices"][0]["token_ids"]
    assert events[-1]["usage"] == a["usage"]


def test_a_streamed_chat_answer_is_stored_and_replayed_as_chat(aio, shared, tiny_model):
    async def body():
        async with Stack(tiny_model, [], [shared["both"]], **CACHE) as s, s.client() as c:
            req = {"messages": CHAT, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stream": True}
            first = await c.post("/v1/chat/completions", json=req)
            given = served(s)
            again = await c.post("/v1/chat/completions", json={**req, "stream": False})
            assert served(s) == given
        return first, again

    first, again = aio.run(body())
    assert (first.headers["x-splitserve-cache"], again.headers["x-splitserve-cache"]) == ("miss", "hit")
    events = parse_sse(first.text)
    streamed_text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert again.json()["choices"][0]["message"]["content"] == streamed_text
    assert again.json()["object"] == "chat.completion" and again.json()["usage"]["completion_tokens"] == 12


def test_sampled_requests_and_cache_control_go_to_a_worker(aio, shared, tiny_model):
    prompt = PROMPTS[0]

    async def body():
        async with Stack(tiny_model, [], [shared["both"]], **CACHE) as s, s.client() as c:
            sampled = completion_body(prompt, 6, temperature=0.9)
            seeded = completion_body(prompt, 6, temperature=0.9, seed=11)
            greedy = completion_body(prompt, 6)
            out = {}
            for name, req, headers in [
                ("sampled", sampled, {}), ("sampled again", sampled, {}),
                ("seeded", seeded, {}), ("seeded again", seeded, {}),
                ("greedy no-store", greedy, {"Cache-Control": "no-store"}), ("greedy", greedy, {}),
                ("greedy no-cache", greedy, {"Cache-Control": "no-cache"}), ("greedy again", greedy, {}),
            ]:
                before = served(s)
                r = await c.post("/v1/completions", json=req, headers=headers)
                assert r.status_code == 200, r.text
                out[name] = (r.headers.get("x-splitserve-cache"), served(s) - before, r.json()["choices"][0]["text"])
        return out

    out = aio.run(body())
    assert out["sampled"][:2] == out["sampled again"][:2] == (None, 1)  # not deterministic: never cached
    assert out["seeded"][:2] == ("miss", 1) and out["seeded again"][:2] == ("hit", 0)
    assert out["seeded again"][2] == out["seeded"][2]
    assert out["greedy no-store"][:2] == (None, 1)  # no-store: not looked up, not stored
    assert out["greedy"][:2] == ("miss", 1)
    assert out["greedy no-cache"][:2] == ("miss", 1)  # no-cache: generated anew (and stored)
    assert out["greedy again"][:2] == ("hit", 0)
    assert len({v[2] for k, v in out.items() if k.startswith("greedy")}) == 1


def test_a_request_that_ends_early_stores_nothing_and_frees_its_blocks(aio, shared, tiny_model):
    """The consumer leaves after two chunks (a client that hung up): no answer is kept, the worker ends whole."""
    prompt = PROMPTS[2]

    async def body():
        async with Stack(tiny_model, [], [shared["both"]], **CACHE) as s:
            rreq = RoutedRequest("left-early", list(prompt), SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
            key, hit = s.core.lookup(rreq, "")
            assert key is not None and hit is None
            async with contextlib.aclosing(s.core.answer(rreq, key, hit)) as chunks:
                got = [await anext(chunks), await anext(chunks)]
            assert not got[-1].finished
            await settle(s.workers)
            assert len(s.core.responses) == 0
            assert s.core.lookup(rreq, "")[1] is None

    aio.run(body())


def test_without_the_setting_nothing_is_cached(aio, shared, tiny_model):
    async def body():
        async with Stack(tiny_model, [], [shared["both"]]) as s, s.client() as c:
            req = completion_body(PROMPTS[0], 4)
            rs = [await c.post("/v1/completions", json=req) for _ in range(2)]
            assert s.core.responses is None
            assert lookups(s, "hit") == lookups(s, "miss") == 0
        return rs

    for r in aio.run(body()):
        assert r.status_code == 200 and "x-splitserve-cache" not in r.headers

"""The router's failure paths over real in-process workers (no Ray): failures never hang, never leak.

Transfers that fail or stall (``FaultInjectingAgent`` on a real NIXL agent), dead
prefill replicas (``LocalHandle.kill``), decode workers that refuse a reservation,
and malformed requests that get past the ingress (clients that go away:
test_router_disconnects.py). Each test checks the tokens against the offline ``LLM``
where the request should succeed, the retry metrics, and that afterwards every
worker holds no KV block, reservation or NIXL request (``Stack.__aexit__`` / ``settle``).
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from splitserve.router import RequestFailed
from splitserve.scheduler import NoWorkerAvailable, PromptTooLarge
from tests.splitserve.conftest import Stack, collect, greedy, make_decode, make_prefill, metric_value, settle
from tests.splitserve.router_helpers import (  # noqa: F401 - shared, own and cold_caches are fixtures
    MAX_TOKENS, PROMPTS, STALE_VIEW, cold_caches, expect_reference, held_prefill, own, retries, routed, shared,
)

pytestmark = pytest.mark.engine


# ---- transfers that fail or time out -------------------------------------------------------------


def test_failing_prefill_worker_is_retried_on_the_other(aio, shared, own, tiny_model, reference):
    """2P1D, every transfer of one P fails: requests finish on the other P with the right tokens."""
    bad = make_prefill(tiny_model, "prefill-0-fail", fail_fraction=1.0)  # sorts before prefill-1: picked first on ties
    own.append(bad)
    good, d = shared["p1"], shared["d"]
    good_before = good.num_requests

    async def body():
        # prefix-aware routing off: the burst repeats the prompts, and the 16-token one, then cached
        # whole on D, would (rightly) be prefilled there instead of going through the prefill workers
        async with Stack(tiny_model, [bad, good], [d], routing={"prefix_aware": False}) as s:
            await expect_reference(s.core, reference)
            # and a concurrent burst
            outs = await asyncio.gather(*(collect(s.core, p, greedy(MAX_TOKENS)) for p in PROMPTS))
            for p, (got, _) in zip(PROMPTS, outs):
                assert got == reference.tokens(p, MAX_TOKENS)
            failures = bad.agent.num_injected_failures
            assert failures >= 1, "the failing prefill worker was never tried"
            assert bad.num_failed == failures
            assert retries(s, "prefill_failed") == failures
            # every request was prefilled remotely on the healthy P, none fell back to local prefill
            assert good.num_requests - good_before == 2 * len(PROMPTS)
            assert routed(s, "prefill-1", "prefill") == 2 * len(PROMPTS)
            assert routed(s, "decode-0", "local") == 0
        await settle([bad, good, d])

    aio.run(body())


def test_all_transfers_failing_fall_back_to_local_prefill_on_decode(aio, shared, own, tiny_model, reference):
    """1P1D, every transfer fails: the retry excludes P, so D prefills locally; with one attempt: a clear error."""
    bad = make_prefill(tiny_model, "prefill-0-allfail", fail_fraction=1.0)
    own.append(bad)
    d = shared["d"]

    async def body():
        async with Stack(tiny_model, [bad], [d]) as s:  # max_attempts=3 (the default)
            await expect_reference(s.core, reference)
            n = len(PROMPTS)
            assert bad.agent.num_injected_failures == n
            assert retries(s, "prefill_failed") == n
            assert routed(s, "decode-0", "local") == n  # second attempt: no prefill worker left -> local
            assert routed(s, "decode-0", "decode") == n  # first attempt reserved on D, then released

        async with Stack(tiny_model, [bad], [d], routing={"max_attempts": 1}) as s, s.client() as c:
            with pytest.raises(RequestFailed, match="injected failure"):
                await collect(s.core, PROMPTS[0], greedy(MAX_TOKENS))
            await settle([bad, d])
            r = await c.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4})
            assert r.status_code == 500, r.text
            err = r.json()["error"]
            assert err["type"] == "InternalServerError" and "failed after 1 attempt" in err["message"]
            assert "injected failure" in err["message"]
            # streamed: an error event, then [DONE]
            r = await c.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4, "stream": True})
            assert r.status_code == 200
            assert r.text.endswith("data: [DONE]\n\n") and '"error"' in r.text and "injected failure" in r.text
        await settle([bad, d])

    aio.run(body())


def test_transfer_timeout_is_bounded_and_falls_back(aio, shared, own, tiny_model, reference):
    """A transfer held back 2 s with a 0.5 s timeout: cancelled, D's blocks freed, request served locally."""
    slow = held_prefill(own, tiny_model, "prefill-0-slow", 2.0, 0.5)
    d = shared["d"]

    async def body():
        async with Stack(tiny_model, [slow], [d]) as s:
            t0 = time.monotonic()
            await expect_reference(s.core, reference, PROMPTS[:2])
            elapsed = time.monotonic() - t0
            assert elapsed < 10, f"took {elapsed:.1f} s"
            assert slow.agent.num_injected_delays == 2
            assert retries(s, "prefill_failed") == 2
            assert routed(s, "decode-0", "local") == 2
            assert slow.transfer_bytes == 0  # nothing was ever reported as moved
        # the held-back writes were cancelled: past their post time nothing lands or lingers
        await asyncio.sleep(2.2)
        assert not slow.agent._held
        assert [m for peer, m in d.agent.get_notifications() if peer == "prefill-0-slow"] == []
        await settle([slow, d])

    aio.run(body())


def test_slow_transfer_within_timeout_is_not_retried(aio, shared, own, tiny_model, reference):
    slow = held_prefill(own, tiny_model, "prefill-0-lag", 0.3, 5.0)
    d = shared["d"]

    async def body():
        async with Stack(tiny_model, [slow], [d]) as s:
            await expect_reference(s.core, reference, PROMPTS[:2])
            assert retries(s, "prefill_failed") == 0
            assert routed(s, "decode-0", "local") == 0
            assert slow.transfer_seconds >= 2 * 0.3
            assert metric_value(s.metrics_text(), "splitserve_kv_transfer_seconds_count") == 2

    aio.run(body())


# ---- dead prefill replicas ------------------------------------------------------------------------


def test_killed_prefill_handle_routes_around_it(aio, shared, tiny_model, reference):
    p0, p1, d = shared["p0"], shared["p1"], shared["d"]

    async def body():
        async with Stack(tiny_model, [p0, p1], [d]) as s, s.client() as c:
            await expect_reference(s.core, reference, PROMPTS[:1])
            s.handles["prefill-0"].kill()
            p0_before, p1_before = p0.num_requests, p1.num_requests
            await expect_reference(s.core, reference)
            assert p0.num_requests == p0_before  # nothing reached the dead replica
            assert p1.num_requests - p1_before == len(PROMPTS)
            # the registry's polls fail -> unhealthy
            deadline = time.monotonic() + 5
            while "prefill-0" in s.core.registry.healthy_ids() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert "prefill-0" not in s.core.registry.healthy_ids()
            assert {"prefill-1", "decode-0"} <= s.core.registry.healthy_ids()
            health = (await c.get("/health")).json()
            assert health["healthy_prefill"] == ["prefill-1"] and health["healthy_decode"] == ["decode-0"]
            assert metric_value(s.metrics_text(), "splitserve_worker_healthy", role="prefill", worker="prefill-0") == 0

            # both prefill replicas dead: the decode worker prefills locally
            s.handles["prefill-1"].kill()
            local_before = routed(s, "decode-0", "local")
            await expect_reference(s.core, reference, PROMPTS[:2])
            assert routed(s, "decode-0", "local") - local_before == 2
            assert p1.num_requests - p1_before == len(PROMPTS)

    aio.run(body())


# ---- decode back-pressure ---------------------------------------------------------------------------


def test_decode_worker_that_cannot_reserve_moves_to_the_other(aio, shared, own, tiny_model, reference):
    """The view says decode-0 is emptiest, but its pool is in fact full: WorkerBusy -> decode-1."""
    small = make_decode(tiny_model, "decode-1", num_kv_blocks=16)
    own.append(small)
    p, d = shared["p1"], shared["d"]

    async def body():
        async with Stack(tiny_model, [p], [d, small], **STALE_VIEW) as s:
            # fill decode-0 behind the router's back (its view was taken at start-up)
            hog = await d.reserve("hog", d.engine.max_model_len - 1)
            assert d.engine.pool.num_free_blocks == 0 and len(hog) == d.engine.pool.num_blocks
            try:
                await expect_reference(s.core, reference, PROMPTS[:2])
                assert retries(s, "decode_busy") == 2
                assert routed(s, "decode-1", "decode") == 2
                assert small.num_requests == 2
            finally:
                await d.release("hog")

    aio.run(body())


def test_single_full_decode_worker_answers_503_with_retry_after(aio, shared, own, tiny_model):
    small = make_decode(tiny_model, "decode-small", num_kv_blocks=8)
    own.append(small)
    p = shared["p1"]
    req = {"prompt": PROMPTS[2], "max_tokens": 4}

    async def body():
        # the view knows D is full (fresh polls): rejected before any call to a worker
        async with Stack(tiny_model, [p], [small]) as s, s.client() as c:
            await small.reserve("hog", 8 * 16 - 1)
            try:
                deadline = time.monotonic() + 5
                while s.core.registry.reports["decode-small"]["num_free_blocks"] != 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                before = small.num_requests
                r = await c.post("/v1/completions", json=req)
                assert r.status_code == 503, r.text
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["type"] == "ServiceUnavailableError"
                r = await c.post("/v1/completions", json={**req, "stream": True})
                assert r.status_code == 503, r.text  # admission is checked before the stream starts
                assert int(r.headers["retry-after"]) >= 1
                assert small.num_requests == before
                assert metric_value(s.metrics_text(), "splitserve_requests_total", status="rejected", tenant="default") == 2
            finally:
                await small.release("hog")

        # the view is stale (D looked empty), D refuses the reservation: still back-pressure, not a 500
        async with Stack(tiny_model, [p], [small], **STALE_VIEW) as s, s.client() as c:
            await small.reserve("hog", 8 * 16 - 1)
            try:
                r = await c.post("/v1/completions", json=req)
                assert r.status_code == 503, r.text
                assert int(r.headers["retry-after"]) >= 1
                assert "no room" in r.json()["error"]["message"]
                assert retries(s, "decode_busy") == 1
            finally:
                await small.release("hog")

        # the same with a single attempt allowed (the refusal ends the loop rather than the next pick)
        async with Stack(tiny_model, [p], [small], routing={**STALE_VIEW["routing"], "max_attempts": 1}) as s, s.client() as c:
            await small.reserve("hog", 8 * 16 - 1)
            try:
                r = await c.post("/v1/completions", json=req)
                assert r.status_code == 503, r.text
                assert "no room" in r.json()["error"]["message"]
            finally:
                await small.release("hog")

        # a prompt larger than the whole pool: never retryable -> 400
        async with Stack(tiny_model, [p], [small]) as s, s.client() as c:
            r = await c.post("/v1/completions", json={"prompt": list(range(5, 205)), "max_tokens": 4})
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "prompt" and "shorten the prompt" in r.json()["error"]["message"]

    aio.run(body())


def test_requests_one_after_another_fit_a_worker_whose_picture_is_stale(aio, shared, own, tiny_model):
    """The router's picture is refreshed rarely (STALE_VIEW) and the decode worker holds one of these requests at a
    time: each finished request gives its blocks back to the picture, so the next is served, not refused (503)."""
    small = make_decode(tiny_model, "decode-small", num_kv_blocks=8)  # 128 token slots; each request takes 5 blocks
    own.append(small)
    rng = random.Random(7)
    prompts = [[rng.randrange(5, 4000) for _ in range(70)] for _ in range(3)]

    async def body():
        async with Stack(tiny_model, [shared["p1"]], [small], **STALE_VIEW) as s, s.client() as c:
            for i, prompt in enumerate(prompts):
                r = await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, **({"stream": True} if i else {})})
                assert r.status_code == 200, (i, r.text)
            assert small.num_requests == 3 and retries(s, "decode_busy") == 0
            assert s.core.registry.view.get("decode-small").num_free_blocks == 8

    aio.run(body())


# ---- malformed requests that get past the ingress --------------------------------------------------


def _bad_params():
    params = greedy(4)
    params.temperature = -1.0  # bypasses SamplingParams' own validation; the workers re-validate
    return params


BAD_ROUTED = {
    # prompt, params, the error, words its message must hold
    "token_outside_vocab": ([1, 5000, 2], lambda: greedy(4), RequestFailed, "vocabulary"),
    "bad_sampling_params": ([1, 2, 3, 4], _bad_params, RequestFailed, "temperature"),
    "prompt_fills_the_context": ([7] * 4096, lambda: greedy(4), PromptTooLarge, "4096 tokens"),
}


@pytest.mark.parametrize("case", list(BAD_ROUTED))
def test_bad_request_reaching_the_router_never_leaks(aio, shared, tiny_model, reference, case):
    prompt, params, error, words = BAD_ROUTED[case]
    p, d = shared["p1"], shared["d"]

    async def body():
        async with Stack(tiny_model, [p], [d]) as s:
            with pytest.raises(error, match=words):
                await collect(s.core, prompt, params())
            await settle([p, d])
            got, _ = await collect(s.core, PROMPTS[0], greedy(4))
            assert got == reference.tokens(PROMPTS[0], 4)

    aio.run(body())


def test_no_decode_worker_at_all_means_degraded_mode_or_back_pressure(aio, shared, tiny_model, reference):
    """Decode dead: the prefill worker serves whole requests (counted, shown); with degraded_mode off, a 503
    that names the decode role."""
    p, d = shared["p1"], shared["d"]

    async def body():
        async with Stack(tiny_model, [p], [d]) as s, s.client() as c:
            s.handles["decode-0"].kill()
            deadline = time.monotonic() + 5
            while "decode-0" in s.core.registry.healthy_ids() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            before = p.num_requests
            got, _ = await collect(s.core, PROMPTS[0], greedy(MAX_TOKENS))
            assert got == reference.tokens(PROMPTS[0], MAX_TOKENS)
            assert p.num_requests == before + 1 and routed(s, "prefill-1", "local") == 1
            assert metric_value(s.metrics_text(), "splitserve_fallbacks_total", reason="no_decode_worker") == 1
            admin = (await c.get("/admin/workers")).json()
            assert admin["serving"]["status"] == "degraded" and "no healthy decode worker" in admin["serving"]["detail"]
            assert admin["fallbacks"] == {"no_decode_worker": 1}
            health = await c.get("/health")
            assert health.status_code == 200 and health.json()["status"] == "degraded"
            assert metric_value((await c.get("/metrics")).text, "splitserve_degraded") == 1

        async with Stack(tiny_model, [p], [d], routing={"degraded_mode": False}) as s, s.client() as c:
            s.handles["decode-0"].kill()
            deadline = time.monotonic() + 5
            while "decode-0" in s.core.registry.healthy_ids() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            with pytest.raises(NoWorkerAvailable, match="no healthy decode worker"):
                await collect(s.core, PROMPTS[0], greedy(4))
            r = await c.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4})
            assert r.status_code == 503 and "no healthy decode worker" in r.json()["error"]["message"]
            assert "prefill" not in r.json()["error"]["message"].split("no healthy decode worker")[0]
        await settle([p, d])

    aio.run(body())

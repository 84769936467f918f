"""Clients that go away, over real in-process workers (no Ray): a disconnect mid-stream, during the prefill or
while the decode worker reserves, and the request timeout all end the request and free every block.
Same set-up as test_router.py (router_helpers.py)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from splitserve.router import RoutedRequest
from tests.splitserve.conftest import Stack, collect, greedy, metric_value, settle, worker_is_idle
from tests.splitserve.router_helpers import MAX_TOKENS, PROMPTS, cold_caches, held_prefill, own, shared  # noqa: F401 - fixtures

pytestmark = pytest.mark.engine


@pytest.mark.parametrize("mode", ["disaggregated", "aggregated"])
def test_client_disconnect_mid_stream_aborts_and_frees_blocks(aio, shared, tiny_model, mode):
    p, d = shared["p1"], shared["d" if mode == "disaggregated" else "both"]
    prefill = [p] if mode == "disaggregated" else []

    aborted = []
    real_abort = d.abort

    async def spy_abort(req_id, *settled):
        aborted.append(req_id)
        return await real_abort(req_id, *settled)

    async def body():
        async with Stack(tiny_model, prefill, [d]) as s:
            rreq = RoutedRequest(uuid.uuid4().hex, PROMPTS[3], greedy(2000))
            agen = s.core.router.stream(rreq)
            chunks = [await agen.__anext__(), await agen.__anext__()]
            assert all(c.new_token_ids and not c.finished for c in chunks)
            assert d.engine.has_unfinished_requests()
            steps = d.aengine.num_steps
            await agen.aclose()
            t0 = time.monotonic()
            while not (worker_is_idle(d) and aborted) and time.monotonic() - t0 < 5:
                await asyncio.sleep(0.01)
            assert worker_is_idle(d), "the abandoned request still holds blocks"
            # aborted, not run to its 2000 tokens
            assert d.aengine.num_steps - steps < 200
            assert rreq.req_id not in d.engine._seqs
            # the router itself told the decode worker (with Ray, nothing else would)
            assert aborted == [rreq.req_id]

    d.abort = spy_abort  # the handle calls the worker's attribute: this instance's spy
    try:
        aio.run(body())
    finally:
        del d.abort


def test_client_disconnect_during_prefill_releases_everything(aio, shared, own, tiny_model, reference):
    """Cancelled while P's transfer is still held back: P's blocks and D's reservation are freed, no late write."""
    slow = held_prefill(own, tiny_model, "prefill-0-stall", 1.0, 10.0)
    d = shared["d"]

    async def body():
        async with Stack(tiny_model, [slow], [d]) as s:
            rreq = RoutedRequest(uuid.uuid4().hex, PROMPTS[3], greedy(MAX_TOKENS))

            async def consume():
                return [c async for c in s.core.chunks(rreq)]

            task = asyncio.create_task(consume())
            deadline = time.monotonic() + 5
            while not slow.agent._held and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert slow.agent._held, "the transfer never started"
            assert d.engine.num_blocks_in_flight() > 0  # D holds the reservation
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await settle([slow, d], timeout_s=5)
            assert metric_value(s.metrics_text(), "splitserve_requests_total", status="cancelled", tenant="default") == 1
            await asyncio.sleep(1.2)  # past the held write's post time: it was cancelled, it must not land
            assert not slow.agent._held and not len(d._landings)
            assert [m for peer, m in d.agent.get_notifications() if peer == "prefill-0-stall"] == []
            await settle([slow, d])
            # and the pair still works
            got, _ = await collect(s.core, PROMPTS[0], greedy(4))
            assert got == reference.tokens(PROMPTS[0], 4)

    aio.run(body())


def test_client_gone_while_the_decode_worker_reserves_leaks_nothing(aio, shared, tiny_model, reference):
    """Cancelled while D's reservation is queued behind a long engine step: the late reservation is undone."""
    p, d = shared["p1"], shared["d"]

    async def body():
        async with Stack(tiny_model, [p], [d]) as s:
            busy = asyncio.ensure_future(d.aengine.call(lambda: time.sleep(0.5)))  # a long step on D's engine thread
            while not d.aengine._ops:  # it has been taken by the engine thread once the op list is empty again
                await asyncio.sleep(0)
            while d.aengine._ops:
                await asyncio.sleep(0.005)
            rreq = RoutedRequest(uuid.uuid4().hex, PROMPTS[3], greedy(MAX_TOKENS))
            task = asyncio.create_task(collect(s.core, rreq.prompt_token_ids, rreq.params, rreq.req_id))
            deadline = time.monotonic() + 5
            while not d.aengine._ops and time.monotonic() < deadline:  # the reserve call is queued
                await asyncio.sleep(0.002)
            assert d.aengine._ops and not busy.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await busy
            await settle([p, d])
            got, _ = await collect(s.core, PROMPTS[0], greedy(4))
            assert got == reference.tokens(PROMPTS[0], 4)

    aio.run(body())


def test_request_timeout_ends_the_request_and_frees_blocks(aio, shared, tiny_model):
    p, d = shared["p1"], shared["d"]

    async def body():
        async with Stack(tiny_model, [p], [d], routing={"request_timeout_s": 1.0}) as s, s.client() as c:
            steps = d.aengine.num_steps
            t0 = time.monotonic()
            r = await c.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 4000, "ignore_eos": True})
            assert time.monotonic() - t0 < 5
            assert r.status_code == 500 and "exceeded" in r.json()["error"]["message"], r.text
            await settle([p, d])
            assert d.aengine.num_steps - steps < 3000
            assert metric_value(s.metrics_text(), "splitserve_requests_total", status="timeout", tenant="default") == 1

    aio.run(body())

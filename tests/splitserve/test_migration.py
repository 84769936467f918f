"""Request migration over real in-process workers: a decode worker dies mid-stream, the stream goes on elsewhere.

``LocalHandle.kill()`` makes the dying replica's stream fail at its next chunk
(and drops its work there, as a dead process would). The router resumes the
request on another worker from prompt + the tokens already streamed; the client
sees one stream whose tokens and text equal the offline greedy run's.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from splitserve.router import RequestFailed, RoutedRequest
from tests.splitserve.conftest import Stack, greedy, make_decode, make_prefill, metric_value, settle, stop_workers

pytestmark = pytest.mark.engine

PROMPT = list(range(40, 73))  # 33 tokens: three blocks, the last one partly filled
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def workers(aio, tiny_model):
    made = {"p": make_prefill(tiny_model, "prefill-0"), "d0": make_decode(tiny_model, "decode-0"), "d1": make_decode(tiny_model, "decode-1")}
    yield made
    aio.run(stop_workers(made.values()))


async def stream_and_kill(s: Stack, after_chunks: int, max_tokens: int = MAX_TOKENS, kills: int = 1) -> tuple[list[int], str, list[str]]:
    """Stream one greedy request; after ``after_chunks`` chunks kill whichever worker is generating it (``kills`` times)."""
    rreq = RoutedRequest(uuid.uuid4().hex, PROMPT, greedy(max_tokens))
    ids, text, killed = [], [], []
    async for chunk in s.core.router.stream(rreq):
        ids += chunk.new_token_ids
        text.append(chunk.new_text)
        if len(killed) < kills and len(text) >= after_chunks * (len(killed) + 1):
            busy = [w for wid, w in {**s.decode_workers, **s.prefill_workers}.items()
                    if w.engine.has_unfinished_requests() and wid not in killed]
            assert len(busy) == 1, [w.worker_id for w in busy]
            shown = {r["req_id"]: r for r in s.core.router.in_flight_view()["requests"]}[rreq.req_id]
            assert shown["decode_worker_id"] == busy[0].worker_id and shown["migrations"] == len(killed), shown
            assert shown["num_output_tokens"] == len(ids)
            killed.append(busy[0].worker_id)
            s.handles[busy[0].worker_id].kill()
    assert rreq.req_id not in s.core.router.in_flight, "a finished request leaves /admin/requests"
    return ids, "".join(text), killed


def test_stream_survives_its_decode_worker_dying(aio, workers, tiny_model, reference):
    p, d0, d1 = workers["p"], workers["d0"], workers["d1"]

    async def body():
        async with Stack(tiny_model, [p], [d0, d1]) as s, s.client() as c:
            ids, text, killed = await stream_and_kill(s, after_chunks=3)
            assert ids == reference.tokens(PROMPT, MAX_TOKENS), "the resumed stream must continue the greedy run exactly"
            assert text == reference.text(PROMPT, MAX_TOKENS)
            survivor = d1 if killed == ["decode-0"] else d0
            assert survivor.num_resumed == 1
            m = s.metrics_text()
            assert metric_value(m, "splitserve_migrations_total") == 1
            assert metric_value(m, "splitserve_fallbacks_total", reason="migration") == 1
            admin = (await c.get("/admin/workers")).json()
            assert admin["migrations"] == 1 and admin["fallbacks"]["migration"] == 1
            assert killed[0] not in s.core.registry.healthy_ids()  # marked down at once, not at its next poll
        await settle([p, d0, d1])

    aio.run(body())


def test_only_decode_worker_dies_the_prefill_worker_finishes_the_stream(aio, workers, tiny_model, reference):
    """1P1D: no other decode worker, so the prefill worker resumes the request (degraded mode)."""
    p, d0 = workers["p"], workers["d0"]

    async def body():
        async with Stack(tiny_model, [p], [d0]) as s:
            resumed_before = p.num_resumed
            ids, text, killed = await stream_and_kill(s, after_chunks=2)
            assert killed == ["decode-0"]
            assert ids == reference.tokens(PROMPT, MAX_TOKENS) and text == reference.text(PROMPT, MAX_TOKENS)
            assert p.num_resumed == resumed_before + 1
            m = s.metrics_text()
            assert metric_value(m, "splitserve_fallbacks_total", reason="no_decode_worker") == 1
            assert s.core.router.serving_state().status == "degraded"
        await settle([p, d0])

    aio.run(body())


def test_a_second_death_migrates_again_until_the_limit(aio, workers, tiny_model, reference):
    """Two deaths: the limit of 2 lets the stream finish on its third worker; a limit of 1 ends it cleanly."""
    p, d0, d1 = workers["p"], workers["d0"], workers["d1"]

    async def body():
        async with Stack(tiny_model, [p], [d0, d1], routing={"migration_limit": 2}) as s:
            ids, _, killed = await stream_and_kill(s, after_chunks=2, kills=2)
            assert len(killed) == 2 and ids == reference.tokens(PROMPT, MAX_TOKENS)
            assert metric_value(s.metrics_text(), "splitserve_migrations_total") == 2
        await settle([p, d0, d1])

        async with Stack(tiny_model, [p], [d0, d1], routing={"migration_limit": 1}) as s:
            with pytest.raises(RequestFailed, match="not resumed: it was already moved 1 times") as info:
                await stream_and_kill(s, after_chunks=2, kills=2)
            message = str(info.value)
            assert "failed after" in message and "streamed tokens" in message and "Traceback" not in message
        await settle([p, d0, d1])

    aio.run(body())


def test_migration_limit_zero_ends_the_stream_with_an_error_event(aio, workers, tiny_model):
    p, d0, d1 = workers["p"], workers["d0"], workers["d1"]

    async def kill_once_generating(s: Stack) -> None:
        while True:  # (httpx's in-process transport hands the body over only at the end: kill from here)
            busy = [wid for wid, w in s.decode_workers.items() if any(q.num_output_tokens >= 5 for q in w.engine._seqs.values())]
            if busy:
                s.handles[busy[0]].kill()
                return
            await asyncio.sleep(0.005)

    async def body():
        async with Stack(tiny_model, [p], [d0, d1], routing={"migration_limit": 0}) as s, s.client() as c:
            req = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
            killer = asyncio.ensure_future(kill_once_generating(s))
            r = await c.post("/v1/completions", json=req)
            await asyncio.wait_for(killer, 5)
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert len(events) >= 3 and events[-1] == "[DONE]" and '"error"' in events[-2], events[-3:]
            assert "the worker died or is unreachable" in events[-2] and "routing.migration_limit" in events[-2]
            assert "Traceback" not in r.text
        await settle([p, d0, d1])

    aio.run(body())

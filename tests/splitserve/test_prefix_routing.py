"""Prefix-aware routing over real in-process workers: load reports carry cache summaries, the router uses them.

A prefill worker that already holds a prompt's shared document must get the
next prompt with that document (and hit its cache), even where the plain
least-loaded tie-break would pick another worker; an unrelated prompt still
goes by load; ``routing.prefix_aware: false`` turns it off. Tokens always match
the offline ``LLM``.
"""

from __future__ import annotations

import random

import pytest

from splitserve.engine.block_pool import compute_block_hashes
from tests.splitserve.conftest import Stack, collect, greedy, make_decode, make_prefill, metric_value, stop_workers

pytestmark = pytest.mark.engine

MAX_TOKENS = 8
_rng = random.Random(7)
DOCUMENT = [_rng.randrange(5, 4000) for _ in range(96)]  # 6 full blocks of 16 shared by every question
OTHER_DOCUMENT = [_rng.randrange(5, 4000) for _ in range(96)]


def question(n: int) -> list[int]:
    return [_rng.randrange(5, 4000) for _ in range(n)]


@pytest.fixture(scope="module")
def workers(aio, tiny_model):
    made = {
        "a": make_prefill(tiny_model, "prefill-a"),  # sorts first: wins every tie on load
        "b": make_prefill(tiny_model, "prefill-b"),
        "d": make_decode(tiny_model, "decode-0"),
    }
    yield made
    aio.run(stop_workers(made.values()))


def routed(s: Stack, worker: str) -> float:
    return metric_value(s.metrics_text(), "splitserve_requests_routed_total", worker=worker, role="prefill") or 0.0


def test_prompt_goes_to_the_prefill_worker_holding_its_document(aio, workers, tiny_model, reference):
    a, b, d = workers["a"], workers["b"], workers["d"]
    first = DOCUMENT + question(20)

    async def body():
        # 1. only prefill-b exists: it prefills (and caches) the document
        async with Stack(tiny_model, [b], [d]) as s:
            got, _ = await collect(s.core, first, greedy(MAX_TOKENS))
            assert got == reference.tokens(first, MAX_TOKENS)
        hits_before = b.engine.pool.num_prefix_hits
        # 2. both exist and are idle: the tie-break alone would pick prefill-a
        async with Stack(tiny_model, [a, b], [d]) as s:
            held = s.core.registry.prefix_hashes("prefill-b")
            assert set(compute_block_hashes(DOCUMENT, 16)) <= held, "prefill-b's load report carried no cache summary"
            assert s.core.registry.prefix_hashes("prefill-a") == frozenset()
            assert "prefix_hashes" not in s.core.registry.reports["prefill-b"]  # kept out of /admin/workers
            second = DOCUMENT + question(24)
            got, _ = await collect(s.core, second, greedy(MAX_TOKENS))
            assert got == reference.tokens(second, MAX_TOKENS)
            assert routed(s, "prefill-b") == 1 and routed(s, "prefill-a") == 0
            assert b.engine.pool.num_prefix_hits - hits_before >= 6, "the document's 6 blocks were not reused"
            # an unrelated prompt is cached nowhere: plain least-loaded, i.e. the tie-break
            unrelated = OTHER_DOCUMENT + question(20)
            got, _ = await collect(s.core, unrelated, greedy(MAX_TOKENS))
            assert got == reference.tokens(unrelated, MAX_TOKENS)
            assert routed(s, "prefill-a") == 1
        # 3. switched off: the document no longer attracts the request
        async with Stack(tiny_model, [a, b], [d], routing={"prefix_aware": False}) as s:
            assert s.core.registry.prefix_hashes("prefill-b") == frozenset()
            third = DOCUMENT + question(28)
            got, _ = await collect(s.core, third, greedy(MAX_TOKENS))
            assert got == reference.tokens(third, MAX_TOKENS)
            assert routed(s, "prefill-a") == 1 and routed(s, "prefill-b") == 0

    aio.run(body(), timeout_s=120)


def test_cache_summary_is_resent_only_when_the_cache_changed(aio, workers):
    b = workers["b"]

    async def body():
        version, hashes = await b.prefix_summary(-1)
        assert version == b.engine.pool.prefix_version == b.stats().prefix_version and hashes
        assert await b.prefix_summary(version) is None  # unchanged: nothing to send
        await b.reset_prefix_cache()
        changed = await b.prefix_summary(version)
        assert changed[1] == [] and changed[0] != version and b.stats().prefix_version == changed[0]

    aio.run(body())


def test_decode_worker_reuses_its_cached_prefix_and_receives_only_the_rest(aio, workers, tiny_model, reference):
    p, d = workers["b"], workers["d"]
    per_block = p.agent.layout.bytes_per_block

    async def body():
        for w in (p, d):
            await w.reset_prefix_cache()
        # routing by prefix off: every prompt goes through the prefill worker (a prompt the decode worker
        # holds whole would otherwise be prefilled there), which shows the reuse is the decode engine's own
        async with Stack(tiny_model, [p], [d], routing={"prefix_aware": False}) as s:
            first = DOCUMENT + question(20)  # 116 tokens = 8 blocks, all sent
            before = p.transfer_bytes
            got, _ = await collect(s.core, first, greedy(MAX_TOKENS))
            assert got == reference.tokens(first, MAX_TOKENS)
            assert p.transfer_bytes - before == 8 * per_block
            hits = d.engine.pool.num_prefix_hits
            second = DOCUMENT + question(30)  # 126 tokens = 8 blocks; the document's 6 are on D already
            before = p.transfer_bytes
            got, chunks = await collect(s.core, second, greedy(MAX_TOKENS))
            assert got == reference.tokens(second, MAX_TOKENS)
            assert p.transfer_bytes - before == 2 * per_block, "the document's blocks were sent again"
            assert d.engine.pool.num_prefix_hits - hits == 6
            assert chunks[0].num_cached_tokens == 6 * 16
            # a prompt that is exactly the cached blocks still sends its last block (and so its notification)
            before = p.transfer_bytes
            got, _ = await collect(s.core, DOCUMENT, greedy(MAX_TOKENS))
            assert got == reference.tokens(DOCUMENT, MAX_TOKENS)
            assert p.transfer_bytes - before == 1 * per_block

    aio.run(body(), timeout_s=120)

"""Streams served through the token feed over real in-process workers: the tokens are the reference's, they
travel as one feed item per engine step for all of a worker's requests, and a request's own call carries none."""

from __future__ import annotations

import asyncio

import pytest

from tests.splitserve.conftest import Stack, collect, greedy
from tests.splitserve.ingress_helpers import completion_body, parse_sse
from tests.splitserve.router_helpers import MAX_TOKENS, PROMPTS, cold_caches, own, shared  # noqa: F401 - fixtures

pytestmark = pytest.mark.engine


class Counted:
    """Wraps a worker's streaming methods (``LocalHandle`` calls the instance's attributes) to count their items."""

    def __init__(self, worker, *names: str) -> None:
        self.worker, self.items = worker, {name: [] for name in names}
        for name in names:
            setattr(worker, name, self._wrap(name, getattr(worker, name)))

    def _wrap(self, name, method):
        async def counted(*args, **kwargs):
            async for item in method(*args, **kwargs):
                self.items[name].append(item)
                yield item

        return counted

    def restore(self) -> None:
        for name in self.items:
            delattr(self.worker, name)


@pytest.mark.parametrize("layout", ["1P1D", "aggregated"])
def test_concurrent_streams_share_one_feed_item_per_step(aio, shared, tiny_model, reference, layout):
    decoder = shared["d"] if layout == "1P1D" else shared["both"]
    prefill = [shared["p0"]] if layout == "1P1D" else []
    method = "serve_prefilled" if layout == "1P1D" else "generate"
    counted = Counted(decoder, "feed", method)
    prompts = PROMPTS * 2

    async def body():
        # the prompts are short: prefill them remotely all the same, so the 1P1D path is the one measured
        async with Stack(tiny_model, prefill, [decoder], routing={"prefix_aware": False, "local_prefill_threshold_tokens": 0}) as s:
            steps_before = decoder.aengine.num_steps
            outs = await asyncio.gather(*(collect(s.core, p, greedy(MAX_TOKENS)) for p in prompts))
            steps = decoder.aengine.num_steps - steps_before
        for p, (got, _) in zip(prompts, outs):
            assert got == reference.tokens(p, MAX_TOKENS)
        batches = counted.items["feed"]
        tokens = sum(len(c.new_token_ids) for b in batches for c in b.chunks)
        assert tokens == len(prompts) * MAX_TOKENS  # every token, P's first one included, came on the feed
        assert len(batches) <= steps < tokens / 2  # batched per step, not per token
        assert max(len(b.chunks) for b in batches) > 1  # several requests' tokens in one item
        # a request's own call carried no token: the reservation at most
        assert all(not hasattr(item, "new_token_ids") for item in counted.items[method])

    try:
        aio.run(body())
    finally:
        counted.restore()


@pytest.mark.parametrize("layout", ["1P1D", "aggregated"])
def test_a_stream_interval_sends_the_first_token_at_once_then_every_n(aio, shared, tiny_model, reference, layout):
    """``http.stream_interval: 4``: SSE events carry the first token alone, then at least 4 tokens each but the last;
    the text and tokens are the reference's all the same."""
    decoder = shared["d"] if layout == "1P1D" else shared["both"]
    prefill = [shared["p0"]] if layout == "1P1D" else []
    prompt, n = PROMPTS[2], 19

    async def body():
        routing = {"prefix_aware": False, "local_prefill_threshold_tokens": 0}
        async with Stack(tiny_model, prefill, [decoder], routing=routing, http={"stream_interval": 4}) as s, s.client() as c:
            body = completion_body(prompt, n, stream=True, return_token_ids=True)
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            events = [e for e in parse_sse(r.text) if isinstance(e, dict) and e["choices"][0].get("token_ids")]
        sizes = [len(e["choices"][0]["token_ids"]) for e in events]
        assert sizes[0] == 1 and all(k >= 4 for k in sizes[1:-1]) and sum(sizes) == n, sizes
        assert len(events) <= 1 + -(-(n - 1) // 4)
        assert [t for e in events for t in e["choices"][0]["token_ids"]] == reference.tokens(prompt, n)
        assert "".join(e["choices"][0]["text"] for e in events) == reference.text(prompt, n)

    aio.run(body())

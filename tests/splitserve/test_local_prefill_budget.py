"""Short prompts stay on the decode worker (``routing.local_prefill_budget_s``), over real in-process workers.

The budget is a length threshold measured in time: a prompt the decode worker would prefill within it
(its queue included) at the measured cost of a prompt token skips the prefill call and the KV transfer.
Until a worker has measured that cost the prompt goes remote; the tokens are the reference's either way.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.splitserve.conftest import Stack, collect, greedy
from tests.splitserve.router_helpers import MAX_TOKENS, PROMPTS, cold_caches, routed, shared  # noqa: F401 - fixtures

pytestmark = pytest.mark.engine


async def _measured_cost(s: Stack, worker_id: str, timeout_s: float = 10.0) -> float:
    """The prompt cost per token ``worker_id`` reported to the router (after its next load report)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        load = next((w for w in s.core.registry.loads() if w.worker_id == worker_id), None)
        if load is not None and load.prompt_s_per_token > 0:
            return load.prompt_s_per_token
        await asyncio.sleep(0.05)
    raise AssertionError(f"{worker_id} never reported a prompt cost")


def test_short_prompts_prefill_on_the_decode_worker_once_the_cost_is_measured(aio, shared, tiny_model, reference):
    p, d = shared["p0"], shared["d"]
    short, longer = PROMPTS[0], PROMPTS[3]  # 9 and 40 tokens

    async def body():
        routing = {"prefix_aware": False, "local_prefill_budget_s": 1000.0, "load_report_interval_s": 0.1}
        async with Stack(tiny_model, [p], [d], routing=routing) as s:
            assert s.core.router.policy.local_prefill_budget_s == 1000.0  # the config reaches the policy
            p.engine.scheduler.costs.prompt_step_s_per_token = d.engine.scheduler.costs.prompt_step_s_per_token = None  # as if new
            await asyncio.sleep(0.3)  # a report of that
            transfers = p.transfer_bytes
            got, _ = await collect(s.core, short, greedy(MAX_TOKENS))
            assert got == reference.tokens(short, MAX_TOKENS)
            assert routed(s, "prefill-0", "prefill") == 1 and routed(s, "decode-0", "local") == 0  # unmeasured: remote
            assert p.transfer_bytes > transfers
            cost = await _measured_cost(s, "prefill-0")
            # a budget between the two prompts' cost: the short one stays, the longer one goes remote
            s.core.router.policy.local_prefill_budget_s = cost * (len(short) + len(longer)) / 2
            transfers = p.transfer_bytes
            got, _ = await collect(s.core, short, greedy(MAX_TOKENS))
            assert got == reference.tokens(short, MAX_TOKENS)
            assert routed(s, "decode-0", "local") == 1 and p.transfer_bytes == transfers
            got, _ = await collect(s.core, longer, greedy(MAX_TOKENS))
            assert got == reference.tokens(longer, MAX_TOKENS)
            assert routed(s, "prefill-0", "prefill") == 2 and p.transfer_bytes > transfers
            # each of a burst joins the decode worker's queue in the router's view: the budget fills, the rest go remote
            # (the decode worker has now measured its own cost, which the policy prefers)
            s.core.router.policy.local_prefill_budget_s = await _measured_cost(s, "decode-0") * len(short) * 2.5  # room for two
            await asyncio.sleep(0.3)  # the decode worker's queue reported empty again, and its cost as used above
            local, remote = routed(s, "decode-0", "local"), routed(s, "prefill-0", "prefill")
            view = s.core.registry.view
            clock, now = view._clock, view._clock()
            view.update = lambda load: None  # no report lands mid-burst: the view keeps what the router charged,
            view._clock = lambda: now  # and none of it drains (the five picks take well under a millisecond anyway)
            try:
                outs = await asyncio.gather(*(collect(s.core, short, greedy(MAX_TOKENS)) for _ in range(5)))
            finally:
                del view.update
                view._clock = clock
            assert all(got == reference.tokens(short, MAX_TOKENS) for got, _ in outs)
            assert (routed(s, "decode-0", "local") - local, routed(s, "prefill-0", "prefill") - remote) == (2, 3)

    aio.run(body())

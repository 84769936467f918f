"""AsyncEngine streams: a consumer that falls behind gets coalesced chunks, never lost or reordered tokens."""

from __future__ import annotations

import asyncio

import pytest

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from tests.helpers import assert_no_leaks

pytestmark = pytest.mark.engine

PROMPT = list(range(7, 40))
PARAMS = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


async def run(engine: LLMEngine, req_id: str, coalesce: bool, lag_s: float) -> list:
    aengine = AsyncEngine(engine)
    aengine.start()
    try:
        chunks = []
        async for out in aengine.generate(req_id, PROMPT, PARAMS, coalesce=coalesce):
            chunks.append(out)
            if len(chunks) == 1:
                await asyncio.sleep(lag_s)  # fall behind: the engine runs on and queues outputs
        return chunks
    finally:
        await aengine.stop()


@pytest.fixture
def engine(tiny_model):
    e = LLMEngine(EngineConfig(model=tiny_model, dtype="float32", num_kv_blocks=64))
    yield e
    assert_no_leaks(e)


def test_a_lagging_consumer_gets_fewer_larger_chunks_with_the_same_tokens(engine):
    plain = asyncio.run(run(engine, "plain", coalesce=False, lag_s=0.5))
    joined = asyncio.run(run(engine, "joined", coalesce=True, lag_s=0.5))
    assert all(len(c.new_token_ids) == 1 for c in plain) and len(plain) == 24
    assert len(joined) < len(plain), "nothing was coalesced although the consumer lagged"
    assert [t for c in joined for t in c.new_token_ids] == [t for c in plain for t in c.new_token_ids]
    assert "".join(c.new_text for c in joined) == "".join(c.new_text for c in plain)
    assert joined[-1].finished and joined[-1].finish_reason == "length" and joined[-1].token_ids == plain[-1].token_ids
    assert not any(c.finished for c in joined[:-1])


def test_coalescing_with_a_consumer_that_keeps_up_still_delivers_every_token(engine):
    plain = asyncio.run(run(engine, "plain", coalesce=False, lag_s=0.0))
    chunks = asyncio.run(run(engine, "steady", coalesce=True, lag_s=0.0))
    assert [t for c in chunks for t in c.new_token_ids] == [t for c in plain for t in c.new_token_ids]
    assert all(c.new_token_ids for c in chunks) and chunks[-1].finished

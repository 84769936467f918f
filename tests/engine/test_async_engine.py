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


def test_off_the_main_thread_small_steps_leave_a_cpu_to_the_main_thread(monkeypatch):
    """GNU OpenMP counts the (idle) main thread: a step thread's team as large as the CPUs makes it sleep between ops."""
    from splitserve.engine import model_runner

    monkeypatch.setattr(model_runner, "llvm_openmp_loaded", lambda: False)
    monkeypatch.setattr(model_runner.os, "sched_getaffinity", lambda pid: {0, 1})
    assert [model_runner.off_main_thread_threads(n) for n in (1, 2, 4)] == [1, 1, 1]
    monkeypatch.setattr(model_runner.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert [model_runner.off_main_thread_threads(n) for n in (1, 2, 8, 16)] == [1, 2, 8, 15]
    # LLVM's OpenMP runtime keeps its team spinning whatever the count: every CPU works
    monkeypatch.setattr(model_runner, "llvm_openmp_loaded", lambda: True)
    assert [model_runner.off_main_thread_threads(n) for n in (1, 2, 16)] == [1, 2, 16]


def _greedy_ids(engine: LLMEngine, prompt: list[int], max_tokens: int) -> list[int]:
    req_id = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    ids: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.req_id == req_id and out.finished:
                ids = out.token_ids
    return ids


def test_steps_run_on_the_threads_their_size_calls_for(tiny_model):
    """Decode steps use ``small_step_threads``, prefill steps of many tokens ``num_threads``; the output does not change."""
    import threading

    import torch

    prompt = list(range(5, 300))
    engine = LLMEngine(EngineConfig(model=tiny_model, dtype="float32", num_kv_blocks=64, num_threads=2, small_step_threads=1))
    forward, seen = engine.runner.model.forward, []

    def spy(input_ids, *args):
        seen.append((input_ids.shape[0], torch.get_num_threads()))
        return forward(input_ids, *args)

    engine.runner.model.forward = spy
    out: list[list[int]] = []
    step_thread = threading.Thread(target=lambda: out.append(_greedy_ids(engine, prompt, 3)))  # as AsyncEngine steps
    step_thread.start()
    step_thread.join()
    assert seen == [(295, 2), (1, 1), (1, 1)]
    reference = LLMEngine(EngineConfig(model=tiny_model, dtype="float32", num_kv_blocks=64, num_threads=2))
    assert out == [_greedy_ids(reference, prompt, 3)] and len(out[0]) == 3


def test_an_async_engine_sizes_few_token_steps_for_its_step_thread_unless_configured(tiny_model, monkeypatch):
    from splitserve.engine import model_runner

    monkeypatch.setattr(model_runner, "off_main_thread_threads", lambda n: n + 100)  # marks the policy's answer
    sized = LLMEngine(EngineConfig(model=tiny_model, dtype="float32", num_kv_blocks=16, num_threads=2))
    assert sized.runner.small_step_threads == 2  # offline (main thread): every thread
    AsyncEngine(sized)
    assert sized.runner.small_step_threads == 102
    fixed = LLMEngine(EngineConfig(model=tiny_model, dtype="float32", num_kv_blocks=16, num_threads=2, small_step_threads=1))
    AsyncEngine(fixed)
    assert fixed.runner.small_step_threads == 1

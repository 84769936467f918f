"""``engine.warm_up``: a fresh engine measures its step costs before serving and keeps no other trace of it."""

from __future__ import annotations

import pytest

from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.warm_up import warm_up

pytestmark = pytest.mark.engine


def _engine(tiny_model: str, num_kv_blocks: int = 64, **kwargs) -> LLMEngine:
    return LLMEngine(EngineConfig(model=tiny_model, device="cpu", dtype="float32", num_kv_blocks=num_kv_blocks, **kwargs))


def _greedy(engine: LLMEngine, prompt: list[int], n: int = 6) -> list[int]:
    req = engine.add_request(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    while True:
        for out in engine.step():
            if out.req_id == req and out.finished:
                return out.token_ids


def test_warm_up_measures_the_step_costs_and_leaves_no_other_trace(tiny_model):
    engine = _engine(tiny_model)
    assert engine.prompt_s_per_token == 0.0 and engine.scheduler.costs.decode_step_s is None  # unmeasured
    free = engine.pool.num_free_blocks
    warm_up(engine, num_prompt_tokens=32, num_decode_steps=2)
    costs = engine.scheduler.costs
    assert engine.prompt_s_per_token > 0 and costs.decode_step_s > 0 and costs.s_per_prompt_token > 0
    assert not engine.has_unfinished_requests() and engine.pool.num_free_blocks == free
    assert engine.pool.cached_hashes() == frozenset()  # the throwaway prompts are not a cached prefix
    assert (engine.pool.num_prefix_hits, engine.pool.num_prefix_queries, engine.num_step_tokens, engine.busy_s) == (0, 0, 0, 0.0)


def test_greedy_output_is_the_same_with_and_without_warm_up(tiny_model):
    prompt = [5, 17, 99, 3, 250, 41, 7, 8, 9, 10]
    cold = _engine(tiny_model)
    warm = _engine(tiny_model)
    warm_up(warm)
    assert _greedy(warm, prompt) == _greedy(cold, prompt)


def test_warm_up_refuses_a_busy_engine(tiny_model):
    engine = _engine(tiny_model)
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="idle"):
        warm_up(engine)


def test_a_pool_too_small_for_the_warm_up_prompt_gets_a_shorter_one_or_none(tiny_model):
    small = _engine(tiny_model, num_kv_blocks=2, block_size=16)  # room for 32 tokens in all
    warm_up(small, num_prompt_tokens=64)
    assert small.prompt_s_per_token > 0 and small.pool.num_free_blocks == 2
    tiny = _engine(tiny_model, num_kv_blocks=1, block_size=2)  # no room for a prompt and its decode steps
    warm_up(tiny)
    assert tiny.prompt_s_per_token == 0.0 and not tiny.has_unfinished_requests()

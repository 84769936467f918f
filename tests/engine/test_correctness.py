"""Greedy output of the engine equals transformers' ``generate`` token for token.

For checkpoints written by transformers itself: Llama (llama3 rope scaling), Qwen2
(qkv bias, tied embeddings, theta 1e6), Qwen3 (q/k norm, yarn rope, explicit
head_dim) and Mistral (GQA 8:1, sharded), each in the spelling transformers 5
writes and in the 4.x spelling Hub checkpoints carry, 16 prompts of 1 to 2,000
tokens, run: all at once; with chunked prefill forced by a small token budget;
arriving while others decode; and under KV-pool pressure (preemption and recompute).
The reference is transformers' ``generate`` on the transformers-5 directory; a
separate test checks that transformers reads both spellings into the same config.
"""

from __future__ import annotations

import dataclasses
import random
import time

import pytest
import torch

from splitserve import SamplingParams
from splitserve.engine.slo_policy import StepCosts
from tests.helpers import assert_no_leaks, hf_greedy, hf_model

pytestmark = pytest.mark.engine

PROMPT_LENS = [1, 2, 3, 7, 15, 16, 17, 33, 64, 100, 255, 256, 511, 1000, 1500, 2000]
MAX_TOKENS = 8


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(n)] for n in PROMPT_LENS]


def _vocab(path: str) -> int:
    import json
    import os

    return json.load(open(os.path.join(path, "config.json")))["vocab_size"]


GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


ARCHS = ["llama", "qwen2", "qwen3", "mistral"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("spelling", ["v5", "legacy"])
@pytest.mark.parametrize("mode", ["all_at_once", "chunked"])
def test_greedy_matches_transformers(checkpoints, legacy_checkpoints, make_llm, arch, spelling, mode):
    reference = checkpoints[arch]
    path = reference if spelling == "v5" else legacy_checkpoints[arch]
    prompts = _prompts(_vocab(path), seed=len(arch))
    budget = 4096 if mode == "all_at_once" else 96
    llm = make_llm(path, max_num_batched_tokens=budget, num_kv_blocks=1024, enable_prefix_caching=False)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(reference, p, MAX_TOKENS), f"{arch}/{spelling}/{mode}: prompt of {len(p)} tokens diverged"
        assert o.finish_reason == "length"


@pytest.mark.parametrize("arch", ARCHS)
def test_both_spellings_read_alike(checkpoints, legacy_checkpoints, arch):
    """transformers reads the 4.x and 5.x spellings into the same model, and so does the engine."""
    from transformers import AutoConfig

    from splitserve.engine.model_config import ModelConfig

    new, old = AutoConfig.from_pretrained(checkpoints[arch]), AutoConfig.from_pretrained(legacy_checkpoints[arch])
    assert {k: v for k, v in old.rope_parameters.items() if k != "type"} == new.rope_parameters
    assert old.dtype == new.dtype and getattr(old, "sliding_window", None) == getattr(new, "sliding_window", None)
    assert getattr(old, "layer_types", None) == getattr(new, "layer_types", None)
    assert ModelConfig.from_pretrained(legacy_checkpoints[arch]) == ModelConfig.from_pretrained(checkpoints[arch])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("beside_decodes", [None, 24, "slo"])
def test_arrivals_mid_run(checkpoints, make_llm, arch, beside_decodes):
    """Half the prompts start; the rest join one by one while the first ones decode (with ``beside_decodes``,
    a prompt that joins running streams is computed 24 tokens per step, in steps that also decode; with "slo",
    scheduling to latency targets cuts prompts into chunks of varied sizes beside the streams, from fixed costs:
    a stream with n tokens out lets ~8n prompt tokens beside it)."""
    path = checkpoints[arch]
    prompts = _prompts(_vocab(path), seed=7)
    slo = {"slo_ttft_s": 1000.0, "slo_tpot_s": 100.0} if beside_decodes == "slo" else {}
    llm = make_llm(path, max_num_batched_tokens=512, num_kv_blocks=1024,
                   max_prefill_tokens_beside_decodes=None if beside_decodes == "slo" else beside_decodes, **slo)
    engine = llm.engine
    if slo:
        engine.scheduler.targets = dataclasses.replace(engine.scheduler.targets, borrow_fraction=0.0, min_chunk_tokens=1)
        engine.scheduler.costs = FixedCosts(decode_step_s=0.0, s_per_prompt_token=100.0 / 8)
    beside = []  # prompt tokens of each step that also decoded a stream
    schedule = engine.scheduler.schedule

    def recording_schedule(now=None):
        streams = any(s.num_output_tokens > 0 and s.num_uncomputed_tokens == 1 for s in engine.scheduler.running)
        out = schedule(now)
        if streams and out.prefills:
            beside.append(sum(c.num_new_tokens for c in out.prefills))
        return out

    engine.scheduler.schedule = recording_schedule
    ids = [engine.add_request(p, GREEDY) for p in prompts[::2]]
    late = prompts[1::2]
    finals = {}
    steps = 0
    while engine.has_unfinished_requests() or late:
        if late and steps % 2 == 1:
            ids.append(engine.add_request(late.pop(0), GREEDY))
        for out in engine.step():
            if out.finished:
                finals[out.req_id] = out
        steps += 1
    order = prompts[::2] + prompts[1::2]
    for req_id, p in zip(ids, order):
        assert finals[req_id].token_ids == hf_greedy(path, p, MAX_TOKENS), f"prompt of {len(p)} tokens diverged"
    assert_no_leaks(engine)
    assert beside, "no prompt was computed beside running streams"
    if beside_decodes == "slo":
        assert len(set(beside)) > 3 and max(beside) < 512, beside  # chunks of many sizes, none the whole budget
    else:
        assert max(beside) <= (beside_decodes or 512) and (beside_decodes is None) == (max(beside) > 24)


class FixedCosts(StepCosts):
    """Step costs that the engine's timings do not move (the chunk sizes then depend on token counts only)."""

    def __init__(self, decode_step_s: float, s_per_prompt_token: float) -> None:
        super().__init__()
        self.decode_step_s, self.s_per_prompt_token = decode_step_s, s_per_prompt_token

    def observe(self, num_prompt_tokens: int, num_decodes: int, elapsed_s: float) -> None:
        pass


def test_preemption_under_pool_pressure(checkpoints, make_llm):
    """A pool far too small for all requests: sequences are preempted and recomputed, output unchanged."""
    path = checkpoints["llama"]
    rng = random.Random(3)
    prompts = [[rng.randrange(5, _vocab(path)) for _ in range(n)] for n in (40, 70, 90, 120, 33, 64)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    llm = make_llm(path, num_kv_blocks=24, block_size=16, max_num_batched_tokens=256)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert sum(o.metrics.num_preemptions for o in outs) > 0, "the pool was meant to force preemption"
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(path, p, 40)


def test_prefix_cache_hits_keep_outputs_exact(checkpoints, make_llm):
    path = checkpoints["qwen2"]
    rng = random.Random(5)
    shared = [rng.randrange(5, _vocab(path)) for _ in range(300)]
    prompts = [shared + [rng.randrange(5, _vocab(path)) for _ in range(n)] for n in (1, 20, 50)]
    llm = make_llm(path, num_kv_blocks=512)
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    rest = llm.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert first[0].metrics.num_cached_tokens == 0
    assert all(o.metrics.num_cached_tokens >= 288 for o in rest), [o.metrics.num_cached_tokens for o in rest]
    for p, o in zip(prompts, first + rest):
        assert o.token_ids == hf_greedy(path, p, MAX_TOKENS)


def _engine_prompt_logits(llm, prompt: list[int]) -> torch.Tensor:
    engine = llm.engine
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0.0))
    start = time.perf_counter()
    sched = engine.scheduler.schedule()
    logits = engine.runner.execute(sched)
    engine._process(sched, logits, start)
    return logits[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_logits_within_stated_tolerance(checkpoints, make_llm, arch):
    """bf16 error is judged against HF's own bf16 error: ours may be at most 2x HF's (+0.05 logits)."""
    path = checkpoints[arch]
    prompt = _prompts(_vocab(path), seed=11)[12]  # 511 tokens
    ref = hf_model(path, torch.float32)(torch.tensor([prompt])).logits[0, -1].float()
    hf_bf16 = hf_model(path, torch.bfloat16)(torch.tensor([prompt])).logits[0, -1].float()
    ours = _engine_prompt_logits(make_llm(path, dtype="bfloat16"), prompt)
    ours32 = _engine_prompt_logits(make_llm(path, dtype="float32"), prompt)
    hf_err = (hf_bf16 - ref).abs().max().item()
    our_err = (ours - ref).abs().max().item()
    assert (ours32 - ref).abs().max().item() < 1e-3
    assert our_err <= 2 * hf_err + 0.05, f"bf16 max logit error {our_err:.4f} vs transformers' own {hf_err:.4f}"

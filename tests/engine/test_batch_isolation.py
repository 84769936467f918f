"""One bad sequence harms nobody else in its batch (issue 9, finding 1).

Sampling parameters the sampler cannot compute are refused or mapped at the
boundary (``SamplingParams``); as a second wall, a sequence whose sampling,
detokenizing or stop check fails in a step ends alone with finish reason
``"error"``, its blocks freed, while every other sequence of the same batch
produces exactly the tokens it produces without the poisoned neighbour.
"""

from __future__ import annotations

import random

import pytest
import torch

from splitserve import SamplingParams
from splitserve.engine.detokenizer import IncrementalDetokenizer
from splitserve.engine.llm_engine import LLMEngine
from tests.helpers import assert_no_leaks

pytestmark = pytest.mark.engine

VOCAB = 4096


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, VOCAB) for _ in range(n)]


PROMPTS = [prompt(n, seed) for seed, n in enumerate((9, 21, 14, 33))]
POISONED = 1  # index into PROMPTS


def params_for(i: int) -> SamplingParams:
    """Greedy, sampled and seeded rows in one batch: the others must be unaffected whatever their kind."""
    if i % 2 == 0:
        return SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    return SamplingParams(max_tokens=12, temperature=0.8, top_k=50, seed=100 + i, ignore_eos=True)


def run_batch(engine: LLMEngine) -> dict[str, tuple[list[int], str | None]]:
    """Run the whole batch to the end; req id -> (token ids, finish reason)."""
    results: dict[str, tuple[list[int], str | None]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.req_id] = (list(out.token_ids), out.finish_reason)
    return results


@pytest.fixture
def engine(tiny_model, make_llm) -> LLMEngine:
    llm = make_llm(tiny_model, max_model_len=128)
    assert llm.engine.model_config.vocab_size == VOCAB
    return llm.engine


@pytest.fixture
def clean(engine) -> dict[str, tuple[list[int], str | None]]:
    """The batch's outputs with nobody poisoned (the oracle)."""
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, params_for(i), f"r{i}")
    out = run_batch(engine)
    engine.pool.reset_prefix_cache()
    return out


def check_others(engine: LLMEngine, got: dict, clean: dict) -> None:
    assert got[f"r{POISONED}"] == ([], "error")
    for i in range(len(PROMPTS)):
        if i != POISONED:
            assert got[f"r{i}"] == clean[f"r{i}"], f"r{i} changed because its neighbour failed"
    assert_no_leaks(engine)
    assert not engine._seqs and not engine._detok, "the failed sequence is still tracked"


class _BrokenDetokenizer(IncrementalDetokenizer):
    def update(self, token_id: int) -> tuple[str, str | None]:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "poisoned for the test")


def test_a_failing_detokenizer_ends_only_its_sequence(engine, clean):
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, params_for(i), f"r{i}")
    engine._detok[f"r{POISONED}"] = _BrokenDetokenizer(engine.tokenizer)
    check_others(engine, run_batch(engine), clean)


def test_non_finite_logits_fail_only_their_row(engine, clean):
    """A NaN row (what temperature 1e-40 used to produce) is refused before the draw; the rest sample on."""
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, params_for(i), f"r{i}")
    execute = engine.runner.execute

    def poisoned_execute(sched):
        logits = execute(sched).clone()
        rows = [c for c in sched.chunks if c.samples]
        for j, chunk in enumerate(rows):
            if chunk.seq.req_id == f"r{POISONED}":
                logits[j] = float("nan")
        return logits

    engine.runner.execute = poisoned_execute
    check_others(engine, run_batch(engine), clean)


def test_a_failing_stop_check_mid_stream_frees_the_blocks_it_held(engine, clean):
    """The failure comes after several good tokens: the sequence holds blocks by then."""
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, params_for(i), f"r{i}")
    finish_status = engine._finish_status

    def poisoned(seq, token, stop_str):
        if seq.req_id == f"r{POISONED}" and seq.num_output_tokens == 5:
            raise RuntimeError("poisoned stop check")
        return finish_status(seq, token, stop_str)

    engine._finish_status = poisoned
    used_before = None
    results: dict = {}
    while engine.has_unfinished_requests():
        if used_before is None and f"r{POISONED}" in engine._seqs and engine._seqs[f"r{POISONED}"].num_output_tokens == 4:
            used_before = engine.pool.num_used_blocks
        for out in engine.step():
            if out.finished:
                results[out.req_id] = (list(out.token_ids), out.finish_reason)
    assert used_before  # the poisoned sequence was running with blocks when it failed
    check_others(engine, results, clean)


def test_prefill_style_keep_kv_request_that_fails_holds_no_blocks(engine):
    """A prefill worker's request (keep_kv, one token) that fails leaves nothing held for a transfer."""
    good = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=1, temperature=0.0), "good", keep_kv=True)
    bad = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=1, temperature=0.0), "bad", keep_kv=True)
    engine._detok[bad] = _BrokenDetokenizer(engine.tokenizer)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            finals[out.req_id] = out
    assert finals[good].finish_reason == "length" and finals[good].kv_block_ids
    assert finals[bad].finish_reason == "error" and finals[bad].kv_block_ids == []
    assert not engine.release_kv(bad)
    assert engine.release_kv(good)
    assert_no_leaks(engine)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=8, temperature=1e-40, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=1e-320, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=2e-6, top_k=2**63 - 1, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=1e300, top_k=2**62, top_p=1e-300, seed=2**64 + 5, ignore_eos=True),
        SamplingParams(max_tokens=8, temperature=0.7, seed=-(2**63) - 1, ignore_eos=True),
    ],
    ids=["temp_1e-40", "temp_1e-320", "top_k_int64_max", "extremes", "seed_below_int64"],
)
def test_extreme_but_valid_parameters_run_next_to_a_greedy_request(engine, params):
    """The issue's inputs: each finishes normally and its greedy neighbour gets its exact tokens."""
    ref = engine.add_request(PROMPTS[2], params_for(0), "ref")
    alone = run_batch(engine)[ref]
    engine.pool.reset_prefix_cache()
    engine.add_request(PROMPTS[2], params_for(0), "ref2")
    engine.add_request(PROMPTS[3], params, "extreme")
    got = run_batch(engine)
    assert got["ref2"] == alone
    tokens, finish = got["extreme"]
    assert finish == "length" and len(tokens) == 8 and all(0 <= t < VOCAB for t in tokens)
    if params.temperature < 1e-5:  # greedy, as vLLM treats it
        engine.pool.reset_prefix_cache()
        engine.add_request(PROMPTS[3], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), "greedy")
        assert run_batch(engine)["greedy"] == got["extreme"]
    assert_no_leaks(engine)


def test_seeds_outside_64_bits_map_into_the_generator_range():
    assert SamplingParams(seed=2**64).seed == 0
    assert SamplingParams(seed=2**64 + 7).seed == 7
    assert SamplingParams(seed=-1).seed == 2**64 - 1
    assert SamplingParams(seed=-(2**63) - 1).seed == 2**63 - 1
    # in range: unchanged, and what torch itself does with a negative seed
    assert SamplingParams(seed=12345).seed == 12345
    assert torch.Generator().manual_seed(-1).initial_seed() == SamplingParams(seed=-1).seed

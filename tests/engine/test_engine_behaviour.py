"""Engine behaviour on the tiny Llama checkpoint: input validation, stop conditions,
seeds, text, streaming, abort and metrics. ``make_llm`` checks after every test
that no KV block and no request is left behind.
"""

from __future__ import annotations

import random

import pytest

from splitserve import SamplingParams
from splitserve.engine.block_pool import NoFreeBlocks
from tests.helpers import assert_no_leaks

pytestmark = pytest.mark.engine

VOCAB = 4096  # the tiny checkpoint's vocabulary (checked below)
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, VOCAB) for _ in range(n)]


def greedy(max_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


@pytest.fixture
def llm(tiny_model, make_llm):
    llm = make_llm(tiny_model, max_model_len=64)
    assert llm.engine.model_config.vocab_size == VOCAB
    return llm


# ---- validation ---------------------------------------------------------------

BAD_PROMPTS = {
    "empty": ([], r"prompt must not be empty \(got 0 tokens\)"),
    "too_long": ([7] * 64, r"prompt has 64 tokens .* is 64 tokens \(max_model_len\).* at most 63 tokens"),
    "id_eq_vocab": ([5, VOCAB, 6], rf"prompt token ids must be integers in \[0, {VOCAB - 1}\].*got \[{VOCAB}\]"),
    "id_negative": ([5, -1], rf"prompt token ids must be integers in \[0, {VOCAB - 1}\].*got \[-1\]"),
}

BAD_PARAMS = {
    "max_tokens_0": ("max_tokens", 0, r"max_tokens must be an integer >= 1, got 0"),
    "temperature_negative": ("temperature", -0.5, r"temperature must be >= 0 .*got -0.5"),
    "top_p_0": ("top_p", 0.0, r"top_p must be in \(0, 1\], got 0.0"),
    "top_p_1.5": ("top_p", 1.5, r"top_p must be in \(0, 1\], got 1.5"),
    "top_k_-2": ("top_k", -2, r"top_k must be -1 or 0 \(disabled\) or an integer >= 1.*got -2"),
    # issue 9, finding 1: values the sampler cannot compute are refused by name, not crashing a batch
    "temperature_nan": ("temperature", float("nan"), r"temperature must be >= 0 and finite .*got nan"),
    "temperature_inf": ("temperature", float("inf"), r"temperature must be >= 0 and finite .*got inf"),
    "top_p_nan": ("top_p", float("nan"), r"top_p must be in \(0, 1\], got nan"),
    "top_k_2**63": ("top_k", 2**63, r"top_k must be .*at most 2\*\*63-1.*got 9223372036854775808"),
    "max_tokens_huge": ("max_tokens", 10**5000, r"max_tokens must be an integer >= 1, got an integer of 16610 bits"),
    "stream_interval_0": ("stream_interval", 0, r"stream_interval must be an integer >= 1, got 0"),
    "stop_token_ids_2**64": ("stop_token_ids", [2**64], r"stop_token_ids must be non-negative integers below 2\*\*63, got \[an integer of 65 bits\]"),
}


def _count_steps(llm) -> list[int]:
    calls = []
    execute = llm.engine.runner.execute
    llm.engine.runner.execute = lambda sched: calls.append(sched.num_tokens) or execute(sched)
    return calls


@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_bad_prompt_is_rejected_before_anything_runs(llm, case):
    prompt, message = BAD_PROMPTS[case]
    steps = _count_steps(llm)
    with pytest.raises(ValueError, match=message):
        llm.generate([prompt], greedy(), use_tqdm=False)
    with pytest.raises(ValueError, match=message):
        llm.engine.add_request(prompt, greedy())
    assert steps == []
    assert_no_leaks(llm.engine)
    assert llm.generate([[5, 6, 7]], greedy(2), use_tqdm=False)[0].token_ids  # still serving


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_bad_sampling_params_are_rejected(llm, case):
    field, value, message = BAD_PARAMS[case]
    with pytest.raises(ValueError, match=message):
        SamplingParams(**{field: value})
    params = SamplingParams()
    setattr(params, field, value)  # bypasses __post_init__: the engine validates again
    steps = _count_steps(llm)
    with pytest.raises(ValueError, match=message):
        llm.generate([[5, 6, 7]], params, use_tqdm=False)
    assert steps == []
    assert_no_leaks(llm.engine)


def test_stop_token_id_outside_vocab_is_rejected(llm):
    with pytest.raises(ValueError, match=rf"stop_token_ids must be in \[0, {VOCAB - 1}\], got \[{VOCAB}\]"):
        llm.generate([[5, 6]], greedy(stop_token_ids=[VOCAB]), use_tqdm=False)
    with pytest.raises(ValueError, match="stop_token_ids must be non-negative integers"):
        greedy(stop_token_ids=[-1])


def test_one_bad_prompt_in_a_batch_runs_none_of_it(llm):
    steps = _count_steps(llm)
    good = [prompt_ids(20, s) for s in range(3)]
    with pytest.raises(ValueError, match=rf"got \[{VOCAB}\]"):
        llm.generate([good[0], good[1], [3, VOCAB], good[2]], greedy(), use_tqdm=False)
    bad_params = SamplingParams()
    bad_params.top_p = 0.0
    with pytest.raises(ValueError, match="top_p"):
        llm.generate(good, [greedy(), greedy(), bad_params], use_tqdm=False)
    with pytest.raises(ValueError, match="got 3 prompts but 2 sampling params"):
        llm.generate(good, [greedy(), greedy()], use_tqdm=False)
    assert steps == [], "no request of a rejected batch may run"
    assert_no_leaks(llm.engine)
    outs = llm.generate(good, greedy(), use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [16, 16, 16]


def test_prompt_at_the_context_limit_generates_up_to_it(llm):
    out = llm.generate([prompt_ids(62)], greedy(10), use_tqdm=False)[0]
    assert len(out.token_ids) == 2 and out.finish_reason == "length"


# ---- stop conditions ----------------------------------------------------------


def test_max_tokens_finishes_with_length(llm):
    for n in (1, 7):
        out = llm.generate([prompt_ids(10)], greedy(n), use_tqdm=False)[0]
        assert len(out.token_ids) == n and out.finish_reason == "length" and out.outputs[0].stop_reason is None


def _first_fresh_index(tokens: list[int], start: int = 3) -> int:
    """An index >= start whose token does not occur earlier."""
    return next(j for j in range(start, len(tokens)) if tokens.index(tokens[j]) == j)


def test_stop_token_ids_cut_right_after_first_occurrence(llm):
    base = llm.generate([prompt_ids(12, 1)], greedy(16), use_tqdm=False)[0].token_ids
    j = _first_fresh_index(base)
    out = llm.generate([prompt_ids(12, 1)], greedy(16, stop_token_ids=[base[j], VOCAB - 1]), use_tqdm=False)[0]
    assert out.token_ids == base[: j + 1]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == base[j]


def test_eos_stops_unless_ignore_eos(llm):
    mc = llm.engine.model_config
    tok = llm.get_tokenizer()
    assert tok.eos_token_id in mc.eos_token_ids
    prompt = prompt_ids(12, 2)
    base = llm.generate([prompt], greedy(16), use_tqdm=False)[0].token_ids
    j = _first_fresh_index(base)
    mc.eos_token_ids = [base[j]]  # the tiny model practically never emits its real EOS: pretend this token is it
    stopped = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0), use_tqdm=False)[0]
    assert stopped.token_ids == base[: j + 1] and stopped.finish_reason == "stop"
    ignored = llm.generate([prompt], greedy(16), use_tqdm=False)[0]
    assert ignored.token_ids == base and ignored.finish_reason == "length"


def _stop_string(text: str, start: int = 8) -> str:
    """A 3-character ASCII piece of ``text`` first found at or after ``start``."""
    for i in range(start, len(text) - 3):
        s = text[i : i + 3]
        if s.isascii() and s.strip() == s and text.find(s) == i:
            return s
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_string_cuts_text_before_it_or_keeps_it(llm):
    tok = llm.get_tokenizer()
    prompt = prompt_ids(12, 3)
    base = llm.generate([prompt], greedy(24), use_tqdm=False)[0]
    stop = _stop_string(base.text)
    idx = base.text.find(stop)
    out = llm.generate([prompt], greedy(24, stop=[stop, "@@@@never@@@@"]), use_tqdm=False)[0]
    assert out.text == base.text[:idx]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.token_ids == base.token_ids[: len(out.token_ids)]
    assert stop in tok.decode(out.token_ids) and stop not in tok.decode(out.token_ids[:-1]), "must stop at the completing token"
    kept = llm.generate([prompt], greedy(24, stop=stop, include_stop_str_in_output=True), use_tqdm=False)[0]
    assert kept.text == base.text[: idx + len(stop)] and kept.token_ids == out.token_ids


# ---- seeds and text -----------------------------------------------------------


def test_seeded_sampling_reproducible_across_instances_and_batches(tiny_model, make_llm):
    prompt = prompt_ids(9, 4)
    seeded = SamplingParams(max_tokens=16, temperature=1.5, seed=1234, ignore_eos=True)
    a, b = make_llm(tiny_model), make_llm(tiny_model)
    alone = a.generate([prompt], seeded, use_tqdm=False)[0].token_ids
    assert b.generate([prompt], seeded, use_tqdm=False)[0].token_ids == alone
    companions = [prompt_ids(30, 5), prompt, prompt_ids(3, 6), prompt_ids(17, 7)]
    params = [SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True), seeded, greedy(5),
              SamplingParams(max_tokens=16, temperature=0.8, top_k=5, seed=9, ignore_eos=True)]
    assert b.generate(companions, params, use_tqdm=False)[1].token_ids == alone
    assert a.generate(companions[::-1], params[::-1], use_tqdm=False)[2].token_ids == alone
    other_seeds = [SamplingParams(max_tokens=16, temperature=1.5, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    others = [o.token_ids for o in a.generate([prompt] * 3, other_seeds, use_tqdm=False)]
    assert any(o != alone for o in others), "other seeds should give other samples"


def test_text_prompts_are_tokenized_and_text_is_the_decoded_output(llm):
    tok = llm.get_tokenizer()
    prompts = ["Hello world", "The city sits on both banks of a wide river.", "x = y * 2;"]
    outs = llm.generate(prompts, greedy(20), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.prompt == p
        assert o.prompt_token_ids == tok.encode(p)
        assert len(o.token_ids) == 20
        assert o.text == tok.decode(o.token_ids, skip_special_tokens=True)
        assert o.text


# ---- streaming, abort, metrics ------------------------------------------------


def _stream(engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> tuple[dict, dict, dict]:
    texts = {r: "" for r in requests}
    tokens: dict[str, list[int]] = {r: [] for r in requests}
    finals = {}
    for req_id, (prompt, params) in requests.items():
        engine.add_request(prompt, params, req_id)
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.req_id not in finals, "no output after the final one"
            texts[out.req_id] += out.new_text
            tokens[out.req_id] += out.new_token_ids
            if out.finished:
                finals[out.req_id] = out
    return texts, tokens, finals


def test_streaming_deltas_concatenate_to_the_final_output(llm):
    prompt = prompt_ids(12, 3)
    base = llm.generate([prompt], greedy(24), use_tqdm=False)[0]
    stop = _stop_string(base.text)
    requests = {
        "plain": (prompt, greedy(24)),
        "stop": (prompt, greedy(24, stop=[stop])),
        "stop_kept": (prompt, greedy(24, stop=[stop, "zzzzzzzz"], include_stop_str_in_output=True)),
        "other": (prompt_ids(40, 8), greedy(10)),
    }
    texts, tokens, finals = _stream(llm.engine, requests)
    assert finals["plain"].text == base.text
    assert finals["stop"].text == base.text[: base.text.find(stop)]
    for req_id, final in finals.items():
        assert texts[req_id] == final.text, f"{req_id}: streamed text differs from the final text"
        assert tokens[req_id] == final.token_ids


def test_streaming_sends_text_incrementally(llm):
    deltas = []
    llm.engine.add_request(prompt_ids(10, 9), greedy(12), "r")
    while llm.engine.has_unfinished_requests():
        deltas += [(o.new_text, o.new_token_ids) for o in llm.engine.step()]
    assert len(deltas) == 12 and all(len(ids) == 1 for _, ids in deltas)
    assert sum(1 for text, _ in deltas if text) >= 6


def test_abort_mid_run_frees_blocks(tiny_model, make_llm):
    llm = make_llm(tiny_model, max_num_seqs=2)
    engine, pool = llm.engine, llm.engine.pool
    for i, n in enumerate((40, 50, 30)):
        engine.add_request(prompt_ids(n, 10 + i), greedy(30), f"r{i}")
    engine.step()
    engine.step()
    running = {s.req_id: list(s.block_ids) for s in engine.scheduler.running}
    assert set(running) == {"r0", "r1"} and all(running.values())
    used = pool.num_used_blocks
    assert engine.abort_request("r1") is True
    assert pool.num_used_blocks == used - len(running["r1"])
    assert engine.abort_request("r1") is False and engine.abort_request("unknown") is False
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([5, 6], greedy(), "r0")
    seen = []
    while engine.has_unfinished_requests():
        seen += [o.req_id for o in engine.step()]
        if "r2" in seen:
            engine.abort_request("r2")  # right after its first token
    assert "r1" not in seen and seen.count("r2") == 1
    assert_no_leaks(engine)


def test_abort_waiting_request_and_generate_interrupted_cleans_up(tiny_model, make_llm):
    llm = make_llm(tiny_model, max_num_seqs=1)
    engine = llm.engine
    engine.add_request(prompt_ids(20), greedy(4), "a")
    engine.add_request(prompt_ids(20, 1), greedy(4), "b")
    engine.step()
    assert [s.req_id for s in engine.scheduler.waiting] == ["b"]
    assert engine.abort_request("b") is True
    engine.abort_request("a")
    assert_no_leaks(engine)

    def boom(sched):
        raise KeyboardInterrupt

    engine.runner.execute = boom
    with pytest.raises(KeyboardInterrupt):
        llm.generate([prompt_ids(20, 2), prompt_ids(5, 3)], greedy(4), use_tqdm=False)
    assert_no_leaks(engine)


def test_metrics_time_to_first_token_is_positive(llm):
    outs = llm.generate([prompt_ids(30), prompt_ids(5, 1)], greedy(6), use_tqdm=False)
    for o in outs:
        m = o.metrics
        assert m.time_to_first_token is not None and m.time_to_first_token > 0
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.last_token_time <= m.finished_time
        assert m.e2e_latency >= m.time_to_first_token
        assert m.num_preemptions == 0


def test_every_step_second_is_charged_to_the_sequences_in_it(tiny_model, make_llm):
    """Prompts of different lengths batched with decodes: per-request compute adds up to the engine's busy time,
    and a longer prompt (more tokens in the prefill steps) is charged more."""
    llm = make_llm(tiny_model, max_num_batched_tokens=64)  # chunked: prefills share steps with decodes
    busy_before = llm.engine.busy_s
    outs = llm.generate([prompt_ids(150, 1), prompt_ids(4, 2), prompt_ids(40, 3)], greedy(12), use_tqdm=False)
    charged = [o.metrics.compute_s for o in outs]
    assert all(c > 0 for c in charged)
    assert sum(charged) == pytest.approx(llm.engine.busy_s - busy_before, rel=1e-9)
    assert charged[0] > charged[1]


def test_prompt_cost_per_token_averages_only_the_steps_of_prompt_tokens(tiny_model, make_llm):
    """``prompt_s_per_token`` (what the router's local-prefill budget reads): a moving average of step time over
    tokens, taken from steps that computed prompt tokens only; decode steps and mixed steps leave it alone."""
    llm = make_llm(tiny_model, max_num_batched_tokens=64)
    engine = llm.engine
    assert engine.prompt_s_per_token == 0.0  # unmeasured
    steps: list[tuple[int, int, float]] = []
    charge = engine._charge

    def recording(sched, elapsed_s):
        steps.append((sched.num_tokens, len(sched.decodes), elapsed_s))
        charge(sched, elapsed_s)

    engine._charge = recording
    llm.generate([prompt_ids(4, 2), prompt_ids(150, 1)], greedy(6), use_tqdm=False)  # the long prompt chunked beside a decode
    llm.generate([prompt_ids(100, 3)], greedy(2), use_tqdm=False)  # two chunks alone
    expected = 0.0
    for num_tokens, num_decodes, elapsed_s in steps:
        if not num_decodes:
            expected = elapsed_s / num_tokens if not expected else 0.8 * expected + 0.2 * elapsed_s / num_tokens
    assert sum(1 for _, d, _ in steps if not d) >= 3 and any(d and n > d for n, d, _ in steps), steps  # mixed steps ran too
    assert engine.prompt_s_per_token == pytest.approx(expected, rel=1e-12) and expected > 0


def test_reserve_prompt_reuses_cached_leading_blocks_but_never_the_last(make_llm, tiny_model):
    engine = make_llm(tiny_model, num_kv_blocks=12).engine
    bs = engine.block_size
    prompt = list(range(5, 5 + 3 * bs))  # exactly 3 full blocks
    k, blocks = engine.reserve_prompt("a", prompt)
    assert (k, len(blocks)) == (0, 3)  # nothing cached yet
    engine.add_prefilled_request("a", prompt, 7, SamplingParams(max_tokens=1, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    k, blocks = engine.reserve_prompt("b", prompt)
    assert (k, len(blocks)) == (2, 1)  # the last block always comes over the wire
    k2, blocks2 = engine.reserve_prompt("c", prompt + [9] * bs)
    assert (k2, len(blocks2)) == (3, 1)
    with pytest.raises(ValueError, match="already in use"):
        engine.reserve_prompt("b", prompt)
    free = engine.pool.num_free_blocks
    with pytest.raises(NoFreeBlocks):
        engine.reserve_prompt("huge", prompt + list(range(5, 5 + 10 * bs)))
    assert engine.pool.num_free_blocks == free  # the cached blocks it looked up were given back
    assert engine.release_reservation("b") and engine.release_reservation("c")

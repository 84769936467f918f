"""The prefill pacer: the smallest prompt chunk that keeps every queued prompt on course for its deadline."""

from __future__ import annotations

import math
import random

import pytest

from splitserve.engine.prefill_pacer import PrefillPacer

pytestmark = pytest.mark.unit


def measured(deadline_s: float, step_s: float = 0.04, token_s: float = 0.001, min_chunk: int = 32) -> PrefillPacer:
    pacer = PrefillPacer(deadline_s, min_chunk)
    pacer.observe(0, True, step_s)  # a decode-only step
    pacer.observe(1000, False, 1000 * token_s)  # a prompt alone
    return pacer


def finish_times(pacer: PrefillPacer, now: float, prompts: list[tuple[float, int]], chunk: int) -> list[float]:
    """When each prompt's prefill ends with ``chunk``-token steps (the pacer's own cost model)."""
    out, queued = [], 0
    for _, remaining in prompts:
        queued += remaining
        out.append(now + math.ceil(queued / chunk) * pacer.step_s + queued * pacer.token_s)
    return out


def test_nothing_measured_means_no_bound():
    pacer = PrefillPacer(1.5)
    assert pacer.budget(0.0, [(0.0, 1000)], 2048) == 2048
    pacer.observe(0, True, 0.04)  # the step's cost alone is not enough either
    assert pacer.budget(0.0, [(0.0, 1000)], 2048) == 2048


def test_learns_both_costs_from_steps():
    pacer = measured(1.5, step_s=0.04, token_s=0.001)
    assert pacer.step_s == pytest.approx(0.04) and pacer.token_s == pytest.approx(0.001)
    pacer.observe(100, True, 0.04 + 100 * 0.002)  # a chunk beside decodes: the step's own cost comes off
    assert pacer.token_s == pytest.approx(0.8 * 0.001 + 0.2 * 0.002)
    pacer.observe(0, False, 0.5)  # an empty step teaches nothing
    assert pacer.step_s == pytest.approx(0.04)


def test_a_quiet_worker_takes_small_chunks_that_still_meet_the_deadline():
    pacer = measured(1.5, step_s=0.04, token_s=0.001)
    # one 1,000-token prompt that just arrived: 1.0 s of its tokens, 0.5 s left for 12 steps' fixed costs
    chunk = pacer.budget(0.0, [(0.0, 1000)], 2048)
    assert chunk == math.ceil(1000 / 12)
    assert finish_times(pacer, 0.0, [(0.0, 1000)], chunk)[0] <= 1.5
    assert finish_times(pacer, 0.0, [(0.0, 1000)], chunk - 1)[0] > 1.5  # the smallest that makes it


def test_a_late_prompt_takes_the_whole_budget_and_small_work_the_smallest_chunk():
    pacer = measured(1.5, step_s=0.04, token_s=0.001)
    assert pacer.budget(1.0, [(0.0, 1000)], 2048) == 2048  # arrived 1 s ago: 0.5 s left, its tokens alone take 1 s
    assert pacer.budget(0.0, [(0.0, 40)], 2048) == 32  # plenty of time: never below the smallest chunk
    assert pacer.budget(0.0, [(0.0, 1000)], 64) == 64  # capped by the step's budget


def test_every_queued_prompt_counts_in_service_order():
    pacer = measured(1.5, step_s=0.04, token_s=0.001)
    prompts = [(0.0, 500), (0.2, 600)]  # the second's tokens wait behind the first's
    chunk = pacer.budget(0.3, prompts, 4096)
    assert chunk > pacer.budget(0.3, prompts[:1], 4096)
    assert all(t <= arrival + 1.5 for t, (arrival, _) in zip(finish_times(pacer, 0.3, prompts, chunk), prompts))


def test_any_budget_it_gives_meets_every_deadline_it_does_not_call_late():
    rng = random.Random(5)
    for _ in range(2000):
        pacer = measured(rng.uniform(0.2, 5), step_s=rng.uniform(0.005, 0.2), token_s=rng.uniform(1e-5, 3e-3))
        now = rng.uniform(0, 3)
        prompts = sorted((rng.uniform(0, now), rng.randrange(2, 3000)) for _ in range(rng.randrange(1, 5)))
        full = rng.choice([256, 2048, 8192])
        chunk = pacer.budget(now, prompts, full)
        assert 1 <= chunk <= full
        if chunk < full:  # paced: the plan finishes every prompt in time
            ends = finish_times(pacer, now, prompts, chunk)
            assert all(t <= arrival + pacer.deadline_s + 1e-9 for t, (arrival, _) in zip(ends, prompts))

"""Scheduling to latency targets (``engine/slo_policy.py``): the pure rules, then the batch scheduler using them
on a simulated clock (each step costs a fixed time plus a time per prompt token; no model)."""

from __future__ import annotations

import random

import pytest

from splitserve.engine.batch_scheduler import BatchScheduler
from splitserve.engine.block_pool import BlockPool
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.sequence import Sequence, SequenceStatus
from splitserve.engine.slo_policy import (
    LatencyTargets,
    StepCosts,
    may_join_step,
    order_waiting,
    prompt_token_allowance,
    stream_slack_s,
)
from splitserve.tune.workload import LengthDist, Workload

pytestmark = pytest.mark.unit

TARGETS = LatencyTargets(ttft_s=3.0, tpot_s=0.1, starve_after_s=30.0, min_chunk_tokens=8, borrow_fraction=0.0)


def prompt(req_id: str, n: int, arrival: float, priority: int = 0, max_tokens: int = 10) -> Sequence:
    return Sequence(req_id=req_id, token_ids=list(range(1, n + 1)), num_prompt_tokens=n, params=SamplingParams(max_tokens=max_tokens),
                    arrival_time=arrival, priority=priority)


def costs(decode_s: float | None = 0.02, per_token_s: float | None = 0.001) -> StepCosts:
    c = StepCosts()
    c.decode_step_s, c.s_per_prompt_token = decode_s, per_token_s
    return c


def stream(req_id: str, arrival: float, first_token: float, num_out: int, max_tokens: int = 10) -> Sequence:
    seq = prompt(req_id, 4, arrival, max_tokens=max_tokens)
    seq.token_ids += [7] * num_out
    seq.num_computed_tokens = seq.num_tokens - 1
    seq.first_token_time = first_token
    seq.status = SequenceStatus.RUNNING
    return seq


# ---- the pure rules ---------------------------------------------------------------


def test_step_costs_separate_a_decode_step_from_a_prompt_token():
    c = StepCosts(weight=1.0)
    c.observe(0, 0, 5.0)  # an empty step says nothing
    assert c.decode_step_s is None and c.s_per_prompt_token is None
    c.observe(0, 4, 0.03)
    assert c.decode_step_s == pytest.approx(0.03)
    c.observe(1000, 4, 1.03)  # beside decodes: the decode step's share is not a prompt token's cost
    assert c.s_per_prompt_token == pytest.approx(0.001)
    c.observe(500, 0, 1.0)
    assert c.s_per_prompt_token == pytest.approx(0.002)
    c.observe(8, 0, 9.0)  # too few prompt tokens to tell
    assert c.s_per_prompt_token == pytest.approx(0.002)


def test_step_costs_keep_step_time_per_token_of_prompt_only_steps_of_any_size():
    c = StepCosts(weight=0.5)
    c.observe(0, 4, 0.03)  # decodes only, and beside decodes: not a prompt-only step
    c.observe(100, 4, 1.0)
    assert c.prompt_step_s_per_token is None
    c.observe(8, 0, 0.04)  # 5 ms per token, the step's fixed cost included, however few tokens
    assert c.prompt_step_s_per_token == pytest.approx(0.005)
    c.observe(1000, 0, 1.0)
    assert c.prompt_step_s_per_token == pytest.approx(0.5 * 0.005 + 0.5 * 0.001)


def test_on_time_prompts_go_before_late_ones_which_keep_their_order():
    # at t=10 with 1 ms per token, in arrival order: a (arrived 6.5) would end at 11.0 > 9.5: late; b (arrived 8.0,
    # 1000 tokens) at 11.0 <= 11.0; c (arrived 8.5, 600 tokens) after b at 11.6 > 11.5: late; d (100 tokens) at 11.1 <= 12.0
    a, b, c, d = prompt("a", 1000, 6.5), prompt("b", 1000, 8.0), prompt("c", 600, 8.5), prompt("d", 100, 9.0)
    ordered, late = order_waiting([d, c, b, a], 0, 10.0, TARGETS, costs())
    assert [s.req_id for s in ordered] == ["b", "d", "a", "c"]
    assert late == {"a", "c"}
    # 600 running prompt tokens ahead push b past its deadline (11.6), which leaves c room (11.2) and d (11.3)
    ordered, late = order_waiting([a, b, c, d], 600, 10.0, TARGETS, costs())
    assert [s.req_id for s in ordered] == ["c", "d", "a", "b"]
    assert late == {"a", "b"}


def test_priority_and_streamed_sequences_come_before_lateness():
    urgent_late = prompt("urgent", 1000, 0.0, priority=-1)
    on_time = prompt("fresh", 10, 9.9)
    preempted = prompt("preempted", 10, 0.0, priority=5)
    preempted.token_ids.append(3)  # it had streamed a token before it was preempted
    ordered, late = order_waiting([on_time, urgent_late, preempted], 0, 10.0, TARGETS, costs())
    assert [s.req_id for s in ordered] == ["preempted", "urgent", "fresh"]
    assert late == {"urgent"}


def test_a_prompt_that_waited_starve_after_s_takes_its_place_again():
    old = prompt("old", 10, 0.0)
    new = prompt("new", 10, 29.0)
    ordered, late = order_waiting([new, old], 0, 29.5, TARGETS, costs())
    assert [s.req_id for s in ordered] == ["new", "old"] and late == {"old"}
    ordered, late = order_waiting([new, old], 0, 30.5, TARGETS, costs())
    assert [s.req_id for s in ordered] == ["old", "new"] and not late


def test_without_a_measured_token_cost_only_past_deadlines_are_late():
    ordered, late = order_waiting([prompt("a", 5000, 7.1), prompt("b", 10, 6.9)], 0, 10.0, TARGETS, costs(per_token_s=None))
    assert late == {"b"} and ordered[0].req_id == "a"


def test_a_second_prompt_joins_a_step_only_while_every_prompt_in_it_stays_on_time():
    c = costs()
    seq = prompt("b", 500, 9.0)  # deadline 12.0
    assert may_join_step(seq, True, 0, float("inf"), 10.0, TARGETS, c)  # alone, even a late prompt runs
    assert not may_join_step(seq, True, 10, float("inf"), 10.0, TARGETS, c)  # late: never beside another prompt
    assert may_join_step(seq, False, 1000, 11.6, 10.0, TARGETS, c)  # ends at 11.5: both in time
    assert not may_join_step(seq, False, 1000, 11.4, 10.0, TARGETS, c)  # would push the first past 11.4
    assert not may_join_step(prompt("c", 500, 8.0), False, 1000, 20.0, 10.0, TARGETS, c)  # would miss its own 11.0


def test_a_streams_slack_is_how_far_it_runs_ahead_of_its_pace():
    # first token at 1.0, now 2.0, 20 tokens out (19 gaps in 1.0 s against 0.1 s each): 2.0 - 1.0 - 0.02 ahead of pace
    seq = stream("s", 0.0, 1.0, 20, max_tokens=100)
    assert stream_slack_s(seq, 2.0, TARGETS, 0.02) == pytest.approx(0.98)
    borrowing = LatencyTargets(3.0, 0.1, borrow_fraction=0.5)
    assert stream_slack_s(seq, 2.0, borrowing, 0.02) == pytest.approx(0.98 + 0.5 * 0.08 * 64)  # over 64 of its 79 gaps left
    # a near-endless max_tokens borrows over the horizon only (it would otherwise never restrain a prompt)
    endless = stream("endless", 0.0, 1.0, 20, max_tokens=100_000)
    assert stream_slack_s(endless, 2.0, borrowing, 0.02) == pytest.approx(0.98 + 0.5 * 0.08 * 64)
    assert stream_slack_s(stream("ending", 0.0, 1.0, 20, max_tokens=21), 2.0, borrowing, 0.02) == pytest.approx(0.98)
    assert stream_slack_s(stream("late", 0.0, 3.5, 5), 4.0, TARGETS, 0.02) is None  # its first token missed the TTFT
    # 40 s since the first token with 80 tokens left: cannot average 0.1 s any more even with no prompt beside it
    assert stream_slack_s(stream("lost", 0.0, 1.0, 20, max_tokens=100), 41.0, TARGETS, 0.02) is None


def test_prompt_tokens_beside_streams_are_limited_by_the_tightest_stream():
    c = costs(decode_s=0.02, per_token_s=0.001)
    roomy = stream("roomy", 0.0, 1.0, 20, max_tokens=100)  # 0.98 s ahead
    tight = stream("tight", 0.0, 1.5, 8, max_tokens=100)  # 0.8 - 0.5 - 0.02 = 0.28 s ahead
    assert prompt_token_allowance([roomy, tight], 2.0, TARGETS, c) == 280
    assert prompt_token_allowance([roomy], 2.0, TARGETS, c) == 980
    behind = stream("behind", 0.0, 1.0, 5, max_tokens=100)  # 0.5 - 1.0 - 0.02 < 0, yet it can still catch up
    assert prompt_token_allowance([roomy, behind], 2.0, TARGETS, c) == 0
    just_started = stream("new", 0.0, 1.999, 1, max_tokens=100)  # 0.1 - 0.001 - 0.02 = 0.079 s: 79 tokens
    assert prompt_token_allowance([roomy, just_started], 2.0, TARGETS, c) == 79
    assert prompt_token_allowance([just_started], 2.0, LatencyTargets(3.0, 0.1, min_chunk_tokens=100, borrow_fraction=0.0), c) == 0
    lost = stream("lost", 0.0, 3.5, 20)  # late first token: it restrains nothing
    assert prompt_token_allowance([lost], 4.0, TARGETS, c) is None
    assert prompt_token_allowance([roomy], 2.0, TARGETS, costs(per_token_s=None)) is None  # nothing measured yet


# ---- the batch scheduler on a simulated clock ----------------------------------------

STEP_S, TOKEN_S = 0.02, 0.001  # a step's fixed cost and a prompt token's


def simulate(targets: LatencyTargets | None, arrivals: list[tuple[float, int, int]], *, budget: int = 2048, num_blocks: int = 4096,
             max_steps: int = 200_000) -> list[Sequence]:
    """Runs the scheduler over ``(arrival s, prompt tokens, max_tokens)`` on a clock advanced by each step's cost."""
    sched = BatchScheduler(BlockPool(num_blocks, 16, False), budget, 64, None, targets)
    sched.costs.decode_step_s, sched.costs.s_per_prompt_token = STEP_S, TOKEN_S
    seqs = [prompt(f"r{i}", n, t, max_tokens=m) for i, (t, n, m) in enumerate(arrivals)]
    now, pending = 0.0, list(seqs)
    for _ in range(max_steps):
        while pending and pending[0].arrival_time <= now:
            sched.add(pending.pop(0))
        if not sched.num_unfinished:
            if not pending:
                return seqs
            now = pending[0].arrival_time
            continue
        out = sched.schedule(now)
        assert not out.is_empty, "work waits but the step is empty"
        now += STEP_S + TOKEN_S * sum(c.num_new_tokens for c in out.prefills)
        for chunk in out.chunks:
            samples = chunk.samples
            sched.advance(chunk)
            if samples:
                chunk.seq.token_ids.append(7)
                chunk.seq.first_token_time = chunk.seq.first_token_time or now
                if chunk.seq.num_output_tokens >= chunk.seq.params.max_tokens:
                    chunk.seq.finished_time = now
                    sched.finish(chunk.seq, SequenceStatus.FINISHED_LENGTH)
    raise AssertionError("the workload did not drain")


def goodput(seqs: list[Sequence], targets: LatencyTargets) -> int:
    def good(s: Sequence) -> bool:
        tpot = (s.finished_time - s.first_token_time) / max(s.num_output_tokens - 1, 1)
        return s.first_token_time - s.arrival_time <= targets.ttft_s and tpot <= targets.tpot_s
    return sum(map(good, seqs))


def poisson(rate: float, n: int, seed: int, prompt_len: int = 1000, max_tokens: int = 64) -> list[tuple[float, int, int]]:
    workload = Workload("fixed", LengthDist("fixed", prompt_len), LengthDist("fixed", max_tokens), seed=seed)
    return [(spec.arrival_s, spec.prompt_len, spec.output_len) for spec in workload.requests(rate, n)]


def test_overload_first_come_first_served_meets_few_targets_and_the_targets_rules_meet_many():
    targets = LatencyTargets(ttft_s=3.0, tpot_s=0.1)
    arrivals = poisson(1.6, 60, seed=3)  # prefill alone needs 1.6 s of every second
    fcfs = goodput(simulate(None, arrivals), targets)
    scheduled = goodput(simulate(targets, arrivals), targets)
    assert fcfs <= 6, fcfs
    assert scheduled >= 3 * max(fcfs, 5), (scheduled, fcfs)


def test_at_light_load_the_rules_change_nothing_that_matters():
    targets = LatencyTargets(ttft_s=3.0, tpot_s=0.1)
    arrivals = poisson(0.2, 30, seed=4)
    fcfs, scheduled = simulate(None, arrivals), simulate(targets, arrivals)
    assert goodput(fcfs, targets) == goodput(scheduled, targets) == 30


@pytest.mark.parametrize("seed", range(4))
def test_every_request_finishes_and_none_waits_much_longer_than_under_fcfs(seed):
    rng = random.Random(seed)
    targets = LatencyTargets(ttft_s=1.0, tpot_s=0.05, starve_after_s=5.0)
    arrivals = sorted((rng.uniform(0, 20), rng.randrange(1, 1500), rng.randrange(1, 40)) for _ in range(80))
    budget, num_blocks = rng.choice([256, 2048]), rng.choice([200, 4096])
    seqs = simulate(targets, arrivals, budget=budget, num_blocks=num_blocks)
    fcfs = simulate(None, arrivals, budget=budget, num_blocks=num_blocks)
    assert all(s.status is SequenceStatus.FINISHED_LENGTH for s in seqs)
    wait = lambda ss: max(s.first_token_time - s.arrival_time for s in ss)  # noqa: E731
    # overloaded throughout (3x what it can prefill): FCFS's longest wait is the backlog; a late prompt waits at most
    # starve_after_s longer than that before it takes its arrival-order place again
    assert wait(seqs) <= wait(fcfs) + targets.starve_after_s

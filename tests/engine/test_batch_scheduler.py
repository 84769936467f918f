"""BatchScheduler as pure logic: a BlockPool, hand-made Sequences, no model.

``run_step`` plays the engine's part: schedule, count the computed tokens, append
a token to each sequence that samples, finish sequences that reached max_tokens.
"""

from __future__ import annotations

import math
import random
import zlib

import pytest

from splitserve.engine.batch_scheduler import BatchScheduler, SchedulerOutput
from splitserve.engine.block_pool import BlockPool, compute_block_hashes
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.sequence import Sequence, SequenceStatus

pytestmark = pytest.mark.unit

BS = 4
SAMPLED = 42  # the token every sampling step appends


def make_seq(req_id: str, num_prompt_tokens: int = 0, *, tokens: list[int] | None = None, priority: int = 0, max_tokens: int = 100) -> Sequence:
    base = 1000 * (1 + zlib.crc32(req_id.encode()) % 1000)  # distinct, deterministic tokens per name: no accidental prefix hits
    token_ids = list(tokens) if tokens is not None else [base + i for i in range(num_prompt_tokens)]
    return Sequence(req_id=req_id, token_ids=token_ids, num_prompt_tokens=len(token_ids), params=SamplingParams(max_tokens=max_tokens), priority=priority)


def make_scheduler(
    num_blocks: int = 64, budget: int = 64, max_num_seqs: int = 16, prefix_caching: bool = True, beside_decodes: int | None = None,
) -> BatchScheduler:
    return BatchScheduler(BlockPool(num_blocks, BS, prefix_caching), max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                          max_prefill_tokens_beside_decodes=beside_decodes)


def run_step(sched: BatchScheduler) -> SchedulerOutput:
    out = sched.schedule()
    assert out.num_tokens <= sched.max_num_batched_tokens
    assert len(sched.running) <= sched.max_num_seqs
    sampling = [c.seq for c in out.chunks if c.samples]
    for chunk in out.chunks:
        sched.advance(chunk)
    for seq in sampling:
        seq.token_ids.append(SAMPLED)
        if seq.num_output_tokens >= seq.params.max_tokens:
            sched.finish(seq, SequenceStatus.FINISHED_LENGTH)
    check_invariants(sched)
    return out


def check_invariants(sched: BatchScheduler) -> None:
    pool = sched.pool
    held: dict[int, int] = {}
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(seq.block_ids) >= math.ceil(seq.num_computed_tokens / BS), f"{seq.req_id} lost blocks"
        for b in seq.block_ids:
            held[b] = held.get(b, 0) + 1
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING
        for b in seq.block_ids:
            held[b] = held.get(b, 0) + 1
    assert all(pool.ref_count(b) == n for b, n in held.items()), "ref counts disagree with the sequences' block tables"
    assert pool.num_used_blocks == len(held), "a block is referenced by no sequence (leak)"


def scheduled(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(c.seq.req_id, c.num_new_tokens) for c in out.chunks]


def test_token_budget_is_respected():
    sched = make_scheduler(budget=16)
    for name in "abc":
        sched.add(make_seq(name, 10))
    assert scheduled(run_step(sched)) == [("a", 10), ("b", 6)]
    assert [s.req_id for s in sched.waiting] == ["c"]
    out = run_step(sched)
    assert scheduled(out) == [("a", 1), ("b", 4), ("c", 10)]
    assert out.num_tokens == 15


def test_long_prompt_is_chunked_across_steps():
    sched = make_scheduler(budget=16)
    seq = make_seq("long", 50)
    sched.add(seq)
    sizes, samples = [], []
    for _ in range(4):
        out = sched.schedule()
        [chunk] = out.prefills if out.prefills else out.decodes
        sizes.append(chunk.num_new_tokens)
        samples.append(chunk.samples)  # read before advance(): it compares against num_computed_tokens
        sched.advance(chunk)
        if samples[-1]:
            seq.token_ids.append(SAMPLED)
    assert sizes == [16, 16, 16, 2] and samples == [False, False, False, True]
    assert seq.num_computed_tokens == 50 and seq.num_output_tokens == 1
    out = run_step(sched)
    assert [(c.seq.req_id, c.num_new_tokens) for c in out.decodes] == [("long", 1)] and not out.prefills


def test_queued_prompt_tokens_count_what_is_left_of_a_prompt_being_chunked():
    """The load report's queue: a long prompt's remaining chunks are still work ahead of a newcomer. Counting only
    the waiting sequences made a prefill worker mid-way through an 8,000-token prompt look idle, so a 4-token request
    was sent to wait behind it (an outsider's test: 26 s for 4 tokens)."""
    sched = make_scheduler(budget=16)
    long, decoding = make_seq("long", 50), make_seq("decoding", 3)
    sched.add(decoding)
    run_step(sched)  # prefilled: from now on it decodes (one uncomputed token at a time)
    sched.add(long)
    assert sched.num_queued_prompt_tokens() == 50
    for left in (35, 20):  # the decode takes one token of each step's budget of 16
        run_step(sched)
        assert sched.num_queued_prompt_tokens() == left
    sched.add(make_seq("next", 7))
    assert sched.num_queued_prompt_tokens() == 20 + 7


def test_decodes_are_scheduled_before_new_prefills():
    sched = make_scheduler(budget=8)
    sched.add(make_seq("a", 5))
    sched.add(make_seq("b", 3))
    run_step(sched)
    sched.add(make_seq("new", 20))
    out = run_step(sched)
    assert [c.seq.req_id for c in out.decodes] == ["a", "b"]
    assert [(c.seq.req_id, c.num_new_tokens) for c in out.prefills] == [("new", 6)]
    assert [c.seq.req_id for c in out.chunks] == ["a", "b", "new"]
    # a budget that only fits the decodes admits nothing new
    sched2 = make_scheduler(budget=2)
    sched2.add(make_seq("a", 2))
    run_step(sched2)
    sched2.add(make_seq("b", 1))
    run_step(sched2)  # a decodes, b prefills its single token
    sched2.add(make_seq("c", 4))
    out = run_step(sched2)
    assert scheduled(out) == [("a", 1), ("b", 1)] and [s.req_id for s in sched2.waiting] == ["c"]


def test_prompts_beside_decodes_take_at_most_their_share():
    sched = make_scheduler(budget=64, beside_decodes=8)
    sched.add(make_seq("alone", 30))
    assert scheduled(run_step(sched)) == [("alone", 30)]  # no stream decodes: the whole budget
    sched.add(make_seq("p1", 20))
    sched.add(make_seq("p2", 20))
    assert scheduled(run_step(sched)) == [("alone", 1), ("p1", 8)]  # one stream decodes: prompts share 8 tokens
    assert scheduled(run_step(sched)) == [("alone", 1), ("p1", 8)]  # the running chunk first; p2 waits
    assert scheduled(run_step(sched)) == [("alone", 1), ("p1", 4), ("p2", 4)]
    sched.finish(sched.running[0], SequenceStatus.FINISHED_ABORTED)
    sched.finish(sched.running[0], SequenceStatus.FINISHED_ABORTED)
    assert scheduled(run_step(sched)) == [("p2", 16)]  # the streams ended: the rest of the prompt in one step


def test_prompts_beside_decodes_never_starve_and_the_budget_still_holds():
    rng = random.Random(7)
    sched = make_scheduler(num_blocks=40, budget=12, max_num_seqs=6, beside_decodes=3)
    seqs = [make_seq(f"s{i}", rng.randrange(1, 30), max_tokens=rng.randrange(1, 12)) for i in range(20)]
    for seq in seqs:
        sched.add(seq)
    for _ in range(1000):
        if not sched.num_unfinished:
            break
        streams_decoding = any(s.num_output_tokens > 0 and s.num_uncomputed_tokens == 1 for s in sched.running)
        out = run_step(sched)
        if streams_decoding:
            assert sum(c.num_new_tokens for c in out.prefills) <= 3
    assert not sched.num_unfinished and all(s.num_output_tokens == s.params.max_tokens for s in seqs)


def test_max_num_seqs_caps_the_running_set():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(f"s{i}", 3, max_tokens=2 + i) for i in range(4)]
    for s in seqs:
        sched.add(s)
    assert [c.seq.req_id for c in run_step(sched).chunks] == ["s0", "s1"]
    assert [c.seq.req_id for c in run_step(sched).chunks] == ["s0", "s1"]  # s0 finishes (2 tokens)
    assert seqs[0].status is SequenceStatus.FINISHED_LENGTH and not seqs[0].block_ids
    assert [c.seq.req_id for c in run_step(sched).chunks] == ["s1", "s2"]


def test_full_pool_makes_requests_wait_without_crashing():
    sched = make_scheduler(num_blocks=4, prefix_caching=False)
    a, b = make_seq("a", 12, max_tokens=3), make_seq("b", 8)
    sched.add(a)
    sched.add(b)
    assert scheduled(run_step(sched)) == [("a", 12)]  # b needs 2 blocks, 1 is free
    assert b.status is SequenceStatus.WAITING and b.block_ids == [] and b.num_computed_tokens == 0
    assert scheduled(run_step(sched)) == [("a", 1)]  # a takes the last block
    assert sched.pool.num_free_blocks == 0 and list(sched.waiting) == [b]
    run_step(sched)
    assert a.is_finished and sched.pool.num_free_blocks == 4
    assert scheduled(run_step(sched)) == [("b", 8)]


def test_running_sequence_needing_a_block_preempts_the_most_recent():
    sched = make_scheduler(num_blocks=6, prefix_caching=False)
    a, b, c, d = (make_seq(n, 8) for n in "abcd")
    for s in (a, b, c, d):
        sched.add(s)
    assert scheduled(run_step(sched)) == [("a", 8), ("b", 8), ("c", 8)]  # d waits: the pool is full
    c_blocks = list(c.block_ids)
    out = run_step(sched)  # every sequence now has 9 tokens and needs a third block
    assert out.preempted == [c]
    assert scheduled(out) == [("a", 1), ("b", 1)]
    assert c.status is SequenceStatus.WAITING and c.block_ids == [] and c.num_computed_tokens == 0
    assert c.num_preemptions == 1 and c.num_tokens == 9  # keeps its sampled token, recomputed later
    assert list(sched.waiting) == [c, d], "the preempted sequence goes to the front of the queue"
    assert all(sched.pool.ref_count(blk) == 1 for blk in c_blocks)  # now owned by a and b
    assert sorted(a.block_ids[2:] + b.block_ids[2:]) == sorted(c_blocks)


def test_last_sequence_that_cannot_grow_preempts_itself():
    sched = make_scheduler(num_blocks=5, prefix_caching=False)
    a, b = make_seq("a", 7), make_seq("b", 12)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    out = run_step(sched)  # a (8 tokens) fits its 2 blocks; b (13 tokens) needs a 4th
    assert out.preempted == [b] and scheduled(out) == [("a", 1)]
    assert sched.running == [a] and list(sched.waiting) == [b] and sched.pool.num_free_blocks == 3


def test_priority_orders_the_waiting_queue():
    sched = make_scheduler(num_blocks=1)  # nothing fits: only the queue order is observed
    for name, prio in [("a", 0), ("b", 5), ("c", 1), ("d", 5), ("e", -1), ("f", 0), ("g", -1)]:
        sched.add(make_seq(name, 10, priority=prio))
    assert [s.req_id for s in sched.waiting] == ["e", "g", "a", "f", "c", "b", "d"]  # lower value first


def test_admission_follows_priority():
    sched = make_scheduler(budget=8)
    for name, prio in [("low", 2), ("high", 0), ("mid", 1)]:
        sched.add(make_seq(name, 4, priority=prio))
    assert scheduled(run_step(sched)) == [("high", 4), ("mid", 4)]


def _run_to_finish(sched: BatchScheduler, seq: Sequence, max_steps: int = 50) -> None:
    sched.add(seq)
    for _ in range(max_steps):
        if seq.is_finished:
            return
        run_step(sched)
    raise AssertionError(f"{seq.req_id} did not finish")


def test_prefix_reuse_on_admission_leaves_a_token_to_compute():
    sched = make_scheduler()
    prompt = list(range(8))
    first = make_seq("first", tokens=prompt, max_tokens=1)
    _run_to_finish(sched, first)
    assert sched.pool.num_used_blocks == 0 and len(sched.pool.cached_hashes()) == 2

    same = make_seq("same", tokens=prompt)  # fully cached prompt: the last block is recomputed
    sched.add(same)
    out = run_step(sched)
    assert scheduled(out) == [("same", 4)] and same.num_cached_tokens == 4
    assert same.num_computed_tokens == 8 and same.num_output_tokens == 1

    longer = make_seq("longer", tokens=prompt + [99])  # both blocks cached, one new token
    sched.add(longer)
    out = run_step(sched)
    assert ("longer", 1) in scheduled(out) and longer.num_cached_tokens == 8
    assert longer.block_ids[0] == same.block_ids[0] and sched.pool.ref_count(longer.block_ids[0]) == 2

    one_block = make_seq("one_block", tokens=prompt[:4])
    sched.add(one_block)
    run_step(sched)
    assert one_block.num_cached_tokens == 0 and one_block.num_output_tokens == 1


def test_no_prefix_reuse_when_caching_is_disabled():
    sched = make_scheduler(prefix_caching=False)
    _run_to_finish(sched, make_seq("first", tokens=list(range(9)), max_tokens=1))
    again = make_seq("again", tokens=list(range(9)))
    sched.add(again)
    assert scheduled(run_step(sched)) == [("again", 9)] and again.num_cached_tokens == 0


def test_finishing_frees_every_block_and_waiting_holds_none():
    sched = make_scheduler(num_blocks=5)
    prefix = list(range(8))
    _run_to_finish(sched, make_seq("x", tokens=prefix, max_tokens=1))
    r = make_seq("r", 10)
    sched.add(r)
    run_step(sched)
    w = make_seq("w", tokens=prefix + list(range(50, 58)))  # 2 cached blocks + 2 new ones, none free
    sched.add(w)
    run_step(sched)
    assert w.status is SequenceStatus.WAITING and w.block_ids == [] and w.num_computed_tokens == 0
    assert sched.pool.cached_prefix_len(compute_block_hashes(prefix, BS)) == 2, "the looked-up prefix stays cached"
    sched.finish(w, SequenceStatus.FINISHED_ABORTED)
    assert r.block_ids and sched.pool.num_used_blocks == len(r.block_ids)
    sched.finish(r, SequenceStatus.FINISHED_ABORTED)
    assert r.block_ids == [] and sched.pool.num_free_blocks == 5 and sched.num_unfinished == 0


def test_waiting_prefix_hits_cannot_deadlock_a_preempted_sequence():
    """A waiting request holding cached-prefix blocks must not starve the sequence preempted in front of it."""
    sched = make_scheduler(num_blocks=5)
    prefix = list(range(8))
    _run_to_finish(sched, make_seq("x", tokens=prefix, max_tokens=1))
    r = make_seq("r", 10, max_tokens=8)  # grows to 18 tokens: 5 blocks, the whole pool
    w = make_seq("w", tokens=prefix + list(range(50, 58)), max_tokens=2)
    sched.add(r)
    run_step(sched)
    sched.add(w)
    for _ in range(60):
        if not sched.num_unfinished:
            break
        run_step(sched)
    assert r.is_finished and w.is_finished, f"stuck: waiting={[s.req_id for s in sched.waiting]}, running={[s.req_id for s in sched.running]}"
    assert sched.pool.num_free_blocks == 5


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_random_workload_on_a_tiny_pool_always_completes(seed, prefix_caching):
    rng = random.Random(seed)
    sched = make_scheduler(num_blocks=10, budget=rng.choice([5, 16, 64]), max_num_seqs=rng.choice([2, 4, 8]), prefix_caching=prefix_caching,
                           beside_decodes=rng.choice([None, 1, 3]))
    shared = [rng.randrange(100) for _ in range(8)]
    seqs = []
    for i in range(24):
        n = rng.randrange(1, 20)
        tokens = (shared[: rng.choice([0, 4, 8])] + [rng.randrange(100) for _ in range(n)])[:20]
        seqs.append(make_seq(f"s{i}", tokens=tokens, priority=rng.choice([0, 0, 1, -1]), max_tokens=rng.randrange(1, 18)))
    pending = list(seqs)
    for step in range(2000):
        if pending and rng.random() < 0.5:
            sched.add(pending.pop(0))
        if step % 37 == 5 and sched.running:  # an abort now and then
            sched.finish(rng.choice(sched.running), SequenceStatus.FINISHED_ABORTED)
        if not pending and not sched.num_unfinished:
            break
        run_step(sched)
    assert not pending and not sched.num_unfinished, "the workload did not drain"
    assert sched.pool.num_free_blocks == sched.pool.num_blocks
    for s in seqs:
        assert s.status in (SequenceStatus.FINISHED_LENGTH, SequenceStatus.FINISHED_ABORTED)
        if s.status is SequenceStatus.FINISHED_LENGTH:
            assert s.num_output_tokens == s.params.max_tokens

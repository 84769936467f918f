"""LoadView: updates, optimistic reservations that spread a burst, health and staleness."""

from __future__ import annotations

from collections import Counter

import pytest

from splitserve.scheduler import (
    LeastLoadedPolicy,
    LoadView,
    NoWorkerAvailable,
    PairRequest,
    WorkerLoad,
    WorkerRole,
)

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def load(worker_id: str, role: WorkerRole = WorkerRole.DECODE, **kw) -> WorkerLoad:
    fields = dict(num_waiting=0, num_running=0, num_free_blocks=100, num_total_blocks=100, block_size=16)
    fields.update(kw)
    return WorkerLoad(worker_id=worker_id, role=role, **fields)


def req(i: int, n: int = 100, **kw) -> PairRequest:
    return PairRequest(req_id=f"r{i}", num_prompt_tokens=n, max_tokens=16, **kw)


def make_view(*loads: WorkerLoad, clock: FakeClock | None = None, max_age_s: float = 5.0) -> LoadView:
    view = LoadView(max_age_s=max_age_s, clock=clock or FakeClock())
    for item in loads:
        view.update(item)
    return view


def test_snapshot_is_sorted_copies_stamped_with_view_clock():
    clock = FakeClock(42.0)
    view = make_view(load("d1", updated_at=9999.0), load("d0"), clock=clock)
    snap = view.snapshot()
    assert [w.worker_id for w in snap] == ["d0", "d1"]
    assert all(w.updated_at == 42.0 for w in snap)
    snap[0].num_free_blocks = 0
    assert view.get("d0").num_free_blocks == 100
    assert len(view) == 2 and "d0" in view and "x" not in view


def test_burst_of_ten_spreads_across_two_decode_workers():
    view = make_view(load("d0"), load("d1"), load("p0", WorkerRole.PREFILL), load("p1", WorkerRole.PREFILL))
    policy = LeastLoadedPolicy()
    decode_counts: Counter[str] = Counter()
    prefill_counts: Counter[str] = Counter()
    for i in range(10):
        decision = policy.pick(req(i), view.snapshot())
        view.reserve_decision(decision, req(i))
        decode_counts[decision.decode_worker_id] += 1
        prefill_counts[decision.prefill_worker_id] += 1
    assert decode_counts == {"d0": 5, "d1": 5}
    assert prefill_counts == {"p0": 5, "p1": 5}
    assert view.get("d0").num_free_blocks == 100 - 5 * 7 and view.get("d0").num_waiting == 5
    assert view.get("p0").num_queued_tokens == 500


def test_without_reserve_a_burst_lands_on_one_worker():
    view = make_view(load("d0"), load("d1"))
    picks = {LeastLoadedPolicy().pick(req(i), view.snapshot()).decode_worker_id for i in range(10)}
    assert picks == {"d0"}


def test_reserve_then_fresh_report_replaces_optimistic_figures():
    view = make_view(load("d0"))
    view.reserve("d0", num_blocks=30, num_tokens=200)
    got = view.get("d0")
    assert (got.num_free_blocks, got.num_queued_tokens, got.num_waiting) == (70, 200, 1)
    view.reserve("d0", num_blocks=500, num_tokens=0)
    assert view.get("d0").num_free_blocks == 0
    view.update(load("d0", num_free_blocks=64, num_running=2))
    got = view.get("d0")
    assert (got.num_free_blocks, got.num_queued_tokens, got.num_waiting) == (64, 0, 0)


def test_charged_prompt_tokens_drain_at_the_workers_measured_cost():
    clock = FakeClock()
    view = make_view(load("d0", prompt_s_per_token=1e-3, num_queued_tokens=7), load("p0", WorkerRole.PREFILL), clock=clock)
    view.reserve("d0", num_blocks=2, num_tokens=100)
    assert view.get("d0").num_queued_tokens == 107  # the reported queue + the charge
    clock.now += 0.03  # 30 ms at 1 ms per token: 30 of the 100 prefilled
    assert view.get("d0").num_queued_tokens == 7 + 70
    view.reserve("d0", num_blocks=2, num_tokens=50)  # a burst piles up on what is left
    assert view.get("d0").num_queued_tokens == 7 + 120
    clock.now += 1.0
    got = view.get("d0")
    assert (got.num_queued_tokens, got.num_waiting, got.num_free_blocks) == (7, 2, 96)  # the reported queue never drains
    # a worker that measured nothing drains at the slowest cost another worker reported (one model everywhere) ...
    view.reserve("p0", num_blocks=0, num_tokens=100)
    clock.now += 0.05
    assert view.get("p0").num_queued_tokens == 50
    # ... and with no measurement anywhere, the charge stays until the worker's next report
    view = make_view(load("d0"), clock=clock)
    view.reserve("d0", num_blocks=0, num_tokens=100)
    clock.now += 60
    assert view.get("d0").num_queued_tokens == 100
    view.update(load("d0", num_queued_tokens=3))
    assert view.get("d0").num_queued_tokens == 3


def test_reserve_unknown_worker_raises():
    with pytest.raises(KeyError, match="unknown worker 'ghost'"):
        make_view(load("d0")).reserve("ghost", 1, 1)


def test_reserve_decision_local_prefill_charges_uncached_tokens_to_decode():
    hashes = [1, 2, 3]
    view = make_view(load("d0", prefix_hashes=frozenset(hashes[:2])))
    policy = LeastLoadedPolicy(local_prefill_threshold_tokens=100)
    decision = policy.pick(req(0, 50, block_hashes=hashes), view.snapshot())
    assert decision.prefill_worker_id is None
    view.reserve_decision(decision, req(0, 50, block_hashes=hashes))
    got = view.get("d0")
    assert (got.num_free_blocks, got.num_queued_tokens) == (100 - 4, 50 - 32)


def test_mark_unhealthy_until_next_report():
    view = make_view(load("d0"), load("d1"))
    view.mark_unhealthy("d0")
    view.mark_unhealthy("unknown")  # ignored
    assert [w.is_healthy for w in view.snapshot()] == [False, True]
    assert LeastLoadedPolicy().pick(req(0), view.snapshot()).decode_worker_id == "d1"
    view.update(load("d0"))
    assert view.get("d0").is_healthy


def test_stale_loads_are_unhealthy_until_refreshed():
    clock = FakeClock(0.0)
    view = make_view(load("d0"), clock=clock, max_age_s=5.0)
    clock.now = 4.0
    view.update(load("d1"))
    clock.now = 5.0
    assert [w.is_healthy for w in view.snapshot()] == [True, True]  # exactly max_age_s is still fresh
    clock.now = 5.5
    assert [w.is_healthy for w in view.snapshot()] == [False, True]
    assert LeastLoadedPolicy().pick(req(0), view.snapshot()).decode_worker_id == "d1"
    clock.now = 9.5
    assert not view.get("d1").is_healthy
    view.update(load("d0"))
    assert view.get("d0").is_healthy


def test_remove_and_bad_max_age():
    view = make_view(load("d0"))
    view.remove("d0")
    view.remove("d0")
    assert view.snapshot() == []
    with pytest.raises(ValueError, match="max_age_s"):
        LoadView(max_age_s=0)


def test_release_gives_the_decode_blocks_back_at_once_and_keeps_the_queue_shares():
    """A short request ends before the next report: without the release, the one after it on an idle worker
    would be refused on a picture still showing the finished request's blocks taken. Its queue shares stay until
    the next report (they spread a burst; taking them off could show a worker emptier than it is)."""
    view = make_view(load("d0", num_free_blocks=10), load("p0", WorkerRole.PREFILL, num_free_blocks=10))
    policy = LeastLoadedPolicy()
    first = policy.pick(req(0, 100), view.snapshot())  # 7 blocks of 16 on each side
    reservation = view.reserve_decision(first, req(0, 100))
    assert (reservation.decode_worker_id, reservation.num_blocks) == ("d0", 7)
    assert view.get("d0").num_free_blocks == 3
    with pytest.raises(NoWorkerAvailable, match="full"):
        policy.pick(req(1, 100), view.snapshot())
    view.release(reservation)
    d0, p0 = view.get("d0"), view.get("p0")
    assert (d0.num_free_blocks, d0.num_waiting) == (10, 1)
    assert (p0.num_free_blocks, p0.num_queued_tokens, p0.num_waiting) == (3, 100, 1)
    assert policy.pick(req(1, 100), view.snapshot()).decode_worker_id == "d0"


def test_release_after_a_report_never_overfills_and_skips_workers_gone():
    view = make_view(load("d0", num_free_blocks=100))
    reservation = view.reserve_decision(LeastLoadedPolicy(local_prefill_threshold_tokens=1000).pick(req(0, 100), view.snapshot()), req(0, 100))
    view.update(load("d0", num_free_blocks=90))  # mid-request: it holds 7, others 3
    view.release(reservation)
    assert view.get("d0").num_free_blocks == 97
    view.update(load("d0", num_free_blocks=98))  # the worker freed them before this report
    view.release(reservation)
    assert view.get("d0").num_free_blocks == 100  # capped at the total
    view.remove("d0")
    view.release(reservation)  # ignored
    assert "d0" not in view

"""Request spread across workers: max/mean imbalance and shares, hand-computed."""

from __future__ import annotations

import pytest

from splitserve.scheduler.spread import SpreadTracker, imbalance, shares

pytestmark = pytest.mark.unit


def rep(worker: str, role: str, requests: int, running: int = 0, waiting: int = 0) -> dict:
    return {"worker_id": worker, "role": role, "num_requests": requests, "num_running": running, "num_waiting": waiting}


def test_imbalance_is_max_over_mean():
    assert imbalance([8, 2]) == pytest.approx(1.6)  # the 80/20 split of the production articles
    assert imbalance([5, 5, 5]) == 1.0
    assert imbalance([3]) == 1.0 and imbalance([]) == 1.0 and imbalance([0, 0]) == 1.0


def test_shares_add_up_to_one():
    assert shares({"a": 3.0, "b": 1.0}) == {"a": 0.75, "b": 0.25}
    assert shares({"a": 0.0, "b": 0.0}) == {"a": 0.5, "b": 0.5}


def test_requests_counted_over_the_window_per_role():
    t = SpreadTracker(window_s=60)
    t.observe(0.0, [rep("p-1", "prefill", 100), rep("p-2", "prefill", 10), rep("d-1", "decode", 50)])
    t.observe(30.0, [rep("p-1", "prefill", 140), rep("p-2", "prefill", 20), rep("d-1", "decode", 60)])
    t.observe(70.0, [rep("p-1", "prefill", 180, running=3), rep("p-2", "prefill", 30, running=1), rep("d-1", "decode", 70)])
    # the baseline is the newest sample at or before the horizon (70 - 60 = 10 s): t=0, so the counts cover
    # at least the window; p-1 started 80, p-2 20
    assert t.recent_requests() == {"p-1": 80, "p-2": 20, "d-1": 20}
    t.observe(95.0, [rep("p-1", "prefill", 180, running=3), rep("p-2", "prefill", 30, running=1), rep("d-1", "decode", 70)])
    assert t.recent_requests() == {"p-1": 40, "p-2": 10, "d-1": 10}  # horizon 35 s: baseline t=30
    s = t.summary([rep("p-1", "prefill", 180, running=3), rep("p-2", "prefill", 30, running=1), rep("d-1", "decode", 70)])
    assert s["prefill"]["imbalance"] == {"in_flight": 1.5, "requests": 1.6}
    assert s["prefill"]["share"]["p-1"] == {"in_flight": 0.75, "requests": 0.8}
    assert s["decode"]["imbalance"] == {"in_flight": 1.0, "requests": 1.0}


def test_a_worker_that_left_is_forgotten():
    t = SpreadTracker()
    t.observe(0.0, [rep("a", "decode", 5), rep("b", "decode", 5)])
    t.observe(1.0, [rep("a", "decode", 9)])
    assert t.recent_requests() == {"a": 4}

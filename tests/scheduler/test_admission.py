"""QueueWaitEstimator: drain rates from load reports, estimates, and the refusal past the queue-wait budget."""

from __future__ import annotations

import math

import pytest

from splitserve.scheduler import NoWorkerAvailable, QueueWaitEstimator, QueueWaitTooLong

pytestmark = pytest.mark.unit


def busy(est: QueueWaitEstimator, worker: str, queued: list[int], dispatched: list[int], dt: float = 1.0) -> None:
    """Reports ``queued[i]`` at t = i * dt, with ``dispatched[i]`` tokens sent just before report i."""
    for i, (q, d) in enumerate(zip(queued, dispatched)):
        if d:
            est.on_dispatch(worker, d)
        est.on_report(worker, q, i * dt)


def test_rate_is_what_drained_between_busy_reports():
    est = QueueWaitEstimator(30.0, window_s=1e9, min_busy_s=2.0)
    # 1000 queued, +500 sent, 900 left after 1 s: 600 drained; then 900 -> 300 with nothing sent: 600 drained
    busy(est, "p0", [1000, 900, 300], [0, 500, 0])
    assert est.tokens_per_s("p0") == pytest.approx(600.0)
    assert est.estimate_s("p0", 6000) == pytest.approx(10.0)


def test_intervals_that_start_empty_are_not_samples():
    """A queue that was empty at a report says nothing about the rate until the next (the worker idled part of it)."""
    est = QueueWaitEstimator(30.0, min_busy_s=0.0)
    busy(est, "p0", [0, 100, 0, 50], [0, 100, 0, 50], dt=0.25)
    # only 100 -> 0 is a sample: 100 tokens drained in 0.25 s
    assert est.tokens_per_s("p0") == pytest.approx(400.0)
    fresh = QueueWaitEstimator(30.0, min_busy_s=0.0)
    busy(fresh, "p0", [0, 0, 50], [0, 0, 50], dt=0.25)
    assert fresh.tokens_per_s("p0") is None and fresh.estimate_s("p0", 10_000) is None
    fresh.check("p0", 10_000)  # unknown rate: admit (and measure)


def test_a_queue_that_only_moves_by_emptying_is_measured():
    """Prefill steps longer than the report period: the queue holds still through each step, then empties.
    1,024 tokens wait 3 s behind a running prefill and are taken at 3.5 s: 1024 / 3.5 tokens/s, not 0."""
    est = QueueWaitEstimator(30.0, window_s=1e9, min_busy_s=2.0)
    busy(est, "p0", [1024] * 7 + [0], [1024] + [0] * 7, dt=0.5)
    assert est.tokens_per_s("p0") == pytest.approx(1024 / 3.5)
    est.check("p0", 1024)  # about 3.5 s: admitted (it was refused as "never" before)


def test_unknown_until_seen_busy_long_enough_then_refuses_past_the_budget():
    est = QueueWaitEstimator(max_queue_wait_s=10.0, window_s=1e9, min_busy_s=2.0)
    busy(est, "p0", [1000, 900], [0, 0])  # one busy second: 100 tokens/s
    est.check("p0", 5000)  # not trusted yet
    est.on_report("p0", 800, 2.0)  # two busy seconds
    assert est.tokens_per_s("p0") == pytest.approx(100.0)
    est.check("p0", 900)  # 9 s <= 10 s
    with pytest.raises(QueueWaitTooLong) as info:
        est.check("p0", 3000)  # 30 s
    assert isinstance(info.value, NoWorkerAvailable)  # HTTP 503 with Retry-After
    assert info.value.retry_after_s == pytest.approx(20.0)  # when the queue should be back within the budget
    message = str(info.value)
    assert "about 30 s on p0" in message and "3000 prompt tokens queued ahead" in message and "routing.max_queue_wait_s" in message


def test_empty_queue_never_waits_and_no_budget_never_refuses():
    est = QueueWaitEstimator(max_queue_wait_s=1.0, min_busy_s=1.0)
    busy(est, "p0", [1000, 999], [0, 0])  # 1 token/s: very slow
    assert est.estimate_s("p0", 0) == 0.0
    est.check("p0", 0)
    unlimited = QueueWaitEstimator(max_queue_wait_s=None, min_busy_s=1.0)
    busy(unlimited, "p0", [1000, 999], [0, 0])
    unlimited.check("p0", 10**9)


def test_a_queue_that_does_not_drain_is_refused_with_the_budget_as_retry_after():
    est = QueueWaitEstimator(max_queue_wait_s=5.0, min_busy_s=2.0)
    busy(est, "p0", [400, 400, 400], [0, 0, 0])
    assert est.tokens_per_s("p0") == 0.0 and math.isinf(est.estimate_s("p0", 1))
    with pytest.raises(QueueWaitTooLong, match="never") as info:
        est.check("p0", 1)
    assert info.value.retry_after_s == 5.0


def test_a_queue_drained_in_long_steps_is_measured_at_its_rate():
    """Reports every 0.25 s while each 1,024-token prefill step takes 2.5 s: the queue drops once per step and
    most intervals drain nothing. The rate must still come out near 1024 / 2.5 = 410 tokens/s (a per-report
    decay saw only the last zero-drain reports and measured 36, then refused requests for nothing). It reads
    low by the step still in progress (314 here, after 10 s): refusals come a little early, never late."""
    est = QueueWaitEstimator(30.0)
    for i in range(40):  # t = 0 .. 9.75 s: 4096 queued, one prompt leaves every 2.5 s
        est.on_report("p0", 4096 - 1024 * int(i * 0.25 // 2.5), i * 0.25)
    assert 290 < est.tokens_per_s("p0") < 450


def test_recent_samples_weigh_more_and_workers_are_separate():
    est = QueueWaitEstimator(30.0, window_s=2.0, min_busy_s=1.0)
    busy(est, "p0", [10_000, 9_000], [0, 0])  # 1000 tokens/s
    for i in range(2, 12):  # then it slows to 100 tokens/s
        est.on_report("p0", 9_000 - 100 * (i - 1), float(i))
    assert est.tokens_per_s("p0") < 110
    assert est.tokens_per_s("p1") is None
    est.forget("p0")
    assert est.tokens_per_s("p0") is None


@pytest.mark.parametrize("kw", [dict(max_queue_wait_s=0), dict(window_s=0), dict(min_busy_s=-1)])
def test_invalid_settings_are_refused(kw):
    with pytest.raises(ValueError):
        QueueWaitEstimator(**kw)

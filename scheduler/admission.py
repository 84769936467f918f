"""Admission by deadline: refuse a request now when it would wait too long to start. Pure: no I/O, no clock.

A request's queue wait on the worker that prefills it is estimated as

    wait = prompt tokens queued ahead of it / that worker's measured prefill rate

and a request whose estimate exceeds ``max_queue_wait_s`` is refused at once
(``QueueWaitTooLong``: HTTP 503 with ``Retry-After`` = the excess), rather than
queued behind a minute of work the client will give up on.

The rate is the *drain rate* of the worker's queue, measured from its load
reports and the tokens the router sent it:

    drained = queued at the previous report + tokens dispatched since - queued now

over the time between the two reports, taken when the queue was non-empty at the
start (the worker had work; an interval that starts empty may be mostly idle and
would understate the rate and shed requests for nothing). An interval that ends
empty counts: the queue drained in it. (Excluding those too, as this once did,
measured 0 tokens/s whenever one prefill step outlasts a report period: the queue
held still during each step and only ever moved by emptying, so every request
after the first few was refused as "never starting".) Samples are averaged with
sums of tokens and seconds that decay with *time* (``window_s``), not per sample:
reports come every quarter second while one prefill step can take seconds, so the
queue drains in steps and most samples drain nothing; a per-sample decay saw
only the last second or so and measured a worker prefilling 400 tokens/s at 36.
Until a worker has been seen busy for ``min_busy_s`` its rate is unknown and
nothing is refused on its account: a cold burst is admitted and measured. An
empty queue means no wait, whatever the rate.

The caller passes every load report (``on_report``) and every prompt it sends to
a worker to prefill (``on_dispatch``), both with its own clock readings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from splitserve.scheduler.types import QueueWaitTooLong


@dataclass(slots=True)
class _Drain:
    """One worker's queue as last reported, and its decayed drain sums."""

    last_queued: int | None = None
    last_time: float = 0.0
    dispatched: int = 0  # prompt tokens sent to it since the last report
    tokens: float = 0.0
    seconds: float = 0.0
    busy_s: float = 0.0  # all busy time measured, undecayed


class QueueWaitEstimator:
    """Estimates per worker how long a new request would queue before its prefill starts.

    ``max_queue_wait_s``: the budget (None: never refuse; estimates still work).
    ``window_s``: older busy time weighs ``exp(-age / window_s)``.
    ``min_busy_s``: busy time measured before a worker's rate is trusted.
    """

    def __init__(self, max_queue_wait_s: float | None = 30.0, window_s: float = 30.0, min_busy_s: float = 5.0) -> None:
        if max_queue_wait_s is not None and max_queue_wait_s <= 0:
            raise ValueError(f"max_queue_wait_s must be > 0 seconds or None (no limit), got {max_queue_wait_s}")
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0 seconds, got {window_s}")
        if min_busy_s < 0:
            raise ValueError(f"min_busy_s must be >= 0 seconds, got {min_busy_s}")
        self.max_queue_wait_s = max_queue_wait_s
        self.window_s = window_s
        self.min_busy_s = min_busy_s
        self._drains: dict[str, _Drain] = {}

    def on_dispatch(self, worker_id: str, num_tokens: int) -> None:
        """The router sent ``num_tokens`` prompt tokens to ``worker_id`` to prefill."""
        assert num_tokens >= 0, num_tokens
        self._drains.setdefault(worker_id, _Drain()).dispatched += num_tokens

    def on_report(self, worker_id: str, num_queued_tokens: int, now: float) -> None:
        """A fresh load report: ``num_queued_tokens`` prompt tokens wait on ``worker_id`` at ``now``."""
        d = self._drains.setdefault(worker_id, _Drain())
        prev, dt = d.last_queued, now - d.last_time
        if prev is not None and prev > 0 and dt > 0:
            drained = max(0, prev + d.dispatched - num_queued_tokens)
            keep = math.exp(-dt / self.window_s)
            d.tokens = keep * d.tokens + drained
            d.seconds = keep * d.seconds + dt
            d.busy_s += dt
        d.last_queued, d.last_time, d.dispatched = num_queued_tokens, now, 0

    def forget(self, worker_id: str) -> None:
        """Drop what was measured about a worker (it restarted, or left)."""
        self._drains.pop(worker_id, None)

    def tokens_per_s(self, worker_id: str) -> float | None:
        """The measured prefill drain rate of a worker; None until it was seen busy for ``min_busy_s``."""
        d = self._drains.get(worker_id)
        if d is None or d.seconds <= 0 or d.busy_s < self.min_busy_s:
            return None
        return d.tokens / d.seconds

    def estimate_s(self, worker_id: str, num_tokens_ahead: int) -> float | None:
        """Seconds before a request behind ``num_tokens_ahead`` queued tokens starts; None when unknown."""
        if num_tokens_ahead <= 0:
            return 0.0
        rate = self.tokens_per_s(worker_id)
        if rate is None:
            return None
        return math.inf if rate == 0 else num_tokens_ahead / rate

    def check(self, worker_id: str, num_tokens_ahead: int) -> None:
        """Raise ``QueueWaitTooLong`` when the estimated wait on ``worker_id`` exceeds the budget."""
        budget = self.max_queue_wait_s
        if budget is None:
            return
        wait = self.estimate_s(worker_id, num_tokens_ahead)
        if wait is None or wait <= budget:
            return
        rate = self.tokens_per_s(worker_id) or 0.0
        retry_after = budget if math.isinf(wait) else max(1.0, wait - budget)  # when the queue should be back within it
        shown = "never (its queue is not draining)" if math.isinf(wait) else f"in about {wait:.0f} s"
        raise QueueWaitTooLong(
            f"the request would start {shown} on {worker_id} ({num_tokens_ahead} prompt tokens queued ahead, "
            f"measured {rate:.0f} tokens/s), over the queue-wait budget of {budget:g} s (routing.max_queue_wait_s)",
            retry_after_s=retry_after,
        )

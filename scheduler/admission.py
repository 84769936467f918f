"""Admission by deadline: refuse a request now when it would wait too long to start. Pure: no I/O, no clock.

A request's queue wait on the worker that prefills it is estimated as

    wait = prompt tokens queued ahead of it / that worker's measured prefill rate

and a request whose estimate exceeds ``max_queue_wait_s`` is refused at once
(``QueueWaitTooLong``: HTTP 503 with ``Retry-After`` = the excess), rather than
queued behind a minute of work the client will give up on.

The rate is the *drain rate* of the worker's queue, measured from its load
reports and the tokens the router sent it:

    drained = queued at the previous report + tokens dispatched since - queued now

over the time between the two reports, taken only when the queue was non-empty
at both ends (the worker was busy prefilling throughout; an idle interval would
understate the rate and shed requests for nothing). Samples are averaged with
exponentially decaying sums of tokens and seconds, so long busy intervals weigh
more than short ones. Until a worker has ``min_samples`` samples its rate is
unknown and nothing is refused on its account: a cold burst is admitted and
measured. An empty queue means no wait, whatever the rate.

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
    num_samples: int = 0


class QueueWaitEstimator:
    """Estimates per worker how long a new request would queue before its prefill starts.

    ``max_queue_wait_s``: the budget (None: never refuse; estimates still work).
    ``decay``: weight kept by the older samples at each new one (0 < decay < 1).
    ``min_samples``: busy intervals measured before a worker's rate is trusted.
    """

    def __init__(self, max_queue_wait_s: float | None = 30.0, decay: float = 0.8, min_samples: int = 2) -> None:
        if max_queue_wait_s is not None and max_queue_wait_s <= 0:
            raise ValueError(f"max_queue_wait_s must be > 0 seconds or None (no limit), got {max_queue_wait_s}")
        if not 0 < decay < 1:
            raise ValueError(f"decay must be within (0, 1), got {decay}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples}")
        self.max_queue_wait_s = max_queue_wait_s
        self.decay = decay
        self.min_samples = min_samples
        self._drains: dict[str, _Drain] = {}

    def on_dispatch(self, worker_id: str, num_tokens: int) -> None:
        """The router sent ``num_tokens`` prompt tokens to ``worker_id`` to prefill."""
        assert num_tokens >= 0, num_tokens
        self._drains.setdefault(worker_id, _Drain()).dispatched += num_tokens

    def on_report(self, worker_id: str, num_queued_tokens: int, now: float) -> None:
        """A fresh load report: ``num_queued_tokens`` prompt tokens wait on ``worker_id`` at ``now``."""
        d = self._drains.setdefault(worker_id, _Drain())
        prev, dt = d.last_queued, now - d.last_time
        if prev is not None and prev > 0 and num_queued_tokens > 0 and dt > 0:
            drained = max(0, prev + d.dispatched - num_queued_tokens)
            d.tokens = self.decay * d.tokens + drained
            d.seconds = self.decay * d.seconds + dt
            d.num_samples += 1
        d.last_queued, d.last_time, d.dispatched = num_queued_tokens, now, 0

    def forget(self, worker_id: str) -> None:
        """Drop what was measured about a worker (it restarted, or left)."""
        self._drains.pop(worker_id, None)

    def tokens_per_s(self, worker_id: str) -> float | None:
        """The measured prefill drain rate of a worker; None until ``min_samples`` busy intervals were seen."""
        d = self._drains.get(worker_id)
        if d is None or d.num_samples < self.min_samples or d.seconds <= 0:
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

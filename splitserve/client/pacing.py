"""Client-side pacing: how many requests to keep in flight, when to retry, which to send next.

Pure logic, no I/O, no asyncio, no clock of its own: every method takes ``now``
(seconds, any monotonic origin) so tests drive it in milliseconds. The batch
runner (``splitserve.client.batch``) is the thin asyncio glue around it.

- ``AIMDController``: a concurrency window in the style of TCP congestion
  control. Each success adds ``increase_step / window`` (about +1 per window's
  worth of successes); an overload answer (429/503) multiplies the window by
  ``decrease_factor``, at most once per congestion episode (requests already in
  flight when the window shrank do not shrink it again), and a ``Retry-After``
  pauses every new send until it has passed.
- ``RetryPolicy``: exponential backoff with jitter, never shorter than the
  server's ``Retry-After``.
- ``PendingQueue``: what waits to be sent: lowest priority value first (as in vLLM), input order
  within a priority; retries wait out their backoff before they are eligible.
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Ticket:
    """Handed out by ``on_start``; give it back to exactly one ``on_*`` outcome call."""

    started_at: float
    epoch: int


class AIMDController:
    """Additive-increase / multiplicative-decrease limit on requests in flight."""

    def __init__(self, max_concurrency: int, *, min_concurrency: int = 1, initial_concurrency: int | None = None,
                 increase_step: float = 1.0, decrease_factor: float = 0.5, max_pause_s: float = 60.0) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if not 1 <= min_concurrency <= max_concurrency:
            raise ValueError(f"min_concurrency must be in [1, max_concurrency={max_concurrency}], got {min_concurrency}")
        if not 0 < decrease_factor < 1:
            raise ValueError(f"decrease_factor must be in (0, 1), got {decrease_factor}")
        if increase_step <= 0:
            raise ValueError(f"increase_step must be > 0, got {increase_step}")
        initial = max_concurrency if initial_concurrency is None else initial_concurrency
        if not min_concurrency <= initial <= max_concurrency:
            raise ValueError(f"initial_concurrency must be in [{min_concurrency}, {max_concurrency}], got {initial}")
        self.max_concurrency = max_concurrency
        self.min_concurrency = min_concurrency
        self.increase_step = increase_step
        self.decrease_factor = decrease_factor
        self.max_pause_s = max_pause_s
        self.window = float(initial)
        self.in_flight = 0
        self.paused_until = -math.inf
        self.num_decreases = 0
        self._epoch = 0

    @property
    def limit(self) -> int:
        """Requests allowed in flight now."""
        return max(self.min_concurrency, int(self.window))

    def can_start(self, now: float) -> bool:
        return self.in_flight < self.limit and now >= self.paused_until

    def wait_s(self, now: float) -> float | None:
        """Seconds until a send may start: 0 now, the rest of a pause, or None (wait for a request to finish)."""
        if now < self.paused_until:
            return self.paused_until - now
        return 0.0 if self.in_flight < self.limit else None

    def on_start(self, now: float) -> Ticket:
        assert self.can_start(now), (self.in_flight, self.limit, self.paused_until, now)
        self.in_flight += 1
        return Ticket(now, self._epoch)

    def on_success(self, ticket: Ticket, now: float) -> None:
        self._finish(ticket)
        self.window = min(float(self.max_concurrency), self.window + self.increase_step / self.window)

    def on_overload(self, ticket: Ticket, now: float, retry_after_s: float | None = None) -> None:
        """A 429/503: shrink the window once per episode, and pause for ``Retry-After`` if given."""
        self._finish(ticket)
        if ticket.epoch == self._epoch:
            self.window = max(float(self.min_concurrency), self.window * self.decrease_factor)
            self._epoch += 1
            self.num_decreases += 1
        if retry_after_s is not None and retry_after_s > 0:
            self.paused_until = max(self.paused_until, now + min(retry_after_s, self.max_pause_s))

    def on_failure(self, ticket: Ticket, now: float) -> None:
        """Any other outcome (a bad request, a dropped connection): the slot frees, the window stays."""
        self._finish(ticket)

    def _finish(self, ticket: Ticket) -> None:
        assert self.in_flight > 0, "an outcome reported without a matching on_start"
        self.in_flight -= 1


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently to retry a retryable failure.

    ``max_attempts`` counts the first try (1 disables retries). The n-th retry
    waits ``min(backoff_max_s, backoff_base_s * 2**(n-1))``, reduced by up to
    ``jitter`` of itself at random, and never less than ``Retry-After`` (itself
    capped at ``max_retry_after_s``, so one odd header cannot stall a batch).
    """

    max_attempts: int = 4
    backoff_base_s: float = 0.25
    backoff_max_s: float = 10.0
    jitter: float = 0.5
    max_retry_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 (1 means no retries), got {self.max_attempts}")
        if self.backoff_base_s < 0 or self.backoff_max_s < self.backoff_base_s:
            raise ValueError(f"need 0 <= backoff_base_s <= backoff_max_s, got {self.backoff_base_s}, {self.backoff_max_s}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def should_retry(self, error: BaseException, num_attempts: int) -> bool:
        """Whether to try again after ``num_attempts`` tries ended with ``error``."""
        return bool(getattr(error, "retryable", False)) and num_attempts < self.max_attempts

    def delay_s(self, num_attempts: int, retry_after_s: float | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait before the next try, after ``num_attempts`` (>= 1) tries."""
        assert num_attempts >= 1, num_attempts
        exp = min(self.backoff_max_s, self.backoff_base_s * 2 ** (num_attempts - 1))
        u = (rng or random).random()
        return max(exp * (1 - self.jitter * u), min(retry_after_s or 0.0, self.max_retry_after_s))


class PendingQueue:
    """Indices of requests waiting to be sent; ``pop_ready`` gives the next one that may go."""

    def __init__(self) -> None:
        self._ready: list[tuple[int, int]] = []  # (priority, index)
        self._delayed: list[tuple[float, int, int]] = []  # (ready_at, priority, index)

    def __len__(self) -> int:
        return len(self._ready) + len(self._delayed)

    def push(self, index: int, priority: int = 0, ready_at: float | None = None) -> None:
        if ready_at is None:
            heapq.heappush(self._ready, (priority, index))
        else:
            heapq.heappush(self._delayed, (ready_at, priority, index))

    def pop_ready(self, now: float) -> int | None:
        """The index with the lowest priority value (as in vLLM) whose backoff has passed (earliest input first), or None."""
        while self._delayed and self._delayed[0][0] <= now:
            _, priority, index = heapq.heappop(self._delayed)
            heapq.heappush(self._ready, (priority, index))
        return heapq.heappop(self._ready)[1] if self._ready else None

    def next_ready_at(self) -> float | None:
        """When the next backed-off index becomes eligible (None: nothing is waiting out a backoff)."""
        return self._delayed[0][0] if self._delayed else None

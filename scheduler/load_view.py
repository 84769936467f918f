"""The router's in-memory picture of worker loads. Pure: no I/O; the clock is injected.

Workers report a ``WorkerLoad`` every so often (the glue calls ``update``).
Between two reports the router may place a burst of requests; ``reserve``
adjusts the cached load as if each placement had already landed, so the
policy sees the workers fill up and spreads the burst instead of sending it
all to whichever worker looked emptiest at the last report. The next report
from a worker replaces the optimistic figures with the real ones.

When the request ends (finished, failed or cancelled) the glue hands its
``Reservation`` back to ``release``, which returns the decode worker's blocks to
the picture at once (never past its total): the worker holds them until then,
and a request that follows a short one closely must not be refused on a picture
that still shows the finished one's blocks taken. A waiting request's share stays
until the next report, as the burst spreading above needs. Prompt tokens charged
to a worker's queue drain from the picture at the worker's measured cost per
prompt token (``prompt_s_per_token``: its own, else the highest any worker
reported, as all serve one model; a step's fixed cost is spread over its
tokens, so it mostly reads high and the picture drains slower than the worker):
a worker sent a few short prompts looks free again once it must have prefilled
them, not only at its next report, while a burst within that time still piles
up. Unmeasured, the tokens stay until the next report. A report taken after
the worker freed the blocks but received before the release overstates its
free blocks by one request's until the next report; a worker
that then lacks room refuses the reservation and the router tries the next, as
for any stale picture.

A worker whose last report is older than ``max_age_s`` is shown as unhealthy
(it may be dead or partitioned); ``mark_unhealthy`` does the same at once when
a call to the worker fails. Either way the next report makes it healthy again.

``updated_at`` is always stamped with the view's own clock at receipt, never
taken from the worker, so staleness never depends on clock skew between nodes.
Not thread-safe: use it from one event loop (pick and reserve without an
``await`` in between).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from splitserve.scheduler.policy import blocks_needed, uncached_prompt_tokens
from splitserve.scheduler.types import PairDecision, PairRequest, WorkerLoad


@dataclass(frozen=True, slots=True)
class Reservation:
    """The KV blocks one placement charged its decode worker's picture (``release`` gives them back)."""

    decode_worker_id: str
    num_blocks: int


class LoadView:
    """Map worker_id -> latest ``WorkerLoad``, with optimistic reservations and staleness."""

    def __init__(self, max_age_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        if max_age_s <= 0:
            raise ValueError(f"max_age_s must be > 0 seconds, got {max_age_s}")
        self.max_age_s = max_age_s
        self._clock = clock
        self._loads: dict[str, WorkerLoad] = {}
        self._charged: dict[str, tuple[float, float]] = {}  # worker -> (prompt tokens charged since its report, when)
        self._slowest_prompt_s_per_token = 0.0  # the highest cost any worker reported: for workers that measured none

    def __len__(self) -> int:
        return len(self._loads)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self._loads

    def update(self, load: WorkerLoad) -> None:
        """Take a fresh report; it replaces the previous one and any reservations made since."""
        self._loads[load.worker_id] = replace(load, updated_at=self._clock())
        self._charged.pop(load.worker_id, None)
        self._slowest_prompt_s_per_token = max(w.prompt_s_per_token for w in self._loads.values())

    def remove(self, worker_id: str) -> None:
        """Forget a worker (it left the cluster). Unknown ids are ignored."""
        self._loads.pop(worker_id, None)
        self._charged.pop(worker_id, None)

    def mark_unhealthy(self, worker_id: str) -> None:
        """Stop routing to a worker until its next report (e.g. a call to it just failed)."""
        load = self._loads.get(worker_id)
        if load is not None:
            load.is_healthy = False

    def get(self, worker_id: str) -> WorkerLoad | None:
        """A copy of one worker's load as ``snapshot`` would show it, or None if unknown."""
        load = self._loads.get(worker_id)
        return None if load is None else self._view(load, self._clock())

    def snapshot(self) -> list[WorkerLoad]:
        """Copies of all loads sorted by worker id; stale ones have ``is_healthy=False``."""
        now = self._clock()
        return [self._view(self._loads[wid], now) for wid in sorted(self._loads)]

    def reserve(self, worker_id: str, num_blocks: int, num_tokens: int) -> None:
        """Optimistically charge one more request to a worker until its next report.

        ``num_blocks`` KV blocks leave the free pool (never below zero),
        ``num_tokens`` prompt tokens join its prefill queue (draining at its
        measured cost), and the request counts as waiting.
        """
        assert num_blocks >= 0 and num_tokens >= 0, (num_blocks, num_tokens)
        load = self._loads.get(worker_id)
        if load is None:
            raise KeyError(f"reserve on unknown worker {worker_id!r}; known: {sorted(self._loads)}")
        load.num_free_blocks = max(0, load.num_free_blocks - num_blocks)
        now = self._clock()
        self._charged[worker_id] = (self._charged_tokens(load, now) + num_tokens, now)
        load.num_waiting += 1

    def reserve_decision(self, decision: PairDecision, request: PairRequest) -> Reservation:
        """Apply ``reserve`` to the worker(s) a decision names, with the request's sizes.

        The decode worker always gets the prompt's blocks (plus room for one
        output token); whoever prefills gets the prompt tokens it does not
        already cache in its prefix cache. ``release`` gives the decode blocks back.
        """
        n = request.num_prompt_tokens
        decoder = self._loads[decision.decode_worker_id]
        decode_blocks = blocks_needed(n, decoder.block_size)
        if decision.prefill_worker_id is None:
            self.reserve(decoder.worker_id, decode_blocks, uncached_prompt_tokens(request, decoder))
        else:
            self.reserve(decoder.worker_id, decode_blocks, 0)
            prefiller = self._loads[decision.prefill_worker_id]
            prefill_blocks = -(-n // prefiller.block_size)
            self.reserve(prefiller.worker_id, prefill_blocks, uncached_prompt_tokens(request, prefiller))
        return Reservation(decoder.worker_id, decode_blocks)

    def release(self, reservation: Reservation) -> None:
        """The request ``reservation`` was made for has ended: its decode blocks are free again (see the module
        docstring). Never past the worker's total; a worker no longer known is skipped."""
        load = self._loads.get(reservation.decode_worker_id)
        if load is not None:
            load.num_free_blocks = min(load.num_total_blocks, load.num_free_blocks + reservation.num_blocks)

    def _charged_tokens(self, load: WorkerLoad, now: float) -> float:
        """The prompt tokens charged to ``load``'s worker since its report that it cannot have prefilled yet."""
        charged = self._charged.get(load.worker_id)
        if charged is None:
            return 0.0
        tokens, at = charged
        s_per_token = load.prompt_s_per_token or self._slowest_prompt_s_per_token
        return max(0.0, tokens - (now - at) / s_per_token) if s_per_token > 0 else tokens

    def _view(self, load: WorkerLoad, now: float) -> WorkerLoad:
        is_fresh = now - load.updated_at <= self.max_age_s
        queued = load.num_queued_tokens + math.ceil(self._charged_tokens(load, now) - 1e-6)  # a whole token is left or not
        return replace(load, is_healthy=load.is_healthy and is_fresh, num_queued_tokens=queued)

"""Which reserved blocks a prefill worker may still write into, and when a decode worker may reuse them (pure).

A reservation is offered to one writer (a prefill worker) under a *transfer id*
of its own (``<req_id>#<suffix>``, chosen by the router: a retry of the same
request on this worker is another transfer). The writer's NIXL notification names that id, with the first
token it sampled, or ``VOID_TOKEN`` when its prefill ended without a completed
write (failed or cancelled, its transfer released). The writer starts no write
after the reservation's ``write_by`` and cancels a late one at it.

Letting go of a reservation whose KV has not landed (the request was cancelled,
failed over, or the KV wait timed out) must not put its blocks back in the pool
while a write into them may still be under way: the new owner's KV would be
overwritten. Such a reservation is *fenced*: kept, under its transfer id, until
the writer's notification comes (data or void) or ``write_by`` (plus a margin for
the clocks of two nodes) has passed. Blocks no write can reach any more (none was
asked for, the KV landed, the writer said void) are released at once.

``Landings`` decides; the worker does the engine calls and the waiting.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from enum import Enum

from splitserve.worker_messages import VOID_TOKEN

CLOCK_MARGIN_S = 0.5  # two nodes' wall clocks may differ this much: fences outlast ``write_by`` by it


class LetGo(Enum):
    RELEASE = "release"  # no write can reach the blocks: free them now
    FENCE = "fence"  # a write may still land: keep the blocks under the transfer id until the writer is done


@dataclass(slots=True)
class Landing:
    req_id: str
    opened_at: float
    write_by: float  # monotonic, on this worker's clock
    first_token: int | None = None  # the KV landed; the writer sampled this token
    void: bool = False  # the writer will not write
    fenced: bool = False  # let go while a write may land

    @property
    def writer_done(self) -> bool:
        return self.first_token is not None or self.void


class Landings:
    """Open and fenced reservations by transfer id; the open one of each request by its request id."""

    def __init__(self) -> None:
        self._by_tid: dict[str, Landing] = {}
        self._open: dict[str, str] = {}  # req_id -> transfer id of its open (not fenced, not claimed) reservation
        self._counter = itertools.count(1)

    def __len__(self) -> int:
        return len(self._by_tid)

    def open(self, req_id: str, now: float, window_s: float, tid: str | None = None) -> str:
        """A reservation for ``req_id`` was made; its writer must be done within ``window_s``. Returns its transfer
        id: ``tid`` (the caller's name for it, so it can name it in an abort without having received it), or a new one."""
        if req_id in self._open:
            raise ValueError(f"request id {req_id!r} already has an open reservation")
        tid = tid or f"{req_id}#{next(self._counter)}"
        if tid in self._by_tid:
            raise ValueError(f"transfer id {tid!r} is already in use")
        self._by_tid[tid] = Landing(req_id, now, now + window_s)
        self._open[req_id] = tid
        return tid

    def transfer_id(self, req_id: str) -> str | None:
        return self._open.get(req_id)

    def get(self, tid: str) -> Landing | None:
        return self._by_tid.get(tid)

    def notified(self, tid: str, token: int) -> Landing | None:
        """The writer of ``tid`` reported; returns its landing (a fenced one is done: release it), or None if unknown."""
        landing = self._by_tid.get(tid)
        if landing is None:
            return None
        if token == VOID_TOKEN:
            landing.void = True
        elif landing.first_token is None:
            landing.first_token = int(token)
        if landing.fenced:
            self._by_tid.pop(tid)
        return landing

    def claim(self, req_id: str) -> None:
        """The KV landed and the request joins the batch: its blocks belong to the sequence from now on."""
        tid = self._open.pop(req_id, None)
        if tid is not None:
            self._by_tid.pop(tid, None)

    def let_go(self, req_id: str, settled_tid: str | None = None) -> tuple[str, LetGo] | None:
        """``req_id``'s open reservation is no longer wanted. ``settled_tid``: a transfer id the caller knows no write
        into can land (no writer was asked, or its write completed). Returns the open reservation's transfer id and
        what to do with its blocks, or None if none is open."""
        tid = self._open.pop(req_id, None)
        if tid is None:
            return None
        landing = self._by_tid[tid]
        if landing.writer_done or tid == settled_tid:
            del self._by_tid[tid]
            return tid, LetGo.RELEASE
        landing.fenced = True
        return tid, LetGo.FENCE

    def unfence(self, tid: str) -> bool:
        """The caller knows no write into the fenced reservation ``tid`` can land: True if it was fenced (release it)."""
        landing = self._by_tid.get(tid)
        if landing is None or not landing.fenced:
            return False
        del self._by_tid[tid]
        return True

    def expired(self, now: float) -> list[str]:
        """Fenced reservations whose writer can no longer be writing (past ``write_by`` and the clock margin)."""
        tids = [tid for tid, x in self._by_tid.items() if x.fenced and now > x.write_by + CLOCK_MARGIN_S]
        for tid in tids:
            del self._by_tid[tid]
        return tids

    def unclaimed(self, now: float, ttl_s: float) -> list[str]:
        """Request ids of open reservations older than ``ttl_s`` (nobody came for them)."""
        return [x.req_id for tid, x in self._by_tid.items() if not x.fenced and now - x.opened_at > ttl_s]

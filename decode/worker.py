"""Decode worker: reserves blocks for incoming KV, admits sequences once it lands, streams tokens.

Request lifecycle on this worker (disaggregated path), all inside one streaming
call, ``serve_prefilled(GenerateRequest)``, so that Serve counts the request as in
flight here from the first block reserved to the last token (a replica being
scaled down drains it instead of dropping it):
  1. reserved: blocks are set aside for the part of the prompt this worker does
     not cache, and the ``Reservation`` is the stream's first item; or
     ``WorkerBusy`` (back-pressure) is raised when the pool cannot hold it.
  2. awaiting KV: the caller has the prefill worker write the prompt's KV into
     those blocks by the reservation's ``write_by``; the NIXL notification
     ``[transfer_id, first_token]`` ends the wait (bounded by ``kv_wait_timeout_s``).
  3. running: the sequence joins the continuous batch with its first token and
     decodes one token per step; its ``OutputChunk``s stream back on this call,
     or, when the call names a ``feed_id``, on the ingress's token feed (one item
     per step for all its requests; ``splitserve.token_feed``), and the call ends
     with the request.
  4. finished / aborted: blocks return to the pool (prompt blocks stay as
     prefix cache).

Letting go, whatever the moment the caller leaves: a stream that ends without
finishing (cancelled, timed out, failed) lets go of its reservation or aborts its
sequence itself, in a task of its own that a second cancellation cannot
interrupt; the router also sends ``abort`` (detached from the cancelled HTTP
request, see ``splitserve.cleanup``); and a reservation that nobody claims within
``reservation_ttl_s`` is let go by the reaper. A reservation let go while a
prefill worker may still be writing into it is *fenced*, not freed: its blocks
come back when that worker's notification (its KV, or ``VOID_TOKEN``) arrives,
when the router's abort says no write was asked for, or after ``write_by``
(``splitserve.decode.kv_landings``).

Whole requests (``generate``, ``resume``) come from ``EngineWorker``: with role
"both" this is an aggregated worker; a decode worker serves them when no
prefill worker can take a request, and when it takes over a request whose
decode worker died mid-stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import msgpack

from splitserve.decode.kv_landings import Landing, Landings, LetGo
from splitserve.engine.block_pool import NoFreeBlocks
from splitserve.worker_base import EngineWorker, WorkerBusy
from splitserve.worker_messages import GenerateRequest, OutputChunk, Reservation

logger = logging.getLogger(__name__)
T = TypeVar("T")

NOTIF_POLL_S = 0.002


class KVNotArrived(TimeoutError):
    """The prompt's KV did not arrive from the prefill worker in time."""


def _no_kv_coming(landing: Landing) -> KVNotArrived:
    return KVNotArrived(f"the prefill of {landing.req_id} ended without writing its KV")


class DecodeWorker(EngineWorker):
    role = "decode"

    def __init__(self, *args: Any, role: str = "decode", **kwargs: Any):
        self.role = role  # before the base class names the worker after it
        super().__init__(*args, **kwargs)
        self._landings = Landings()
        self._waiters: dict[str, asyncio.Future] = {}  # transfer id -> the stream waiting for its KV
        self._poller: asyncio.Task | None = None
        self._cleanups: set[asyncio.Task] = set()

    # ---- reservations ------------------------------------------------------------
    async def reserve(self, req_id: str, num_prompt_tokens: int) -> list[int]:
        """Set aside fresh blocks for an ``num_prompt_tokens``-token prompt (no prefix reuse)."""
        return (await self._reserve(req_id, num_prompt_tokens, lambda: self.engine.reserve_blocks(req_id, num_prompt_tokens)))[0]

    async def release(self, req_id: str) -> bool:
        """Free ``req_id``'s reservation now: nobody was asked to write into it."""
        return await self._let_go_reservation(req_id, self._landings.transfer_id(req_id))

    async def _reserve(
        self, req_id: str, num_prompt_tokens: int, reserve: Callable[[], T], transfer_id: str | None = None,
    ) -> tuple[T, str]:
        """Run an engine reservation between steps, turn a full pool into ``WorkerBusy``, open its landing (its
        transfer id is returned with the result) and start the poller."""
        try:
            result = await self.aengine.call(reserve)
        except NoFreeBlocks as e:
            raise WorkerBusy(f"decode worker {self.worker_id} has no room for {num_prompt_tokens} prompt tokens: {e}") from e
        tid = self._landings.open(req_id, time.monotonic(), self.options.kv_wait_timeout_s, transfer_id)
        self._ensure_poller()
        return result, tid

    async def _let_go_reservation(self, req_id: str, settled_tid: str | None) -> bool:
        """Free ``req_id``'s open reservation, or fence it while a write into it may land (``kv_landings``);
        ``settled_tid`` names a reservation no write into can land (its fence, if any, ends now)."""
        unfenced = bool(settled_tid) and self._landings.unfence(settled_tid)
        if unfenced:
            await self.aengine.call(lambda: self.engine.release_reservation(settled_tid))
        decided = self._landings.let_go(req_id, settled_tid)
        if decided is None:
            return unfenced
        tid, action = decided
        if action is LetGo.RELEASE:
            return await self.aengine.call(lambda: self.engine.release_reservation(req_id))
        logger.info("keeping the blocks of %s until its prefill worker is done writing", tid)
        await self.aengine.call(lambda: self.engine.rename_reservation(req_id, tid))
        self._ensure_poller()
        return True

    # ---- KV arrival ----------------------------------------------------------------
    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_notifications(), name="kv-notifications")

    async def _poll_notifications(self) -> None:
        """Drain NIXL notifications while reservations are open or fenced; free fences that ended, reap stale ones."""
        while len(self._landings) or self._waiters:
            for _peer, msg in self.agent.get_notifications():
                try:
                    tid, token = msgpack.unpackb(msg)
                    tid, token = str(tid), int(token)
                except Exception:
                    logger.warning("ignoring malformed KV notification %r", msg[:64])
                    continue
                landing = self._landings.notified(tid, token)
                if landing is None:
                    continue
                if landing.fenced:
                    await self.aengine.call(lambda tid=tid: self.engine.release_reservation(tid))
                    continue
                waiter = self._waiters.pop(tid, None)
                if waiter is not None and not waiter.done():
                    if landing.void:
                        waiter.set_exception(_no_kv_coming(landing))
                    else:
                        waiter.set_result(landing.first_token)
            now = time.monotonic()
            for tid in self._landings.expired(now):
                await self.aengine.call(lambda tid=tid: self.engine.release_reservation(tid))
            for req_id in self._landings.unclaimed(now, self.options.reservation_ttl_s):
                if self._landings.transfer_id(req_id) not in self._waiters:
                    logger.warning("freeing reservation of %s: unclaimed for over %.0f s", req_id, self.options.reservation_ttl_s)
                    await self._let_go_reservation(req_id, None)
            await asyncio.sleep(NOTIF_POLL_S)

    async def _wait_kv(self, tid: str, timeout_s: float) -> int:
        landing = self._landings.get(tid)
        if landing is not None and landing.writer_done:
            if landing.void:
                raise _no_kv_coming(landing)
            return landing.first_token
        fut = asyncio.get_running_loop().create_future()
        self._waiters[tid] = fut
        self._ensure_poller()
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError as e:
            raise KVNotArrived(f"KV for {tid.partition('#')[0]} did not arrive within {timeout_s:.1f} s") from e
        finally:
            self._waiters.pop(tid, None)

    # ---- generation --------------------------------------------------------------
    async def serve_prefilled(
        self, req: GenerateRequest, feed_id: str | None = None, transfer_id: str | None = None,
    ) -> AsyncIterator[Reservation | OutputChunk]:
        """Reserve blocks for ``req``'s prompt (the first item: a ``Reservation``, named ``transfer_id`` when the
        caller chose the name; the leading blocks this worker already caches are reused and never written into),
        wait for its KV, then stream its ``OutputChunk``s (here, or on the token feed ``feed_id``)."""
        req_id, prompt = req.req_id, req.prompt_token_ids
        # the writer's deadline, taken before the landing opens: it passes before the landing's own (on our clock)
        write_by = time.time() + self.options.kv_wait_timeout_s
        reserve = lambda: self.engine.reserve_prompt(req_id, prompt)  # noqa: E731
        (k, blocks), tid = await self._reserve(req_id, len(prompt), reserve, transfer_id)
        self.num_requests += 1
        start = time.monotonic()
        self.meters.on_arrival(start, len(prompt))
        finished = streaming = False
        try:
            yield Reservation(k, blocks, tid, write_by)
            first_token = await self._wait_kv(tid, self.options.kv_wait_timeout_s)
            self._landings.claim(req_id)
            add = lambda: self.engine.add_prefilled_request(req_id, prompt, first_token, req.params, priority=req.priority)  # noqa: E731
            streaming = True  # from here ``_stream`` counts a failure
            async for chunk in self._stream(req_id, add, start, feed_id, req.params.stream_interval):
                yield chunk
            finished = True  # ``_stream`` ends only after the last chunk (on the feed, it yields none)
        except BaseException:
            if not streaming:
                self.num_failed += 1
            raise
        finally:
            if not finished:
                await self._release_detached(req_id)

    async def _release_detached(self, req_id: str) -> bool:
        """Let go of ``req_id``'s reservation (or abort its sequence) in a task of its own that a cancellation of the
        caller cannot stop; the caller waits for it unless it is cancelled once more."""
        task = asyncio.get_running_loop().create_task(self._let_go(req_id, None), name=f"let-go-{req_id}")
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return await asyncio.shield(task)

    async def _let_go(self, req_id: str, settled_tid: str | None) -> bool:
        if await self._let_go_reservation(req_id, settled_tid):
            return True
        return await self.aengine.abort(req_id)  # admitted already: AsyncEngine.stream aborts it too; this is idempotent

    async def abort(self, req_id: str, settled_transfer_id: str | None = None) -> bool:
        """Free whatever ``req_id`` holds here: its running sequence, or its reservation (KV not arrived yet), once no
        write into it can land any more; at once if it is ``settled_transfer_id`` (the caller asked no prefill worker
        to write into it, or the write completed)."""
        return await self._let_go(req_id, settled_transfer_id)

"""Decode worker: reserves blocks for incoming KV, admits sequences once it lands, streams tokens.

Request lifecycle on this worker (disaggregated path), all inside one streaming
call, ``serve_prefilled(GenerateRequest)``, so that Serve counts the request as in
flight here from the first block reserved to the last token (a replica being
scaled down drains it instead of dropping it):
  1. reserved: blocks are set aside for the part of the prompt this worker does
     not cache, and the ``Reservation`` is the stream's first item; or
     ``WorkerBusy`` (back-pressure) is raised when the pool cannot hold it.
  2. awaiting KV: the caller has the prefill worker write the prompt's KV into
     those blocks; the NIXL notification ``[req_id, first_token]`` ends the wait
     (bounded by ``kv_wait_timeout_s``).
  3. running: the sequence joins the continuous batch with its first token and
     decodes one token per step; its ``OutputChunk``s stream back on this call,
     or, when the call names a ``feed_id``, on the ingress's token feed (one item
     per step for all its requests; ``splitserve.token_feed``), and the call ends
     with the request.
  4. finished / aborted: blocks return to the pool (prompt blocks stay as
     prefix cache).

Letting go, whatever the moment the caller leaves: a stream that ends without
finishing (cancelled, timed out, failed) frees its reservation or aborts its
sequence itself, in a task of its own that a second cancellation cannot
interrupt; the router also sends ``release``/``abort`` (detached from the
cancelled HTTP request, see ``splitserve.cleanup``); and a reservation made with
``reserve`` that nobody claims within ``reservation_ttl_s`` is freed by the reaper.

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

from splitserve.engine.block_pool import NoFreeBlocks
from splitserve.worker_base import EngineWorker, WorkerBusy
from splitserve.worker_messages import GenerateRequest, OutputChunk, Reservation

logger = logging.getLogger(__name__)
T = TypeVar("T")

NOTIF_POLL_S = 0.002


class KVNotArrived(TimeoutError):
    """The prompt's KV did not arrive from the prefill worker in time."""


class DecodeWorker(EngineWorker):
    role = "decode"

    def __init__(self, *args: Any, role: str = "decode", **kwargs: Any):
        self.role = role  # before the base class names the worker after it
        super().__init__(*args, **kwargs)
        self._reserved_at: dict[str, float] = {}
        self._arrived: dict[str, tuple[int, float]] = {}  # req_id -> (first token, arrival time)
        self._waiters: dict[str, asyncio.Future] = {}
        self._poller: asyncio.Task | None = None
        self._cleanups: set[asyncio.Task] = set()

    # ---- reservations ------------------------------------------------------------
    async def reserve(self, req_id: str, num_prompt_tokens: int) -> list[int]:
        """Set aside fresh blocks for an ``num_prompt_tokens``-token prompt (no prefix reuse)."""
        return await self._reserve(req_id, num_prompt_tokens, lambda: self.engine.reserve_blocks(req_id, num_prompt_tokens))

    async def release(self, req_id: str) -> bool:
        self._reserved_at.pop(req_id, None)
        self._arrived.pop(req_id, None)
        return await self.aengine.call(lambda: self.engine.release_reservation(req_id))


    async def _reserve(self, req_id: str, num_prompt_tokens: int, reserve: Callable[[], T]) -> T:
        """Run an engine reservation between steps, turn a full pool into ``WorkerBusy``, start the reaper."""
        try:
            result = await self.aengine.call(reserve)
        except NoFreeBlocks as e:
            raise WorkerBusy(f"decode worker {self.worker_id} has no room for {num_prompt_tokens} prompt tokens: {e}") from e
        self._reserved_at[req_id] = time.monotonic()
        self._ensure_poller()
        return result

    # ---- KV arrival ----------------------------------------------------------------
    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_notifications(), name="kv-notifications")

    async def _poll_notifications(self) -> None:
        """Drain NIXL notifications while reservations are open; reap stale ones."""
        while self._reserved_at or self._waiters:
            for _peer, msg in self.agent.get_notifications():
                try:
                    req_id, first_token = msgpack.unpackb(msg)
                except Exception:
                    logger.warning("ignoring malformed KV notification %r", msg[:64])
                    continue
                waiter = self._waiters.pop(req_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(int(first_token))
                elif req_id in self._reserved_at:
                    self._arrived[req_id] = (int(first_token), time.monotonic())
            now = time.monotonic()
            for req_id, t in list(self._reserved_at.items()):
                if now - t > self.options.reservation_ttl_s and req_id not in self._waiters:
                    logger.warning("freeing reservation of %s: unclaimed for %.0f s", req_id, now - t)
                    await self.release(req_id)
            await asyncio.sleep(NOTIF_POLL_S)

    async def _wait_kv(self, req_id: str, timeout_s: float) -> int:
        if req_id in self._arrived:
            return self._arrived.pop(req_id)[0]
        fut = asyncio.get_running_loop().create_future()
        self._waiters[req_id] = fut
        self._ensure_poller()
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError as e:
            raise KVNotArrived(f"KV for {req_id} did not arrive within {timeout_s:.1f} s") from e
        finally:
            self._waiters.pop(req_id, None)

    # ---- generation --------------------------------------------------------------
    async def serve_prefilled(self, req: GenerateRequest, feed_id: str | None = None) -> AsyncIterator[Reservation | OutputChunk]:
        """Reserve blocks for ``req``'s prompt (the first item: a ``Reservation``; the leading blocks this worker
        already caches are reused and never written into), wait for its KV, then stream its ``OutputChunk``s
        (here, or on the token feed ``feed_id``)."""
        req_id, prompt = req.req_id, req.prompt_token_ids
        k, blocks = await self._reserve(req_id, len(prompt), lambda: self.engine.reserve_prompt(req_id, prompt))
        self.num_requests += 1
        start = time.monotonic()
        self.meters.on_arrival(start, len(prompt))
        finished = streaming = False
        try:
            yield Reservation(k, blocks)
            first_token = await self._wait_kv(req_id, self.options.kv_wait_timeout_s)
            self._reserved_at.pop(req_id, None)
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

    async def _release_detached(self, req_id: str) -> None:
        """Free ``req_id``'s reservation (or abort its sequence) in a task of its own that a cancellation of the
        caller cannot stop; the caller waits for it unless it is cancelled once more."""
        task = asyncio.get_running_loop().create_task(self._let_go(req_id), name=f"let-go-{req_id}")
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        await asyncio.shield(task)

    async def _let_go(self, req_id: str) -> bool:
        if await self.release(req_id):
            return True
        return await self.aengine.abort(req_id)  # admitted already: AsyncEngine.stream aborts it too; this is idempotent

    async def abort(self, req_id: str) -> bool:
        """Free whatever ``req_id`` holds here: its reservation (KV not arrived yet) or its running sequence."""
        return await self._let_go(req_id)

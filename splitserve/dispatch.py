"""One attempt at serving a request on the workers a decision names: reserve, prefill, transfer, stream.

``Dispatcher.attempt(req, decision, resume)`` yields the worker's ``OutputChunk``s,
which come on the worker's token feed (``splitserve.feed_reader``: one item per
engine step for all this ingress's requests there), while the request's own
call to the worker lasts as long as the request and brings its error, if any:

* remote prefill: one stream from D, ``serve_prefilled``: its first item is the
  ``Reservation`` of blocks for the prompt (``WorkerBusy``: back-pressure); the
  router then has P prefill and write the KV into them over NIXL, and D decodes
  (the first token must be the one P sampled);
* local: stream ``generate`` from the one worker (aggregated, conditional
  disaggregation, a fallback, or a prefill worker in degraded mode);
* resumed: stream ``resume`` from the one worker (a migration, ``ResumeRequest``).

Failures before the stream are raised as ``RetryableError`` (the router picks
another pair). Every remote call is bounded by a timeout. Nothing leaks: a
reservation whose answer never came, or whose prefill failed, is released; a
stream that ends before its last chunk (the client left, the request was
cancelled, the worker failed) aborts the request on its worker. The abort names
the reservation (by the transfer id the router gave it) when no write into it can
land, so the decode worker frees it at once; otherwise the decode worker keeps
the blocks until the prefill worker is done with them
(``splitserve.decode.kv_landings``). Those cleanup
calls go through the ``Janitor``: detached from the cancellation that caused
them, so they land even when Ray Serve cancels everything the HTTP request
started. A worker found dead gets no cleanup call (there is nothing left to
free), and is reported to the registry so routing avoids it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from splitserve.cleanup import Janitor
from splitserve.feed_reader import FeedEnded, FeedReaders, Subscription, cancel_call
from splitserve.worker_messages import GenerateRequest, OutputChunk, PrefillRequest, PrefillResult, Reservation, ResumeRequest
from splitserve.failures import WorkerDied, describe, is_worker_death, never_reached_worker
from splitserve.metrics import Metrics
from splitserve.scheduler import PairDecision, QueueWaitEstimator, WorkerBusy
from splitserve.scheduler.worker_registry import WorkerRegistry

if TYPE_CHECKING:
    from splitserve.router import RoutedRequest

logger = logging.getLogger(__name__)

# a request's call ended but its last chunk has not come on the feed after this long: the feed lost it
FEED_END_GRACE_S = 5.0


class RetryableError(Exception):
    """An attempt failed before streaming anything; ``worker_id`` is excluded from the next attempt."""

    def __init__(self, reason: str, worker_id: str, cause: BaseException, timeout_s: float | None = None):
        super().__init__(f"{reason} on {worker_id}: {describe(cause, timeout_s=timeout_s)}")
        self.reason, self.worker_id, self.cause = reason, worker_id, cause


class Dispatcher:
    """Runs attempts; owns the cleanup calls and reports dead or unresponsive workers to the registry."""

    def __init__(
        self, registry: WorkerRegistry, metrics: Metrics, janitor: Janitor, *, prefill_timeout_s: float,
        call_timeout_s: float, admission: QueueWaitEstimator | None = None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.janitor = janitor
        self.prefill_timeout_s = prefill_timeout_s
        self.call_timeout_s = call_timeout_s
        self.admission = admission
        self.feeds = FeedReaders(uuid.uuid4().hex, death_signal=registry.death_signal)
        self._streaming_handles: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    def _streaming(self, handle: Any) -> Any:
        """``handle.options(stream=True)``, made once per worker handle: Serve builds a new handle on every call."""
        streaming = self._streaming_handles.get(handle)
        if streaming is None:
            streaming = self._streaming_handles[handle] = handle.options(stream=True)
        return streaming

    def note_failure(self, worker_id: str, e: BaseException) -> None:
        """Route around a worker that died (until it reports again) or did not answer in time (until its next poll)."""
        if is_worker_death(e):
            self.registry.mark_dead(worker_id)
        elif isinstance(e, (asyncio.TimeoutError, TimeoutError)):
            self.registry.view.mark_unhealthy(worker_id)

    def _dispatched(self, worker_id: str, num_tokens: int) -> None:
        if self.admission is not None:
            self.admission.on_dispatch(worker_id, num_tokens)

    async def attempt(
        self, req: RoutedRequest, decision: PairDecision, resume: ResumeRequest | None = None,
    ) -> AsyncIterator[OutputChunk]:
        d_id, p_id = decision.decode_worker_id, decision.prefill_worker_id
        d = self.registry.handle(d_id)
        if resume is not None:
            assert p_id is None, decision
            self.metrics.routed.labels(d_id, "resume").inc()
            self._dispatched(d_id, len(resume.prompt_token_ids) + len(resume.output_token_ids))
            method, msg, req_id = "resume", resume, resume.req_id
        else:
            msg, req_id = GenerateRequest(req.req_id, req.prompt_token_ids, req.params, req.priority), req.req_id
            if p_id is None:
                self.metrics.routed.labels(d_id, "local").inc()
                self._dispatched(d_id, len(req.prompt_token_ids))
                method = "generate"
            else:
                method = "serve_prefilled"
        on_first = None if method != "serve_prefilled" else (lambda r, w: self._prefill(p_id, d_id, msg, r, w, req.tenant))
        compute_s = 0.0
        try:
            async with contextlib.aclosing(self._remote_stream(d, method, msg, req_id, d_id, on_first)) as chunks:
                async for chunk in chunks:
                    compute_s = chunk.compute_s
                    yield chunk
        finally:  # a stream that ended early is charged what its worker reported so far
            self.metrics.charge_compute(req.tenant, self.registry.role(d_id), compute_s)

    async def _unless_dead(self, worker_id: str, call: Any, timeout_s: float | None) -> Any:
        """Await ``call`` for at most ``timeout_s``, and no longer once another call found ``worker_id`` dead
        (Serve holds calls to a killed replica until its replacement is up: tens of seconds)."""
        task = asyncio.ensure_future(_as_awaitable(call))
        task.add_done_callback(_consume_outcome)  # abandoned when we are cancelled: Serve's RequestCancelledError is nobody's news
        dead = self.registry.death_signal(worker_id)
        try:
            done, _ = await asyncio.wait({task, dead}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                cancel_call(call)
        if task in done:
            return task.result()
        if dead in done:
            raise WorkerDied(f"{worker_id} died while this call waited for it")
        raise asyncio.TimeoutError()

    async def _prefill(
        self, p_id: str, d_id: str, req: GenerateRequest, reservation: Reservation, write: KVWrite, tenant: str | None,
    ) -> int:
        """Have P prefill ``req`` into D's reserved blocks; returns the first token (``RetryableError`` on failure).
        ``write`` records whether P was asked to write into the blocks, and whether it is done."""
        self.metrics.routed.labels(d_id, "decode").inc()
        self.metrics.routed.labels(p_id, "prefill").inc()
        self._dispatched(p_id, len(req.prompt_token_ids))
        call = None
        try:
            # P may have left while D reserved (a scale-down): that is P's failure, retried elsewhere, not D's
            handle = self.registry.handle(p_id)
            write.asked = True
            call = handle.prefill.remote(PrefillRequest(req, d_id, reservation))
            result: PrefillResult = await self._unless_dead(p_id, call, self.prefill_timeout_s)
            write.done = True
        except BaseException as e:
            if call is not None:
                cancel_call(call)
            if not isinstance(e, Exception):
                raise
            write.done = is_worker_death(e) or never_reached_worker(e)  # then P writes nothing (more)
            self.note_failure(p_id, e)
            raise RetryableError("prefill_failed", p_id, e, self.prefill_timeout_s) from e
        self.metrics.charge_compute(tenant, "prefill", result.compute_s)
        self.metrics.transfer_bytes.inc(result.transfer_bytes)
        self.metrics.transfer_seconds.observe(result.transfer_s)
        if result.num_cached_tokens:
            self.metrics.prefix_cached_tokens.inc(result.num_cached_tokens)
        return result.first_token

    async def _remote_stream(
        self, handle: Any, method: str, msg: Any, req_id: str, worker_id: str,
        on_first: Callable[[Reservation, KVWrite], Awaitable[int]] | None = None,
    ) -> AsyncIterator[OutputChunk]:
        """Start ``method`` on one worker with this ingress's feed and yield the request's chunks from the feed.
        With ``on_first`` the call opens with a ``Reservation``, handed to ``on_first`` (the prefill), whose first
        token the first chunk must carry. Whatever ends the stream early, the request is aborted on the worker
        (unless it died), which also frees a reservation."""
        inbox = self.feeds.subscribe(worker_id, handle, req_id)  # before the call: no chunk can come first
        # a reservation's transfer id is ours: we can name it in the abort even if the reservation never reached us
        transfer_id = f"{req_id}#{uuid.uuid4().hex[:12]}" if on_first is not None else None
        args = (msg, self.feeds.feed_id) if transfer_id is None else (msg, self.feeds.feed_id, transfer_id)
        call = getattr(self._streaming(handle), method).remote(*args)
        finished = died = False
        watcher = None
        write = KVWrite()
        try:
            if on_first is not None:
                try:
                    reservation = await self._unless_dead(worker_id, call.__anext__(), self.call_timeout_s)
                except Exception as e:
                    died = is_worker_death(e)
                    self.note_failure(worker_id, e)
                    reason = "decode_busy" if isinstance(e, WorkerBusy) else "reserve_failed"
                    raise RetryableError(reason, worker_id, e, self.call_timeout_s) from e
                first_token = await on_first(reservation, write)
            watcher = asyncio.ensure_future(_watch(call, inbox, worker_id))
            while not finished:
                chunk = await inbox.get()
                if isinstance(chunk, BaseException):
                    raise chunk
                if on_first is not None and chunk.new_token_ids and chunk.num_output_tokens == len(chunk.new_token_ids):
                    if chunk.new_token_ids[0] != first_token:  # what P sampled must be what D starts from
                        raise RuntimeError(f"{req_id}: {worker_id} started from token {chunk.new_token_ids[0]}, the prefill sampled {first_token}")
                finished = chunk.finished
                yield chunk
        except RetryableError:
            raise
        except Exception as e:
            died = is_worker_death(e)
            self.note_failure(worker_id, e)
            raise
        finally:
            inbox.close()
            if watcher is not None:
                watcher.cancel()
            if not finished:
                cancel_call(call)
                if not died:
                    await self.abort(handle, worker_id, req_id, transfer_id if write.settled else None)

    async def abort(self, handle: Any, worker_id: str, req_id: str, settled_transfer_id: str | None = None) -> None:
        """Free everything ``req_id`` holds on the worker (its reservation or its sequence), detached from the caller.
        ``settled_transfer_id``: its reservation, when no write into it can land (the worker frees it at once)."""
        args = (req_id,) if settled_transfer_id is None else (req_id, settled_transfer_id)
        await self.janitor.run("abort", f"{req_id} on {worker_id}", lambda: _as_awaitable(handle.abort.remote(*args)))


@dataclass(slots=True)
class KVWrite:
    """One attempt's prefill write into a decode worker's reservation, as far as the router knows."""

    asked: bool = False  # the prefill worker was called (it may be writing)
    done: bool = False  # it can no longer write: its write completed, or it died

    @property
    def settled(self) -> bool:
        """No write into the reservation can land any more (none was asked for, or it completed)."""
        return not self.asked or self.done


async def _watch(call: Any, inbox: Subscription, worker_id: str) -> None:
    """Wait for the end of a request's own call (its chunks come on the feed): its error goes to the request's
    inbox; a call that ended well must see its last chunk come on the feed within ``FEED_END_GRACE_S``."""
    try:
        async for _ in call:
            pass
    except Exception as e:
        inbox.put(e)
        return
    await asyncio.sleep(FEED_END_GRACE_S)
    inbox.put(FeedEnded(f"{worker_id} finished {inbox.req_id}, but its last tokens never came on the token feed"))


def _consume_outcome(task: asyncio.Future) -> None:
    """Read an abandoned task's outcome, so asyncio does not log it as an exception nobody retrieved."""
    if not task.cancelled():
        task.exception()


async def _as_awaitable(call: Any) -> Any:
    return await call

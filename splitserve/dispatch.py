"""One attempt at serving a request on the workers a decision names: reserve, prefill, transfer, stream.

``Dispatcher.attempt(req, decision, resume)`` yields the worker's chunks:

* remote prefill: reserve blocks on D (``WorkerBusy``: back-pressure), prefill on
  P, which writes the KV into them over NIXL, then stream ``generate_prefilled``
  from D;
* local: stream ``generate`` from the one worker (aggregated, conditional
  disaggregation, a fallback, or a prefill worker in degraded mode);
* resumed: stream ``resume`` from the one worker (a migration, ``ResumeRequest``).

Failures before the stream are raised as ``RetryableError`` (the router picks
another pair). Every remote call is bounded by a timeout. Nothing leaks: a
reservation whose answer never came, or whose prefill failed, is released; a
stream that ends before its last chunk (the client left, the request was
cancelled, the worker failed) aborts the request on its worker. Those cleanup
calls go through the ``Janitor``: detached from the cancellation that caused
them, so they land even when Ray Serve cancels everything the HTTP request
started. A worker found dead gets no cleanup call (there is nothing left to
free), and is reported to the registry so routing avoids it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from splitserve.cleanup import Janitor
from splitserve.engine.worker_messages import ResumeRequest
from splitserve.failures import describe, is_worker_death
from splitserve.metrics import Metrics
from splitserve.scheduler import PairDecision, QueueWaitEstimator, WorkerBusy
from splitserve.scheduler.worker_registry import WorkerRegistry

if TYPE_CHECKING:
    from splitserve.router import RoutedRequest

logger = logging.getLogger(__name__)


class WorkerDied(RuntimeError):
    """A call gave up on a worker that another call found dead (``failures.is_worker_death`` knows the name)."""


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
    ) -> AsyncIterator[dict[str, Any]]:
        d_id, p_id = decision.decode_worker_id, decision.prefill_worker_id
        d = self.registry.handle(d_id)
        if resume is not None:
            assert p_id is None, decision
            self.metrics.routed.labels(d_id, "resume").inc()
            self._dispatched(d_id, len(resume.prompt_token_ids) + len(resume.output_token_ids))
            async with contextlib.aclosing(self._remote_stream(d, "resume", resume, resume.req_id, d_id)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        body = {"req_id": req.req_id, "prompt_token_ids": req.prompt_token_ids, "sampling": req.params.to_dict(), "priority": req.priority}
        if p_id is None:
            self.metrics.routed.labels(d_id, "local").inc()
            self._dispatched(d_id, len(req.prompt_token_ids))
            async with contextlib.aclosing(self._remote_stream(d, "generate", body, req.req_id, d_id)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        dst = await self._reserve(d, d_id, req)
        self.metrics.routed.labels(d_id, "decode").inc()
        self.metrics.routed.labels(p_id, "prefill").inc()
        result = await self._prefill(p_id, d, d_id, body, dst)
        self.metrics.transfer_bytes.inc(result["transfer_bytes"])
        self.metrics.transfer_seconds.observe(result["transfer_s"])
        if result.get("num_cached_tokens"):
            self.metrics.prefix_cached_tokens.inc(result["num_cached_tokens"])
        body["first_token"] = result["first_token"]
        async with contextlib.aclosing(self._remote_stream(d, "generate_prefilled", body, req.req_id, d_id)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _unless_dead(self, worker_id: str, call: Any, timeout_s: float | None) -> Any:
        """Await ``call`` for at most ``timeout_s``, and no longer once another call found ``worker_id`` dead
        (Serve holds calls to a killed replica until its replacement is up: tens of seconds)."""
        task = asyncio.ensure_future(_as_awaitable(call))
        dead = self.registry.death_signal(worker_id)
        try:
            done, _ = await asyncio.wait({task, dead}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                _cancel(call)
        if task in done:
            return task.result()
        if dead in done:
            raise WorkerDied(f"{worker_id} died while this call waited for it")
        raise asyncio.TimeoutError()

    async def _reserve(self, d: Any, d_id: str, req: RoutedRequest) -> dict[str, Any]:
        try:
            return await self._unless_dead(d_id, d.reserve_for.remote(req.req_id, req.prompt_token_ids), self.call_timeout_s)
        except BaseException as e:
            if not isinstance(e, (WorkerBusy, ValueError)) and not is_worker_death(e):
                # no answer (timeout, cancelled, worker error): D may still make the reservation after we
                # stopped waiting, and nobody would claim it; the release is queued behind it and undoes it
                await self.release(d, d_id, req.req_id)
            if not isinstance(e, Exception):
                raise
            self.note_failure(d_id, e)
            reason = "decode_busy" if isinstance(e, WorkerBusy) else "reserve_failed"
            raise RetryableError(reason, d_id, e, self.call_timeout_s) from e

    async def _prefill(self, p_id: str, d: Any, d_id: str, body: dict[str, Any], dst: dict[str, Any]) -> dict[str, Any]:
        p = self.registry.handle(p_id)
        self._dispatched(p_id, len(body["prompt_token_ids"]))
        call = p.prefill.remote({**body, "decode_worker_id": d_id, "dst_block_ids": dst["block_ids"],
                                 "dst_num_cached_blocks": dst["num_cached_blocks"]})
        try:
            return await self._unless_dead(p_id, call, self.prefill_timeout_s)
        except BaseException as e:
            _cancel(call)
            await self.release(d, d_id, body["req_id"])
            if not isinstance(e, Exception):
                raise
            self.note_failure(p_id, e)
            raise RetryableError("prefill_failed", p_id, e, self.prefill_timeout_s) from e

    async def _remote_stream(self, handle: Any, method: str, msg: Any, req_id: str, worker_id: str) -> AsyncIterator[dict[str, Any]]:
        gen = getattr(handle.options(stream=True), method).remote(msg)
        finished = died = False
        try:
            waiting = self._unless_dead(worker_id, gen.__anext__(), None)  # the first chunk: unless it died meanwhile
            while True:
                try:
                    chunk = await waiting
                except StopAsyncIteration:
                    break
                finished = chunk["finished"]
                yield chunk
                waiting = gen.__anext__()
        except Exception as e:
            died = is_worker_death(e)
            self.note_failure(worker_id, e)
            raise
        finally:
            if not finished:
                _cancel(gen)
                if not died:
                    await self.abort(handle, worker_id, req_id)

    async def release(self, handle: Any, worker_id: str, req_id: str) -> None:
        await self.janitor.run("release", f"{req_id} on {worker_id}", lambda: _as_awaitable(handle.release.remote(req_id)))

    async def abort(self, handle: Any, worker_id: str, req_id: str) -> None:
        await self.janitor.run("abort", f"{req_id} on {worker_id}", lambda: _as_awaitable(handle.abort.remote(req_id)))


async def _as_awaitable(call: Any) -> Any:
    return await call


def _cancel(call: Any) -> None:
    cancel = getattr(call, "cancel", None)
    if cancel is not None:
        try:
            cancel()
        except Exception:
            pass

"""One request's journey through the workers: pick a pair, reserve, prefill, transfer, decode.

``Router.stream(req)`` yields the decode worker's chunks (dicts with new token ids
and text). Disaggregated: reserve blocks on D (back-pressure: ``WorkerBusy``
moves on to another D), prefill on P which writes the KV into D's blocks over
NIXL, then stream from D. Aggregated, or when the policy prefers local prefill:
stream ``generate`` from one worker.

Failures never hang and never leak: every remote call is bounded by a timeout;
a failed prefill or transfer releases D's reservation and the request is retried
on another pair (the failed worker excluded) up to ``max_attempts``, and the last
attempt prefills on the decode worker itself. When the decode workers refuse for
lack of room (``WorkerBusy``) until none is left, the request ends with
``NoWorkerAvailable`` (back-pressure, HTTP 503), not a failure. A reservation
whose answer never came (timeout, cancellation) is released all the same, since
D may still make it after the caller stopped waiting. A decode worker that fails before
the first token is retried elsewhere; after tokens were streamed the error ends
the stream. A consumer that stops early (client gone) cancels the remote stream
and aborts the request on D, which frees its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from splitserve.engine.block_pool import compute_block_hashes
from splitserve.engine.sampling_params import SamplingParams
from splitserve.metrics import Metrics
from splitserve.scheduler import (
    LeastLoadedPolicy, NoWorkerAvailable, PairDecision, PairingPolicy, PairRequest, WorkerBusy, WorkerLoad,
)
from splitserve.scheduler.worker_registry import WorkerRegistry, _call

logger = logging.getLogger(__name__)


@dataclass
class RoutedRequest:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    tenant: str | None = None
    arrival: float = field(default_factory=time.monotonic)
    block_hashes: list[int] | None = None  # computed by the router when workers report prefix caches


class RequestFailed(RuntimeError):
    """The request could not be served (all attempts failed); the message says why."""


class Router:
    def __init__(
        self, registry: WorkerRegistry, metrics: Metrics, *, mode: str, policy: PairingPolicy | None = None,
        max_attempts: int = 3, prefill_timeout_s: float = 120.0, call_timeout_s: float = 10.0,
    ):
        self.registry = registry
        self.metrics = metrics
        self.mode = mode
        self.policy = policy or LeastLoadedPolicy()
        self.max_attempts = max_attempts
        self.prefill_timeout_s = prefill_timeout_s
        self.call_timeout_s = call_timeout_s

    def _pair_request(self, req: RoutedRequest, loads: list[WorkerLoad]) -> PairRequest:
        return PairRequest(
            req.req_id, len(req.prompt_token_ids), req.params.max_tokens, block_hashes=self._block_hashes(req, loads),
            priority=req.priority, tenant=req.tenant,
        )

    @staticmethod
    def _block_hashes(req: RoutedRequest, loads: list[WorkerLoad]) -> list[int]:
        """The prompt's chained block hashes (the engine's own), once per request; [] while no worker reports a cache."""
        if req.block_hashes is None:
            if not any(w.prefix_hashes for w in loads):
                return []
            req.block_hashes = compute_block_hashes(req.prompt_token_ids, loads[0].block_size)
        return req.block_hashes

    def check_capacity(self, req: RoutedRequest) -> None:
        """Raise ``NoWorkerAvailable`` now if no worker could take ``req`` (lets HTTP answer 503 before streaming)."""
        loads = self.registry.loads()
        self.policy.pick(self._pair_request(req, loads), loads, frozenset())

    def _pick(self, req: RoutedRequest, exclude: set[str], force_local: bool) -> PairDecision:
        loads = self.registry.loads()
        pair_req = self._pair_request(req, loads)
        if force_local:
            loads = [w for w in loads if w.worker_id not in self.registry.prefill]
        decision = self.policy.pick(pair_req, loads, frozenset(exclude))
        self.registry.view.reserve_decision(decision, pair_req)
        return decision

    async def stream(self, req: RoutedRequest) -> AsyncIterator[dict[str, Any]]:
        exclude: set[str] = set()
        last_error: BaseException | None = None
        for attempt in range(1, self.max_attempts + 1):
            force_local = attempt == self.max_attempts and attempt > 1
            try:
                decision = self._pick(req, exclude, force_local)
            except NoWorkerAvailable as e:
                if last_error is None:
                    raise
                if isinstance(last_error, WorkerBusy):  # the decode workers left are full: back-pressure (503), not a failure
                    raise NoWorkerAvailable(f"{e}; last refusal: {last_error}", retry_after_s=e.retry_after_s) from last_error
                raise RequestFailed(f"request {req.req_id} failed after {attempt - 1} attempt(s): {last_error}") from last_error
            yielded = False
            try:
                async with contextlib.aclosing(self._attempt(req, decision)) as chunks:
                    async for chunk in chunks:
                        yielded = True
                        yield chunk
                return
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except _RetryableError as e:
                last_error = e.cause
                exclude.add(e.worker_id)
                self.metrics.retries.labels(e.reason).inc()
                logger.warning("request %s attempt %d failed (%s on %s): %r", req.req_id, attempt, e.reason, e.worker_id, e.cause)
            except Exception as e:
                if yielded:
                    raise RequestFailed(f"request {req.req_id} failed while streaming from {decision.decode_worker_id}: {e}") from e
                last_error = e
                exclude.add(decision.decode_worker_id)
                self.metrics.retries.labels("decode_failed").inc()
                logger.warning("request %s attempt %d failed on decode %s: %r", req.req_id, attempt, decision.decode_worker_id, e)
        if isinstance(last_error, WorkerBusy):
            raise NoWorkerAvailable(f"request {req.req_id}: no decode worker had room: {last_error}") from last_error
        raise RequestFailed(f"request {req.req_id} failed after {self.max_attempts} attempts: {last_error}") from last_error

    async def _attempt(self, req: RoutedRequest, decision: PairDecision) -> AsyncIterator[dict[str, Any]]:
        d_id, p_id = decision.decode_worker_id, decision.prefill_worker_id
        d = self.registry.handle(d_id)
        sampling = req.params.to_dict()
        body = {"req_id": req.req_id, "prompt_token_ids": req.prompt_token_ids, "sampling": sampling, "priority": req.priority}
        if p_id is None:
            self.metrics.routed.labels(d_id, "local").inc()
            async with contextlib.aclosing(self._remote_stream(d, "generate", body, d_id)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        try:
            dst = await asyncio.wait_for(_call(d.reserve_for, req.req_id, req.prompt_token_ids), self.call_timeout_s)
        except BaseException as e:
            if not isinstance(e, (WorkerBusy, ValueError)):
                # no answer (timeout, cancelled, worker error): D may still make the reservation after we
                # stopped waiting, and nobody would claim it; the release is queued behind it and undoes it
                await _release_quietly(d, req.req_id)
            if not isinstance(e, Exception):
                raise
            raise _RetryableError("decode_busy" if isinstance(e, WorkerBusy) else "reserve_failed", d_id, e) from e
        self.metrics.routed.labels(d_id, "decode").inc()
        self.metrics.routed.labels(p_id, "prefill").inc()
        p = self.registry.handle(p_id)
        prefill_call = p.prefill.remote({**body, "decode_worker_id": d_id, "dst_block_ids": dst["block_ids"],
                                         "dst_num_cached_blocks": dst["num_cached_blocks"]})
        try:
            result = await asyncio.wait_for(_as_awaitable(prefill_call), self.prefill_timeout_s)
        except BaseException as e:
            _cancel(prefill_call)
            await _release_quietly(d, req.req_id)
            if isinstance(e, (asyncio.CancelledError, GeneratorExit)):
                raise
            raise _RetryableError("prefill_failed", p_id, e) from e
        self.metrics.transfer_bytes.inc(result["transfer_bytes"])
        self.metrics.transfer_seconds.observe(result["transfer_s"])
        if result.get("num_cached_tokens"):
            self.metrics.prefix_cached_tokens.inc(result["num_cached_tokens"])
        body["first_token"] = result["first_token"]
        async with contextlib.aclosing(self._remote_stream(d, "generate_prefilled", body, d_id)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _remote_stream(self, handle: Any, method: str, body: dict, worker_id: str) -> AsyncIterator[dict[str, Any]]:
        gen = getattr(handle.options(stream=True), method).remote(body)
        finished = False
        try:
            async for chunk in gen:
                finished = chunk["finished"]
                yield chunk
        finally:
            if not finished:
                _cancel(gen)
                await _abort_quietly(handle, body["req_id"])


class _RetryableError(Exception):
    def __init__(self, reason: str, worker_id: str, cause: BaseException):
        super().__init__(f"{reason} on {worker_id}: {cause!r}")
        self.reason, self.worker_id, self.cause = reason, worker_id, cause


async def _as_awaitable(call: Any) -> Any:
    return await call


def _cancel(call: Any) -> None:
    cancel = getattr(call, "cancel", None)
    if cancel is not None:
        try:
            cancel()
        except Exception:
            pass


async def _release_quietly(handle: Any, req_id: str) -> None:
    try:
        await asyncio.shield(asyncio.wait_for(_call(handle.release, req_id), 10.0))
    except BaseException as e:  # the reaper on D frees it eventually
        logger.warning("release of %s failed: %r", req_id, e)


async def _abort_quietly(handle: Any, req_id: str) -> None:
    try:
        await asyncio.shield(asyncio.wait_for(_call(handle.abort, req_id), 10.0))
    except BaseException as e:
        logger.warning("abort of %s failed: %r", req_id, e)

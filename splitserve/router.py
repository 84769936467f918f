"""One request's journey through the workers: admit, pick a pair, try, retry, migrate.

``Router.stream(req)`` yields the worker's chunks (dicts with new token ids and
text). Each attempt (``splitserve.dispatch``) reserves on a decode worker,
prefills on a prefill worker that writes the KV over NIXL, and streams from the
decode worker; or streams ``generate`` from one worker when the policy prefers
local prefill.

Admission by deadline: ``check_capacity`` (called before a stream starts)
refuses a request with ``NoWorkerAvailable`` (HTTP 503 + Retry-After) when no
worker can take it, and with ``QueueWaitTooLong`` when it would queue longer
than ``max_queue_wait_s`` before its prefill starts (``QueueWaitEstimator``).

Failures never hang and never leak. Before the first chunk, a failed attempt is
retried on another pair with the failed worker excluded, up to
``max_attempts``; the last attempt prefills on the decode worker itself. When
the decode workers refuse for lack of room (``WorkerBusy``) until none is left,
the request ends with ``NoWorkerAvailable`` (back-pressure), not a failure.
After the first chunk, a worker failure is a *migration*
(``splitserve.migration``): the request resumes on another worker from prompt +
the tokens already streamed, up to ``migration_limit`` times; the client's
stream goes on. When a whole role is down the policy lets the other role serve
whole requests (degraded mode). Every departure from the normal path (local
prefill for want of a prefill worker, degraded mode, retries, migrations) is
counted by reason in ``splitserve_fallbacks_total`` and in ``fallback_counts``
(shown by ``/admin/workers``). Error messages name the role and worker and the
cause in one line, never a remote traceback (``splitserve.failures``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from splitserve.cleanup import Janitor
from splitserve.dispatch import Dispatcher, RetryableError
from splitserve.engine.block_pool import compute_block_hashes
from splitserve.engine.sampling_params import SamplingParams
from splitserve.worker_messages import OutputChunk, ResumeRequest
from splitserve.failures import describe
from splitserve.metrics import Metrics
from splitserve.migration import NotMigrated, StreamBroken, StreamProgress, plan_migration
from splitserve.scheduler import (
    Fallback, LeastLoadedPolicy, NoWorkerAvailable, PairDecision, PairingPolicy, PairRequest, QueueWaitEstimator,
    Reservation, ServingState, WorkerBusy, WorkerLoad, serving_state,
)
from splitserve.scheduler.worker_registry import WorkerRegistry

logger = logging.getLogger(__name__)

CLEANUP_TIMEOUT_S = 90.0


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
        max_attempts: int = 3, prefill_timeout_s: float = 120.0, call_timeout_s: float = 10.0, migration_limit: int = 3,
        max_queue_wait_s: float | None = None,
    ):
        self.registry = registry
        self.metrics = metrics
        self.mode = mode
        self.policy = policy or LeastLoadedPolicy()
        self.max_attempts = max_attempts
        self.migration_limit = migration_limit
        self.fallback_counts: Counter[str] = Counter()
        self.num_migrations = 0
        self.in_flight: dict[str, StreamProgress] = {}  # by request id, while it streams (``/admin/requests``)
        self.admission = QueueWaitEstimator(max_queue_wait_s)
        registry.report_hooks.append(self._on_report)
        # cleanups run detached (callers wait 2 s at most), so they may wait out a replica restart: a call to a
        # killed replica is held by Serve until its replacement answers it (which holds nothing to free)
        self.janitor = Janitor(timeout_s=CLEANUP_TIMEOUT_S, on_failure=lambda kind: metrics.cleanup_failures.labels(kind).inc())
        self.dispatch = Dispatcher(
            registry, metrics, self.janitor, prefill_timeout_s=prefill_timeout_s, call_timeout_s=call_timeout_s,
            admission=self.admission,
        )

    def _on_report(self, worker_id: str, report: dict[str, Any]) -> None:
        self.admission.on_report(worker_id, report["num_queued_tokens"], time.monotonic())

    def _fallback(self, reason: Fallback | str) -> None:
        label = reason.value if isinstance(reason, Fallback) else reason
        self.fallback_counts[label] += 1
        self.metrics.fallbacks.labels(label).inc()

    # ---- what the operator sees ----------------------------------------------------
    def serving_state(self) -> ServingState:
        """ok / degraded (which role is missing, who stands in) / unavailable, from the healthy workers."""
        return serving_state(
            self.registry.loads(), num_prefill_expected=len(self.registry.prefill) or int(self.mode == "disaggregated"),
            degraded_mode=getattr(self.policy, "degraded_mode", False),
        )

    def summary(self) -> dict[str, Any]:
        """The router's side of ``/admin/workers``: serving state, fallbacks by reason, migrations, cleanups, admission."""
        state = self.serving_state()
        rates = {w: self.admission.tokens_per_s(w) for w in self.registry.prefill | self.registry.decode}
        return {
            "serving": {"status": state.status, "detail": state.detail},
            "fallbacks": dict(sorted(self.fallback_counts.items())),
            "migrations": self.num_migrations,
            "workers_found_dead": dict(sorted(self.registry.num_deaths_seen.items())),  # calls that found each dead
            "cleanup": {"started": self.janitor.num_started, "failed": self.janitor.num_failed, "pending": self.janitor.num_pending},
            "admission": {
                "max_queue_wait_s": self.admission.max_queue_wait_s,
                "prefill_tokens_per_s": {w: round(r, 1) for w, r in sorted(rates.items()) if r is not None},
            },
        }

    def in_flight_view(self, limit: int = 100) -> dict[str, Any]:
        """``/admin/requests``: this ingress replica's requests in flight, oldest first, and where each streams now."""
        now = time.monotonic()
        oldest = sorted(self.in_flight.items(), key=lambda item: item[1].started)[:limit]
        return {
            "num_in_flight": len(self.in_flight),
            "requests": [
                {
                    "req_id": req_id, "age_s": round(now - p.started, 3), "num_output_tokens": len(p.output_token_ids),
                    "decode_worker_id": p.worker_ids[-1] if p.worker_ids else None,  # None until its first token
                    "migrations": p.num_migrations,
                }
                for req_id, p in oldest
            ],
        }

    # ---- choosing workers --------------------------------------------------------
    def _pair_request(self, req: RoutedRequest, loads: list[WorkerLoad], resume: ResumeRequest | None = None,
                      local_only: bool = False) -> PairRequest:
        if resume is not None:  # prompt + streamed tokens, prefilled where it decodes
            n = len(resume.prompt_token_ids) + len(resume.output_token_ids)
            return PairRequest(resume.req_id, n, req.params.max_tokens, priority=req.priority, tenant=req.tenant, local_only=True)
        return PairRequest(
            req.req_id, len(req.prompt_token_ids), req.params.max_tokens, block_hashes=self._block_hashes(req, loads),
            priority=req.priority, tenant=req.tenant, local_only=local_only,
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
        """Raise ``NoWorkerAvailable`` now if no worker could take ``req``, ``QueueWaitTooLong`` if it would wait
        past the budget (lets HTTP answer 503 before streaming)."""
        loads = self._loads()
        decision = self.policy.pick(self._pair_request(req, loads), loads, frozenset())
        prefiller = decision.prefill_worker_id or decision.decode_worker_id
        ahead = next((w.num_queued_tokens for w in loads if w.worker_id == prefiller), 0)
        self.admission.check(prefiller, ahead)

    def _loads(self) -> list[WorkerLoad]:
        """The registry's loads with the prefill rates admission measured (the policy's SLO rule reads them)."""
        return [replace(w, prefill_tokens_per_s=self.admission.tokens_per_s(w.worker_id)) for w in self.registry.loads()]

    def _pick(
        self, req: RoutedRequest, exclude: set[str], local_only: bool, resume: ResumeRequest | None,
    ) -> tuple[PairDecision, Reservation]:
        """The pair for this attempt; its decode blocks stay charged to the load view until the attempt ends (``LoadView.release``)."""
        loads = self._loads()
        pair_req = self._pair_request(req, loads, resume, local_only)
        decision = self.policy.pick(pair_req, loads, frozenset(exclude))
        reservation = self.registry.view.reserve_decision(decision, pair_req)
        if decision.fallback is not None:
            self._fallback(decision.fallback)
        elif local_only and resume is None:
            self._fallback(Fallback.RETRY_LOCAL_PREFILL)
        return decision, reservation

    # ---- serving -----------------------------------------------------------------
    async def stream(self, req: RoutedRequest) -> AsyncIterator[OutputChunk]:
        """The request's chunks; a stream broken after its first chunk resumes on another worker (``plan_migration``).
        Listed in ``in_flight`` (``/admin/requests``) until it ends, however it ends."""
        progress = self.in_flight[req.req_id] = StreamProgress()
        resume: ResumeRequest | None = None
        exclude: set[str] = set()
        try:
            while True:
                try:
                    async with contextlib.aclosing(self._attempts(req, exclude, progress, resume)) as chunks:
                        async for chunk in chunks:
                            progress.record(chunk)
                            yield chunk
                    return
                except StreamBroken as broken:
                    resume = self._plan_migration(req, progress, broken)
                    exclude = {broken.worker_id}
        finally:
            self.in_flight.pop(req.req_id, None)

    def _plan_migration(self, req: RoutedRequest, progress: StreamProgress, broken: StreamBroken) -> ResumeRequest:
        """The resumed request for a broken stream (counted and logged), or ``RequestFailed`` saying why not."""
        try:
            resume = plan_migration(req.req_id, req.prompt_token_ids, req.params, req.priority, progress, broken, self.migration_limit)
        except NotMigrated as e:
            raise RequestFailed(str(e)) from broken.cause
        self.num_migrations += 1
        self.metrics.migrations.inc()
        self._fallback(Fallback.MIGRATION)
        logger.warning(
            "request %s: %s failed after %d streamed tokens (%s); resuming elsewhere (migration %d of at most %d)",
            req.req_id, broken.worker_id, len(progress.output_token_ids), describe(broken.cause),
            progress.num_migrations, self.migration_limit,
        )
        return resume

    async def _attempts(
        self, req: RoutedRequest, exclude: set[str], progress: StreamProgress, resume: ResumeRequest | None,
    ) -> AsyncIterator[OutputChunk]:
        """Try pairs until one streams; raises ``StreamBroken`` when the one streaming fails after its first chunk."""
        last_error: BaseException | None = None
        for attempt in range(1, self.max_attempts + 1):
            local_only = resume is not None or (attempt == self.max_attempts and attempt > 1)
            try:
                decision, reservation = self._pick(req, exclude, local_only, resume)
            except NoWorkerAvailable as e:
                if last_error is None:
                    raise
                if _is_busy(last_error):  # the decode workers left are full: back-pressure (503), not a failure
                    raise NoWorkerAvailable(f"{e}; last refusal: {last_error}", retry_after_s=e.retry_after_s) from last_error
                raise RequestFailed(f"request {req.req_id} failed after {attempt - 1} attempt(s): {_last(last_error)}") from last_error
            yielded = False
            try:
                async with contextlib.aclosing(self.dispatch.attempt(req, decision, resume)) as chunks:
                    async for chunk in chunks:
                        if not yielded:
                            progress.worker_ids.append(decision.decode_worker_id)
                        yielded = True
                        yield chunk
                return
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except RetryableError as e:
                last_error = e
                exclude.add(e.worker_id)
                self.metrics.retries.labels(e.reason).inc()
                self._fallback(f"retry_{e.reason}")
                logger.warning("request %s attempt %d failed: %s", req.req_id, attempt, e)
            except Exception as e:
                if yielded:
                    raise StreamBroken(decision.decode_worker_id, e) from e
                last_error = RetryableError("decode_failed", decision.decode_worker_id, e)
                exclude.add(decision.decode_worker_id)
                self.metrics.retries.labels("decode_failed").inc()
                self._fallback("retry_decode_failed")
                logger.warning("request %s attempt %d failed: %s", req.req_id, attempt, last_error)
            finally:  # however the attempt ended, its blocks are free again on the worker (or were never taken)
                self.registry.view.release(reservation)
        if _is_busy(last_error):
            raise NoWorkerAvailable(f"request {req.req_id}: no decode worker had room: {last_error}") from last_error
        raise RequestFailed(f"request {req.req_id} failed after {self.max_attempts} attempts: {_last(last_error)}") from last_error


def _is_busy(error: BaseException | None) -> bool:
    return isinstance(error, RetryableError) and isinstance(error.cause, WorkerBusy)


def _last(error: BaseException | None) -> str:
    return str(error) if isinstance(error, RetryableError) else describe(error) if error is not None else "no attempt made"

"""Least-loaded pairing with conditional disaggregation. Pure: no I/O, no clock.

``LeastLoadedPolicy.pick`` walks one request through four questions:

1. Which workers may take it?  Healthy ones not in ``exclude`` (ids that
   already failed this request). Decode-capable = ``DECODE`` or ``BOTH``.
2. Which decode worker?  One with room for the prompt plus one output token
   (``ceil((num_prompt_tokens + 1) / block_size)`` free blocks); among them the
   most free KV tokens, then fewest running + waiting, then the smallest id.
   None fits -> ``NoWorkerAvailable`` (back-pressure) or ``PromptTooLarge``.
3. Aggregated deployment (only ``BOTH`` workers, no prefill worker)?  Pick the
   ``BOTH`` worker with the least prefill work ahead of this request (its
   queued prompt tokens plus the part of this prompt it does not cache), then
   fewest active sequences, then most free KV, and prefill there.
4. Remote or local prefill (conditional disaggregation, as in Dynamo)?  The
   prefill worker is the one with the least prefill work ahead of this request
   (queued tokens + this prompt's tokens not in its prefix cache; then fewest
   waiting, then id): prefix-aware and load-aware in one number, so a worker
   holding a shared document wins until its queue outweighs the saving.
   Prefill locally on the decode worker when there is no
   prefill worker, when that least-queued one is past
   ``max_prefill_queue_tokens`` (so all are), or when the part of the prompt
   the decode worker would have to compute itself -- prompt length minus the
   longest cached prefix it holds -- is ``<= local_prefill_threshold_tokens``,
   or when that part, behind the prompt tokens already queued there, would be
   prefilled within ``local_prefill_budget_s`` at the measured cost of a prompt
   token (the decode worker's own, else the prefill worker's: the same model).
   That is a length threshold in time rather than tokens, so it fits any
   hardware: a prompt this short costs the running streams one slightly longer
   step, less than the prefill call, the KV transfer and its notification
   would cost this request. The measured cost is a step's time over its tokens,
   the step's fixed cost spread over them, which is more than a prompt adds to
   a decode step it joins (that step pays the fixed cost anyway), so the rule
   errs toward remote prefill; it blends steps of every size, so it is a
   rough figure. Until a worker has measured it the rule does not apply.
   Workers report it with their load; prompts sent here join the decode
   worker's queue in the router's view at once, so a burst of short prompts
   fills the budget and the rest go remote.
5. With SLO targets (``ttft_target_s``, ``itl_target_s``): prefill locally when the
   prefill worker would start this prompt too late -- its queued tokens plus this
   prompt's, at its measured rate, take longer than the TTFT target -- and the
   decode worker would finish it sooner (its own queue plus this prompt at its
   rate; an unmeasured decode worker is assumed as fast as the prefill worker),
   *unless* the decode worker's recent decoding steps already take more than half
   the ITL target (a local prefill lengthens every running stream's steps). So the
   split bends toward aggregated serving under prefill pressure and straightens
   again when decoding has no room: Dynamo's conditional disaggregation, driven by
   the SLOs and the measured queues instead of a fixed length threshold.

The prefix overlap that decides (4) is measured on the *decode* worker: it is
the cost of the local alternative. A prompt fully cached on a prefill worker
but not on the decode worker is still expensive to prefill locally, so the
prefill worker's cache argues for remote prefill, never for local.
Workers that report no prefix summary count as caching nothing, which reduces
every choice to plain least-loaded.

When a whole role is down the other one serves whole requests (degraded
aggregated mode): with no healthy prefill worker the decode worker prefills
locally, and with no healthy decode worker a prefill worker prefills *and*
decodes (``degraded_mode``, on by default). A decode worker that is healthy but
excluded (full, or it failed this request) is busy, not down: back-pressure. Every such
departure from the normal path carries a ``Fallback`` tag on its decision so
the router can count it. ``PairRequest.local_only`` (a retry's last attempt, a
request resumed after its decode worker died) skips the prefill worker.

``priority`` and ``tenant`` are carried but not used here; a priority-aware
policy implements the same ``pick`` signature.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from splitserve.scheduler.types import (
    Fallback,
    NoWorkerAvailable,
    PairDecision,
    PairRequest,
    PromptTooLarge,
    ServingState,
    WorkerLoad,
    WorkerRole,
)

_DECODE_ROLES = (WorkerRole.DECODE, WorkerRole.BOTH)


def blocks_needed(num_prompt_tokens: int, block_size: int) -> int:
    """KV blocks a decode worker must have free: the prompt plus one output token."""
    assert block_size > 0, block_size
    return (num_prompt_tokens + block_size) // block_size  # == ceil((n + 1) / block_size)


def cached_prefix_tokens(
    block_hashes: Sequence[int],
    held_hashes: frozenset[int],
    block_size: int,
    num_prompt_tokens: int,
) -> int:
    """Prompt tokens covered by the longest prefix of ``block_hashes`` found in ``held_hashes``.

    Block hashes are chained (each covers its whole prefix), so matching stops
    at the first miss: a later hit cannot be reused without the blocks before it.
    """
    num_hit_blocks = 0
    for block_hash in block_hashes:
        if block_hash not in held_hashes:
            break
        num_hit_blocks += 1
    return min(num_hit_blocks * block_size, num_prompt_tokens)


def serving_state(loads: Sequence[WorkerLoad], *, num_prefill_expected: int, degraded_mode: bool = True) -> ServingState:
    """What the deployment can do with the healthy workers in ``loads`` (``/health``, ``/admin/workers``).

    ``num_prefill_expected``: prefill workers the deployment was configured with (0 when aggregated).
    """
    healthy = [w for w in loads if w.is_healthy]
    num_decoders = _count(healthy, lambda w: w.role in _DECODE_ROLES)
    num_prefillers = _count(healthy, lambda w: w.role == WorkerRole.PREFILL)
    if num_decoders and (num_prefillers or not num_prefill_expected):
        return ServingState("ok", f"{num_decoders} decode and {num_prefillers} prefill workers healthy")
    if num_decoders:
        return ServingState(
            "degraded", f"no healthy prefill worker (of {num_prefill_expected}): {num_decoders} decode workers prefill locally",
        )
    if num_prefillers and degraded_mode:
        return ServingState(
            "degraded", f"no healthy decode worker: {num_prefillers} prefill workers serve whole requests (prefill and decode)",
        )
    missing = "decode or prefill worker" if num_prefill_expected else "decode worker"
    return ServingState("unavailable", f"no healthy {missing}")


def _decode_key(load: WorkerLoad) -> tuple:
    return (-load.num_free_tokens, load.num_active, load.worker_id)


def uncached_prompt_tokens(request: PairRequest, load: WorkerLoad) -> int:
    """Prompt tokens ``load``'s worker would have to compute for ``request`` (the rest is in its prefix cache)."""
    n = request.num_prompt_tokens
    return n - cached_prefix_tokens(request.block_hashes, load.prefix_hashes, load.block_size, n)


def _prefill_key(request: PairRequest, load: WorkerLoad) -> tuple:
    return (load.num_queued_tokens + uncached_prompt_tokens(request, load), load.num_waiting, load.worker_id)


def _aggregated_key(request: PairRequest, load: WorkerLoad) -> tuple:
    work = load.num_queued_tokens + uncached_prompt_tokens(request, load)
    return (work, load.num_active, -load.num_free_tokens, load.worker_id)


def _count(loads: Iterable[WorkerLoad], predicate) -> int:
    return sum(1 for load in loads if predicate(load))


def _role_state(role: str, loads: Sequence[WorkerLoad], exclude: frozenset[str]) -> str:
    """``no healthy decode worker: 2 known, 1 unhealthy, 1 excluded after failures`` for one role."""
    roles = _DECODE_ROLES if role == "decode" else (WorkerRole.PREFILL,)
    known = [w for w in loads if w.role in roles]
    num_excluded = _count(known, lambda w: w.worker_id in exclude)
    num_unhealthy = _count(known, lambda w: not w.is_healthy and w.worker_id not in exclude)
    return (
        f"no healthy {role} worker: {len(known)} known, {num_unhealthy} unhealthy, "
        f"{num_excluded} excluded after failures"
    )


class LeastLoadedPolicy:
    """Default ``PairingPolicy``: least-loaded pairing with conditional disaggregation.

    ``local_prefill_threshold_tokens``: prefill on the decode worker when at
    most this many prompt tokens are not already cached there (0 = only when
    the decode worker holds the whole prompt).
    ``local_prefill_budget_s``: prefill on the decode worker when its queue plus
    the uncached part would take at most this long at the measured cost of a
    prompt token (0 = off).
    ``max_prefill_queue_tokens``: a prefill worker with more queued prompt
    tokens than this is saturated; when all are, prefill locally (None = no limit).
    ``retry_after_s``: the back-off hint carried by ``NoWorkerAvailable``.
    ``degraded_mode``: with no usable decode worker, a prefill worker serves
    whole requests (False: back-pressure instead).
    ``ttft_target_s`` / ``itl_target_s``: the SLOs of rule 5 (None: rule 5 off).
    """

    def __init__(
        self,
        local_prefill_threshold_tokens: int = 0,
        local_prefill_budget_s: float = 0.0,
        max_prefill_queue_tokens: int | None = None,
        retry_after_s: float = 1.0,
        degraded_mode: bool = True,
        ttft_target_s: float | None = None,
        itl_target_s: float | None = None,
    ) -> None:
        if local_prefill_threshold_tokens < 0:
            raise ValueError(
                f"local_prefill_threshold_tokens must be >= 0, got {local_prefill_threshold_tokens}"
            )
        if not local_prefill_budget_s >= 0:
            raise ValueError(f"local_prefill_budget_s must be >= 0 seconds (0 = off), got {local_prefill_budget_s}")
        if max_prefill_queue_tokens is not None and max_prefill_queue_tokens < 0:
            raise ValueError(
                f"max_prefill_queue_tokens must be >= 0 or None (no limit), got {max_prefill_queue_tokens}"
            )
        self.local_prefill_threshold_tokens = local_prefill_threshold_tokens
        self.local_prefill_budget_s = local_prefill_budget_s
        self.max_prefill_queue_tokens = max_prefill_queue_tokens
        self.retry_after_s = retry_after_s
        self.degraded_mode = degraded_mode
        self.ttft_target_s = ttft_target_s
        self.itl_target_s = itl_target_s

    def pick(
        self,
        request: PairRequest,
        loads: Sequence[WorkerLoad],
        exclude: frozenset[str] = frozenset(),
    ) -> PairDecision:
        """Choose the workers for ``request``; raise ``NoWorkerAvailable`` when none can take it."""
        assert request.num_prompt_tokens >= 1, request
        usable = [w for w in loads if w.is_healthy and w.worker_id not in exclude]
        decoders = [w for w in usable if w.role in _DECODE_ROLES]
        prefillers = [w for w in usable if w.role == WorkerRole.PREFILL]
        if not decoders:
            # a role is *down* when none of its workers is healthy; healthy ones excluded here (this request
            # failed on them, or they refused it for lack of room) are not down: back-pressure, not degraded mode
            if self.degraded_mode and prefillers and not any(w.is_healthy and w.role in _DECODE_ROLES for w in loads):
                return self._degraded(request, prefillers, loads, exclude)
            raise self._no_decoder(loads, exclude)

        fitting = [
            w for w in decoders
            if w.num_free_blocks >= blocks_needed(request.num_prompt_tokens, w.block_size)
        ]
        if not fitting:
            raise self._all_full(request, decoders)

        if not prefillers and all(w.role == WorkerRole.BOTH for w in fitting):
            chosen = min(fitting, key=lambda w: _aggregated_key(request, w))
            num_cached = request.num_prompt_tokens - uncached_prompt_tokens(request, chosen)
            return PairDecision(
                None,
                chosen.worker_id,
                f"aggregated: {chosen.worker_id} has the least prefill work ahead "
                f"({chosen.num_queued_tokens} queued tokens, {num_cached} of {request.num_prompt_tokens} "
                f"prompt tokens cached, {chosen.num_active} active, {chosen.num_free_blocks} free blocks) "
                f"of {len(fitting)} with room",
            )

        decoder = min(fitting, key=_decode_key)
        where = (
            f"decode on {decoder.worker_id} ({decoder.num_free_blocks} free blocks, "
            f"{decoder.num_active} active)"
        )
        if request.local_only:
            return PairDecision(None, decoder.worker_id, f"local prefill: asked for (retry or resumed request); {where}")
        if not prefillers:
            return PairDecision(
                None, decoder.worker_id, f"local prefill: no healthy prefill worker; {where}", Fallback.NO_PREFILL_WORKER,
            )

        limit = self.max_prefill_queue_tokens
        open_prefillers = [w for w in prefillers if limit is None or w.num_queued_tokens <= limit]
        if not open_prefillers:
            least = min(prefillers, key=lambda w: (w.num_queued_tokens, w.worker_id))
            return PairDecision(
                None,
                decoder.worker_id,
                f"local prefill: all {len(prefillers)} prefill workers saturated (least queued "
                f"{least.worker_id} has {least.num_queued_tokens} tokens > limit {limit}); {where}",
                Fallback.PREFILL_SATURATED,
            )
        prefiller = min(open_prefillers, key=lambda w: _prefill_key(request, w))

        num_uncached = uncached_prompt_tokens(request, decoder)
        num_cached = request.num_prompt_tokens - num_uncached
        threshold = self.local_prefill_threshold_tokens
        if num_uncached <= threshold:
            return PairDecision(
                None,
                decoder.worker_id,
                f"local prefill: {num_uncached} uncached prompt tokens <= threshold {threshold} "
                f"({num_cached} of {request.num_prompt_tokens} cached on {decoder.worker_id}); {where}",
            )
        short = self._short_enough_here(num_uncached, prefiller, decoder)
        if short is not None:
            return PairDecision(None, decoder.worker_id, f"local prefill: {short}; {where}")
        slo_local = self._slo_prefers_local(request, prefiller, decoder)
        if slo_local is not None:
            return PairDecision(None, decoder.worker_id, f"local prefill: {slo_local}; {where}", Fallback.SLO_LOCAL_PREFILL)
        prefill_cached = request.num_prompt_tokens - uncached_prompt_tokens(request, prefiller)
        return PairDecision(
            prefiller.worker_id,
            decoder.worker_id,
            f"remote prefill on {prefiller.worker_id} ({prefiller.num_queued_tokens} queued tokens, "
            f"{prefill_cached} prompt tokens cached there): "
            f"{num_uncached} uncached prompt tokens > threshold {threshold}; {where}",
        )

    def _short_enough_here(self, num_uncached: int, prefiller: WorkerLoad, decoder: WorkerLoad) -> str | None:
        """Rule 4's budget in time: why ``decoder`` should prefill these ``num_uncached`` tokens itself, or None."""
        budget = self.local_prefill_budget_s
        s_per_token = decoder.prompt_s_per_token or prefiller.prompt_s_per_token
        if not budget or not s_per_token:
            return None
        local_s = (decoder.num_queued_tokens + num_uncached) * s_per_token
        if local_s > budget:
            return None
        measured_on = decoder.worker_id if decoder.prompt_s_per_token else prefiller.worker_id
        return (
            f"{num_uncached} uncached prompt tokens (+{decoder.num_queued_tokens} queued) take ~{local_s * 1e3:.1f} ms here "
            f"at {s_per_token * 1e3:.3f} ms per prompt token (measured on {measured_on}) <= budget {budget * 1e3:g} ms"
        )

    def _slo_prefers_local(self, request: PairRequest, prefiller: WorkerLoad, decoder: WorkerLoad) -> str | None:
        """Rule 5: why this prompt should be prefilled on ``decoder`` to meet the TTFT target, or None."""
        if self.ttft_target_s is None or self.itl_target_s is None:
            return None
        remote_rate = prefiller.prefill_tokens_per_s
        if not remote_rate:  # not measured yet: no grounds to leave the normal path
            return None
        remote_s = (prefiller.num_queued_tokens + uncached_prompt_tokens(request, prefiller)) / remote_rate
        if remote_s <= self.ttft_target_s:
            return None
        local_rate = decoder.prefill_tokens_per_s or remote_rate
        local_s = (decoder.num_queued_tokens + uncached_prompt_tokens(request, decoder)) / local_rate
        if local_s >= remote_s:
            return None
        if decoder.num_running and decoder.decode_step_s > self.itl_target_s / 2:
            return None  # decoding has no room for it: the streams there would miss the ITL target
        return (
            f"{prefiller.worker_id} would start it in ~{remote_s:.1f} s > TTFT target {self.ttft_target_s:g} s, "
            f"here ~{local_s:.1f} s (decode steps {decoder.decode_step_s * 1e3:.0f} ms <= half the ITL target)"
        )

    def _degraded(
        self, request: PairRequest, prefillers: list[WorkerLoad], loads: Sequence[WorkerLoad], exclude: frozenset[str],
    ) -> PairDecision:
        """No decode worker can take the request: the least-loaded prefill worker with room serves all of it."""
        n = request.num_prompt_tokens
        fitting = [w for w in prefillers if w.num_free_blocks >= blocks_needed(n, w.block_size)]
        if not fitting:
            roomiest = min(prefillers, key=_decode_key)
            raise NoWorkerAvailable(
                f"{_role_state('decode', loads, exclude)}, and the {len(prefillers)} healthy prefill workers that "
                f"would serve in its place are full: request {request.req_id} needs {blocks_needed(n, roomiest.block_size)} "
                f"blocks, most free is {roomiest.num_free_blocks} on {roomiest.worker_id}",
                retry_after_s=self.retry_after_s,
            )
        chosen = min(fitting, key=lambda w: _aggregated_key(request, w))
        return PairDecision(
            None,
            chosen.worker_id,
            f"degraded: {_role_state('decode', loads, exclude)}; prefill worker {chosen.worker_id} serves the whole "
            f"request ({chosen.num_queued_tokens} queued tokens, {chosen.num_free_blocks} free blocks)",
            Fallback.NO_DECODE_WORKER,
        )

    def _no_decoder(self, loads: Sequence[WorkerLoad], exclude: frozenset[str]) -> NoWorkerAvailable:
        message = _role_state("decode", loads, exclude)
        if self.degraded_mode and any(w.role == WorkerRole.PREFILL for w in loads):
            message += f"; and {_role_state('prefill', loads, exclude)} to serve in its place"
        return NoWorkerAvailable(message, retry_after_s=self.retry_after_s)

    def _all_full(self, request: PairRequest, decoders: list[WorkerLoad]) -> NoWorkerAvailable:
        n = request.num_prompt_tokens
        if all(w.num_total_blocks < blocks_needed(n, w.block_size) for w in decoders):
            largest = max(decoders, key=lambda w: w.num_total_blocks * w.block_size)
            return PromptTooLarge(
                f"prompt of {n} tokens needs {blocks_needed(n, largest.block_size)} KV blocks but the "
                f"largest decode worker ({largest.worker_id}) has {largest.num_total_blocks} in total; "
                "shorten the prompt or add KV memory"
            )
        roomiest = min(decoders, key=_decode_key)
        return NoWorkerAvailable(
            f"all {len(decoders)} healthy decode workers are full: request {request.req_id} needs "
            f"{blocks_needed(n, roomiest.block_size)} blocks ({n} prompt tokens + 1), most free is "
            f"{roomiest.num_free_blocks} on {roomiest.worker_id}",
            retry_after_s=self.retry_after_s,
        )

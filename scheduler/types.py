"""Plain records the pairing policy reads and returns.

Workers report a ``WorkerLoad``; the ingress turns each request into a
``PairRequest``; a ``PairingPolicy`` answers with a ``PairDecision`` or raises
``NoWorkerAvailable`` (back-pressure). Nothing here does I/O, so the policy can
be tested in milliseconds and swapped without touching the Ray glue.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from splitserve.engine.block_pool import WorkerBusy  # noqa: F401  (the policy's back-pressure signal, raised by workers)


class WorkerRole(str, Enum):
    """What a worker can do. ``BOTH`` is an aggregated worker (prefill + decode)."""

    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"


@dataclass(slots=True)
class WorkerLoad:
    """One worker's state as last reported (or as optimistically adjusted by ``LoadView``).

    ``num_queued_tokens`` counts prompt tokens waiting to be prefilled.
    ``prefix_hashes`` summarises the KV block hashes the worker holds in its
    prefix cache (the same chained hashes as ``PairRequest.block_hashes``).
    ``updated_at`` is a timestamp on the clock of whoever keeps the view.
    """

    worker_id: str
    role: WorkerRole
    num_waiting: int
    num_running: int
    num_free_blocks: int
    num_total_blocks: int
    block_size: int
    num_queued_tokens: int = 0
    is_healthy: bool = True
    updated_at: float = 0.0
    prefix_hashes: frozenset[int] = frozenset()
    prefill_tokens_per_s: float | None = None  # measured prefill drain rate (router's estimate); None: not yet known
    decode_step_s: float = 0.0  # recent engine step time while it decoded (what its streams' inter-token gaps are)
    prompt_s_per_token: float = 0.0  # its steps of prompt tokens only: time per token, fixed costs included (0.0: unmeasured)

    @property
    def num_active(self) -> int:
        """Sequences the worker is busy with (running + waiting)."""
        return self.num_running + self.num_waiting

    @property
    def num_free_tokens(self) -> int:
        """Free KV capacity in tokens (comparable across workers with different block sizes)."""
        return self.num_free_blocks * self.block_size


@dataclass(slots=True)
class PairRequest:
    """What the policy needs to know about one request (never the token ids themselves).

    ``block_hashes`` are the chained hashes of the prompt's full blocks, in
    order; the policy matches their longest prefix against a worker's
    ``prefix_hashes`` to estimate how much of the prompt is already cached.
    ``local_only``: prefill on the worker that decodes (the router's last
    attempt after failed transfers, or a request resumed after its decode
    worker died); no prefill worker is paired.
    """

    req_id: str
    num_prompt_tokens: int
    max_tokens: int
    block_hashes: list[int] = field(default_factory=list)
    priority: int = 0
    tenant: str | None = None
    local_only: bool = False


class Fallback(str, Enum):
    """Why a request did not take the normal path; the label of ``splitserve_fallbacks_total{reason}``.

    The policy sets the first three on its decisions; the router adds the others.
    """

    NO_PREFILL_WORKER = "no_prefill_worker"  # prefilled on the decode worker: no healthy prefill worker
    PREFILL_SATURATED = "prefill_saturated"  # prefilled on the decode worker: every prefill queue over its limit
    NO_DECODE_WORKER = "no_decode_worker"  # degraded: a prefill worker serves the whole request
    RETRY_LOCAL_PREFILL = "retry_local_prefill"  # the last attempt after failed transfers prefills on the decode worker
    MIGRATION = "migration"  # resumed on another worker after its decode worker died mid-stream
    SLO_LOCAL_PREFILL = "slo_local_prefill"  # prefilled on the decode worker: the prefill queue would miss the TTFT target


@dataclass(slots=True)
class PairDecision:
    """Where a request runs. ``prefill_worker_id is None`` means prefill locally on the decode worker.

    ``fallback`` is set when the policy had to leave the normal path (see ``Fallback``).
    """

    prefill_worker_id: str | None
    decode_worker_id: str
    reason: str
    fallback: Fallback | None = None

    @property
    def is_remote_prefill(self) -> bool:
        return self.prefill_worker_id is not None


@dataclass(slots=True)
class ServingState:
    """Whether the deployment serves, and how: ``status`` is "ok", "degraded" (one role stands in for the
    other) or "unavailable"; ``detail`` says which role is missing and who serves instead."""

    status: str
    detail: str

    @property
    def is_serving(self) -> bool:
        return self.status != "unavailable"


class NoWorkerAvailable(RuntimeError):
    """Nothing can take the request now: the caller should back off and retry (HTTP 503).

    ``retry_after_s`` is a hint for the ``Retry-After`` header; ``None`` means
    retrying cannot help (see ``PromptTooLarge``).
    """

    def __init__(self, message: str, retry_after_s: float | None = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueWaitTooLong(NoWorkerAvailable):
    """The request would wait longer than the queue-wait budget before it starts: shed it now (HTTP 503)."""


class PromptTooLarge(NoWorkerAvailable):
    """The prompt needs more KV blocks than any decode worker has in total: never retry (HTTP 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after_s=None)


class PairingPolicy(Protocol):
    """Chooses (prefill, decode) workers for one request from a snapshot of loads.

    ``exclude`` holds worker ids that already failed this request (retries).
    Implementations must be pure: same inputs, same decision.
    """

    def pick(
        self,
        request: PairRequest,
        loads: Sequence[WorkerLoad],
        exclude: frozenset[str] = frozenset(),
    ) -> PairDecision: ...


"""splitserve.scheduler: pure pairing policy (which prefill and decode worker) and the load view.

No I/O lives here; the Ray glue feeds ``LoadView`` with worker reports and asks
a ``PairingPolicy`` for a ``PairDecision`` per request.
"""

from __future__ import annotations

from splitserve.scheduler.admission import QueueWaitEstimator
from splitserve.scheduler.load_view import LoadView, Reservation
from splitserve.scheduler.policy import (
    LeastLoadedPolicy,
    blocks_needed,
    cached_prefix_tokens,
    serving_state,
    uncached_prompt_tokens,
)
from splitserve.scheduler.types import (
    Fallback,
    NoWorkerAvailable,
    PairDecision,
    PairingPolicy,
    PairRequest,
    PromptTooLarge,
    QueueWaitTooLong,
    ServingState,
    WorkerBusy,
    WorkerLoad,
    WorkerRole,
)

__all__ = [
    "WorkerBusy",
    "Fallback",
    "LeastLoadedPolicy",
    "LoadView",
    "Reservation",
    "NoWorkerAvailable",
    "PairDecision",
    "PairRequest",
    "PairingPolicy",
    "PromptTooLarge",
    "QueueWaitEstimator",
    "QueueWaitTooLong",
    "ServingState",
    "WorkerLoad",
    "WorkerRole",
    "blocks_needed",
    "cached_prefix_tokens",
    "serving_state",
    "uncached_prompt_tokens",
]

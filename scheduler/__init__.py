"""splitserve.scheduler: pure pairing policy (which prefill and decode worker) and the load view.

No I/O lives here; the Ray glue feeds ``LoadView`` with worker reports and asks
a ``PairingPolicy`` for a ``PairDecision`` per request.
"""

from __future__ import annotations

from splitserve.scheduler.load_view import LoadView
from splitserve.scheduler.policy import (
    LeastLoadedPolicy,
    blocks_needed,
    cached_prefix_tokens,
    uncached_prompt_tokens,
)
from splitserve.scheduler.types import (
    NoWorkerAvailable,
    PairDecision,
    PairingPolicy,
    PairRequest,
    PromptTooLarge,
    WorkerBusy,
    WorkerLoad,
    WorkerRole,
)

__all__ = [
    "WorkerBusy",
    "LeastLoadedPolicy",
    "LoadView",
    "NoWorkerAvailable",
    "PairDecision",
    "PairRequest",
    "PairingPolicy",
    "PromptTooLarge",
    "WorkerLoad",
    "WorkerRole",
    "blocks_needed",
    "cached_prefix_tokens",
    "uncached_prompt_tokens",
]

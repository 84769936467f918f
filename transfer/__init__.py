"""splitserve.transfer: KV-cache movement between workers over NIXL.

Each worker registers its single contiguous KV tensor once (:class:`KVTransferAgent`),
publishes an :class:`AgentInfo` (msgpack, versioned, carries the :class:`KVLayout`),
adds the peers it will initiate transfers to, then writes (push) or reads (pull)
block lists, each coalesced into the fewest byte ranges, and polls the returned
:class:`TransferHandle`. :class:`FaultInjectingAgent` fails or delays transfers on
purpose to test the error paths; :func:`make_transfer_agent` picks one of the two.
"""

from __future__ import annotations

from splitserve.transfer.agent import KVTransferAgent
from splitserve.transfer.faults import FaultInjectingAgent, make_transfer_agent
from splitserve.transfer.handle import (
    TransferAgent,
    TransferError,
    TransferHandle,
    TransferStatus,
    TransferTimeout,
)
from splitserve.transfer.layout import (
    PROTOCOL_VERSION,
    AgentInfo,
    KVLayout,
    KVLayoutMismatch,
    coalesce_block_runs,
)

__all__ = [
    "PROTOCOL_VERSION",
    "AgentInfo",
    "FaultInjectingAgent",
    "KVLayout",
    "KVLayoutMismatch",
    "KVTransferAgent",
    "TransferAgent",
    "TransferError",
    "TransferHandle",
    "TransferStatus",
    "TransferTimeout",
    "coalesce_block_runs",
    "make_transfer_agent",
]

"""FaultInjectingAgent: a real KVTransferAgent that fails or stalls some transfers on purpose.

It exists to exercise the error paths of prefill/decode (free the reserved blocks,
retry elsewhere, prefill locally) against real NIXL, not to avoid NIXL. Each valid
``write_blocks`` / ``read_blocks`` draws one number from a seeded RNG:

* with probability ``fail_fraction`` the transfer fails: its NIXL request is created
  and released unposted, so no data moves and the peer is not notified; ``poll``
  reports FAILED and ``wait`` raises :class:`TransferError`;
* with probability ``delay_fraction`` the transfer is held back: it is posted only
  ``delay_s`` after submission (data and notification arrive late), and ``poll`` says
  PENDING until then; a ``wait`` that times out first cancels it, so it never lands;
* otherwise it goes straight to the wrapped agent.

Everything else (handshake, notifications, close) is delegated unchanged.
:func:`make_transfer_agent` builds the plain agent when no fault is configured.
"""

from __future__ import annotations

import random
import time

import torch

from splitserve.transfer.agent import KVTransferAgent
from splitserve.transfer.handle import (
    TransferAgent,
    TransferError,
    TransferHandle,
    TransferStatus,
    wait_for,
    wait_for_async,
)
from splitserve.transfer.layout import AgentInfo, KVLayout

INJECTED_FAILURE = "injected failure"


class FaultInjectingAgent:
    """Same interface as :class:`KVTransferAgent`; delegates to ``agent`` and injects faults."""

    def __init__(
        self,
        agent: KVTransferAgent,
        fail_fraction: float = 0.0,
        delay_fraction: float = 0.0,
        delay_s: float = 0.0,
        seed: int = 0,
    ) -> None:
        for name, value in (("fail_fraction", fail_fraction), ("delay_fraction", delay_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if fail_fraction + delay_fraction > 1.0:
            raise ValueError(
                f"fail_fraction + delay_fraction must be <= 1, got {fail_fraction} + {delay_fraction}"
            )
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        self.agent = agent
        self.fail_fraction = fail_fraction
        self.delay_fraction = delay_fraction
        self.delay_s = delay_s
        self._rng = random.Random(seed)
        self._held: dict[TransferHandle, tuple[float, bytes]] = {}  # handle -> (post at, notif)
        self.num_injected_failures = 0
        self.num_injected_delays = 0

    # ---- delegated -------------------------------------------------------------------

    @property
    def worker_id(self) -> str:
        return self.agent.worker_id

    @property
    def layout(self) -> KVLayout:
        return self.agent.layout

    @property
    def peers(self) -> tuple[str, ...]:
        return self.agent.peers

    @property
    def num_live_handles(self) -> int:
        return self.agent.num_live_handles

    def info(self) -> AgentInfo:
        return self.agent.info()

    def add_peer(self, info: AgentInfo | bytes) -> str:
        return self.agent.add_peer(info)

    def remove_peer(self, peer: str) -> None:
        self.agent.remove_peer(peer)

    def send_notification(self, peer: str, msg: bytes) -> None:
        self.agent.send_notification(peer, msg)

    def get_notifications(self) -> list[tuple[str, bytes]]:
        return self.agent.get_notifications()

    # ---- transfers with faults -------------------------------------------------------

    def write_blocks(
        self, peer: str, src_block_ids: list[int], dst_block_ids: list[int], notif: bytes
    ) -> TransferHandle:
        return self._submit("WRITE", peer, src_block_ids, dst_block_ids, notif)

    def read_blocks(
        self, peer: str, remote_block_ids: list[int], local_block_ids: list[int], notif: bytes
    ) -> TransferHandle:
        return self._submit("READ", peer, local_block_ids, remote_block_ids, notif)

    def _submit(
        self, op: str, peer: str, local_ids: list[int], remote_ids: list[int], notif: bytes
    ) -> TransferHandle:
        handle = self.agent._prepare(op, peer, local_ids, remote_ids, notif)  # validates
        draw = self._rng.random()
        if draw < self.fail_fraction:
            self.num_injected_failures += 1
            handle._is_posted = True
            self.agent._finish(handle, TransferStatus.FAILED, INJECTED_FAILURE)
        elif draw < self.fail_fraction + self.delay_fraction:
            self.num_injected_delays += 1
            self._held[handle] = (time.perf_counter() + self.delay_s, bytes(notif))
        else:
            self.agent._post(handle, notif)
        return handle

    def poll(self, handle: TransferHandle) -> TransferStatus:
        held = self._held.get(handle)
        if held is not None:
            post_at, notif = held
            if time.perf_counter() < post_at:
                return TransferStatus.PENDING
            del self._held[handle]
            try:
                self.agent._post(handle, notif)
            except TransferError:
                return handle.status  # _post marked it FAILED and released it
        return self.agent.poll(handle)

    def cancel(self, handle: TransferHandle, reason: str = "cancelled") -> None:
        self._held.pop(handle, None)
        self.agent.cancel(handle, reason)

    def wait(self, handle: TransferHandle, timeout_s: float) -> None:
        wait_for(self, handle, timeout_s)

    async def wait_async(self, handle: TransferHandle, timeout_s: float) -> None:
        await wait_for_async(self, handle, timeout_s)

    def close(self) -> None:
        for handle in list(self._held):
            self.cancel(handle, "agent closed")
        self.agent.close()

    def __enter__(self) -> FaultInjectingAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_transfer_agent(
    worker_id: str,
    kv_cache: torch.Tensor,
    *,
    fail_fraction: float = 0.0,
    delay_fraction: float = 0.0,
    delay_s: float = 0.0,
    seed: int = 0,
    backend: str = "UCX",
) -> TransferAgent:
    """The plain :class:`KVTransferAgent`, wrapped in faults only when some are configured."""
    agent = KVTransferAgent(worker_id, kv_cache, backend=backend)
    if fail_fraction == 0 and (delay_fraction == 0 or delay_s == 0):
        return agent
    try:
        return FaultInjectingAgent(agent, fail_fraction, delay_fraction, delay_s, seed)
    except ValueError:
        agent.close()
        raise

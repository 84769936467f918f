"""Transfer handles, their status, the transfer errors, and the wait loops all agents share.

A :class:`TransferHandle` is born PENDING when a transfer is submitted, and an agent's
``poll`` moves it to DONE or FAILED exactly once, releasing the backend request at that
moment. :func:`wait_for` / :func:`wait_for_async` poll any agent (the real one or the
fault-injecting wrapper) until the handle is final, and on timeout ``cancel`` it before
raising :class:`TransferTimeout`, so a waiter never leaves a backend request behind.
:class:`TransferAgent` is the interface both agents implement.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from splitserve.transfer.layout import AgentInfo, KVLayout

_MIN_SLEEP_S = 50e-6
_MAX_SLEEP_S = 1e-3


class TransferStatus(enum.Enum):
    """PENDING until the backend finishes; DONE and FAILED are final."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class TransferError(RuntimeError):
    """A transfer could not be submitted or did not complete."""


class TransferTimeout(TransferError):
    """A transfer did not complete in time; it was cancelled."""


@dataclass(eq=False)
class TransferHandle:
    """One posted (or about to be posted) transfer; compare by identity."""

    peer: str
    num_bytes: int
    started_at: float
    op: str = "WRITE"
    num_descs: int = 0
    finished_at: float | None = None
    error: str | None = None
    may_still_land: bool = False  # it failed or was cancelled, but the backend could not cancel its request: data may land
    _xfer: Any = field(default=None, repr=False)
    _status: TransferStatus = field(default=TransferStatus.PENDING, repr=False)
    _is_posted: bool = field(default=False, repr=False)

    @property
    def status(self) -> TransferStatus:
        """Last known status, without polling the backend."""
        return self._status

    @property
    def seconds(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.started_at

    def describe(self) -> str:
        return f"{self.op} of {self.num_bytes} bytes in {self.num_descs} runs with peer {self.peer!r}"


class TransferAgent(Protocol):
    """What prefill/decode code may rely on; :class:`KVTransferAgent` and
    :class:`FaultInjectingAgent` both implement it."""

    worker_id: str
    layout: KVLayout

    def info(self) -> AgentInfo: ...
    def add_peer(self, info: AgentInfo | bytes) -> str: ...
    def remove_peer(self, peer: str) -> None: ...
    def write_blocks(
        self, peer: str, src_block_ids: list[int], dst_block_ids: list[int], notif: bytes
    ) -> TransferHandle: ...
    def read_blocks(
        self, peer: str, remote_block_ids: list[int], local_block_ids: list[int], notif: bytes
    ) -> TransferHandle: ...
    def poll(self, handle: TransferHandle) -> TransferStatus: ...
    def cancel(self, handle: TransferHandle, reason: str = "cancelled") -> None: ...
    def wait(self, handle: TransferHandle, timeout_s: float) -> None: ...
    async def wait_async(self, handle: TransferHandle, timeout_s: float) -> None: ...
    def send_notification(self, peer: str, msg: bytes) -> None: ...
    def get_notifications(self) -> list[tuple[str, bytes]]: ...
    def close(self) -> None: ...


def _timeout_message(handle: TransferHandle, timeout_s: float) -> str:
    return f"{handle.describe()} did not finish within {timeout_s:g} s; cancelled"


def _poll_until_done(agent: TransferAgent, handle: TransferHandle, timeout_s: float) -> Iterator[float]:
    """Poll ``agent`` until the handle is DONE, yielding how long to sleep between polls (growing backoff).

    Raises TransferError when the transfer failed, TransferTimeout (after
    cancelling it) when ``timeout_s`` passed. The callers only choose how to sleep.
    """
    deadline = time.monotonic() + timeout_s
    sleep_s = 0.0
    while True:
        status = agent.poll(handle)
        if status is TransferStatus.DONE:
            return
        if status is TransferStatus.FAILED:
            raise TransferError(f"{handle.describe()} failed: {handle.error}")
        if time.monotonic() >= deadline:
            agent.cancel(handle, f"timed out after {timeout_s:g} s")
            raise TransferTimeout(_timeout_message(handle, timeout_s))
        yield sleep_s
        sleep_s = min(max(2 * sleep_s, _MIN_SLEEP_S), _MAX_SLEEP_S)


def wait_for(agent: TransferAgent, handle: TransferHandle, timeout_s: float) -> None:
    """Block until the handle is DONE; raise TransferError / TransferTimeout otherwise.

    Shared by the real and the fault-injecting agent (anything with ``poll`` and ``cancel``).
    """
    for sleep_s in _poll_until_done(agent, handle, timeout_s):
        time.sleep(sleep_s)


async def wait_for_async(agent: TransferAgent, handle: TransferHandle, timeout_s: float) -> None:
    """:func:`wait_for` for an event loop: yields with ``asyncio.sleep`` between polls."""
    for sleep_s in _poll_until_done(agent, handle, timeout_s):
        await asyncio.sleep(sleep_s)

"""KVTransferAgent: moves KV-cache blocks between workers through one NIXL agent.

Lifecycle (one agent per worker process, named after its ``worker_id``):

1. ``KVTransferAgent(worker_id, kv_cache)`` creates a NIXL agent (UCX backend) and
   registers the whole KV tensor once (DRAM_SEG on CPU, VRAM_SEG on CUDA). Nothing is
   registered per request.
2. ``info()`` is published (``AgentInfo.to_bytes()``); the *initiator* of transfers
   calls ``add_peer(info)``: it refuses another protocol version or layout and loads the
   peer's NIXL metadata. The target needs nothing loaded to be written to, read from, or
   notified; it needs the initiator's info only to ``send_notification`` back.
3. ``write_blocks`` (push local -> remote) / ``read_blocks`` (pull remote -> local)
   coalesce the block ids into byte runs, post one NIXL request and return a
   :class:`TransferHandle` at once. The *remote* agent receives ``notif`` after the data
   has landed (for a READ too: it tells the owner its blocks were consumed). Submission
   errors (dead peer, unknown registration) raise :class:`TransferError` right away.
4. ``poll`` / ``wait`` / ``wait_async`` drive the handle to DONE or FAILED and release
   the NIXL request as soon as it is finished; a timeout cancels it and raises
   :class:`TransferTimeout`, so no path leaves a NIXL request behind.
5. ``get_notifications`` drains what peers sent; ``close`` cancels what is still in
   flight, forgets the peers and deregisters the pool (safe to call twice).

The NIXL agent runs in ``NIXL_THREAD_SYNC_RW`` mode, so one agent may be shared by an
event loop and worker threads. It keeps NIXL's progress thread on, as a safety net:
without it a transfer can stall until the *target* process happens to call into NIXL
(UCX's connection wire-up needs the target's progress). Transfers in flight are driven
by the processes' own calls (the initiator's ``poll``, the target's notification poll),
so the thread sleeps long between its rounds (``PROGRESS_DELAY_US``); the Python wrapper
would make it busy-poll. Each process should hold one agent and ``close`` it when done.
"""

from __future__ import annotations

import logging
import operator
import threading
import time
from typing import Any

import numpy as np
import torch

from splitserve.transfer.handle import (
    TransferError,
    TransferHandle,
    TransferStatus,
    TransferTimeout,
    wait_for,
    wait_for_async,
)
from splitserve.transfer.layout import AgentInfo, KVLayout, coalesce_block_runs

__all__ = ["KVTransferAgent", "TransferError", "TransferHandle", "TransferStatus", "TransferTimeout"]

logger = logging.getLogger(__name__)


# NIXL's progress thread sleeps this long between rounds. The Python wrapper (nixl 1.5)
# hard-codes 0, a busy loop that burns a whole core per agent even when idle. Each
# round costs ~90 us of CPU whether or not anything is pending (an idle agent, measured:
# 3.7% of a core at 500 us, 0.9% at 10 ms, 0.18% at 50 ms). The thread only has to
# finish what no one else polls for, such as the first connection to a peer; a WRITE
# to a target that never calls NIXL took the same time at 500 us and at 10 ms once
# connected (benchmarks/kv_transfer.py), and a serving decode worker polls for its
# notifications every few ms while it expects KV.
PROGRESS_DELAY_US = 50_000
_PATCH_LOCK = threading.Lock()


def _make_nixl_agent(name: str, config: Any, progress_delay_us: int) -> Any:
    """``nixl_agent(name, config)`` with its progress thread sleeping ``progress_delay_us`` between polls.

    The wrapper builds its C++ ``nixlAgentConfig`` itself and sets ``pthrDelay = 0``;
    for the duration of the constructor we substitute a subclass whose setter keeps
    our floor. Nothing else about the agent changes.
    """
    from nixl._api import nixl_agent

    bind = nixl_agent.__init__.__globals__["nixlBind"]
    base = bind.nixlAgentConfig

    class _DelayedConfig(base):  # type: ignore[misc, valid-type]
        @property
        def pthrDelay(self) -> int:
            return base.pthrDelay.__get__(self)

        @pthrDelay.setter
        def pthrDelay(self, value: int) -> None:
            base.pthrDelay.__set__(self, max(int(value), progress_delay_us))

    with _PATCH_LOCK:
        bind.nixlAgentConfig = _DelayedConfig
        try:
            return nixl_agent(name, config)
        finally:
            bind.nixlAgentConfig = base


def _block_ids(ids: list[int], limit: int, what: str) -> list[int]:
    out = []
    for block_id in ids:
        try:
            value = operator.index(block_id)
        except TypeError:
            raise ValueError(f"{what} block id {block_id!r} is not an int") from None
        if not 0 <= value < limit:
            raise ValueError(f"{what} block id {value} out of range [0, {limit})")
        out.append(value)
    return out


class KVTransferAgent:
    """One worker's NIXL endpoint over its single, contiguous KV-cache tensor."""

    def __init__(
        self, worker_id: str, kv_cache: torch.Tensor, backend: str = "UCX", progress_delay_us: int = PROGRESS_DELAY_US
    ) -> None:
        if not isinstance(worker_id, str) or not worker_id:
            raise ValueError(f"worker_id must be a non-empty str (the NIXL agent name), got {worker_id!r}")
        if not isinstance(kv_cache, torch.Tensor) or not kv_cache.is_contiguous():
            raise ValueError("kv_cache must be one contiguous torch.Tensor (the whole KV pool)")
        self.worker_id = worker_id
        self.layout: KVLayout = KVLayout.from_cache(kv_cache)
        self.kv_cache = kv_cache  # keeps the registered memory alive
        self.num_blocks = int(kv_cache.shape[0])
        self.mem_type = "VRAM" if kv_cache.is_cuda else "DRAM"
        self.device_id = (kv_cache.device.index or 0) if kv_cache.is_cuda else 0
        self.base_addr = int(kv_cache.data_ptr())
        self._lock = threading.Lock()
        self._peers: dict[str, AgentInfo] = {}
        self._live: set[TransferHandle] = set()
        self._unreleased: list[Any] = []  # NIXL requests whose cancel failed; retried later
        self._closed = False
        try:
            from nixl._api import nixl_agent_config, nixl_thread_sync_t

            config = nixl_agent_config(
                backends=[backend], sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_RW
            )
            self._nixl = _make_nixl_agent(worker_id, config, progress_delay_us)
        except Exception as e:
            raise TransferError(f"cannot create NIXL agent {worker_id!r}: {e!r}") from e
        if backend not in self._nixl.backends:
            raise TransferError(
                f"NIXL backend {backend!r} is not available; plugins: {self._nixl.get_plugin_list()}"
            )
        try:
            self._reg = self._nixl.register_memory(kv_cache, backends=[backend])
            # Metadata must be taken after registration: it carries the region keys.
            self._metadata = bytes(self._nixl.get_agent_metadata())
        except Exception as e:
            raise TransferError(
                f"cannot register the KV pool ({kv_cache.numel() * kv_cache.element_size()} "
                f"bytes, {self.mem_type}) with NIXL: {e!r}"
            ) from e

    # ---- handshake -------------------------------------------------------------------

    def info(self) -> AgentInfo:
        return AgentInfo(
            worker_id=self.worker_id,
            agent_metadata=self._metadata,
            base_addr=self.base_addr,
            num_blocks=self.num_blocks,
            device_id=self.device_id,
            mem_type=self.mem_type,
            layout=self.layout,
        )

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(self._peers)

    @property
    def num_live_handles(self) -> int:
        """NIXL transfer requests created and not yet released (0 when idle)."""
        return len(self._live) + len(self._unreleased)

    def add_peer(self, info: AgentInfo | bytes) -> str:
        """Check the peer's protocol and layout, load its NIXL metadata; return its name."""
        self._check_open()
        if isinstance(info, (bytes, bytearray, memoryview)):
            info = AgentInfo.from_bytes(bytes(info))
        if info.worker_id == self.worker_id:
            raise ValueError(f"add_peer: {info.worker_id!r} is this worker itself")
        self.layout.check_compatible(info.layout)
        with self._lock:
            known = self._peers.get(info.worker_id)
            if known == info:
                return info.worker_id
            if known is not None:  # the peer restarted: NIXL refuses new metadata under an old name
                self._remove_remote(info.worker_id)
                del self._peers[info.worker_id]
            try:
                name = self._nixl.add_remote_agent(info.agent_metadata)
            except Exception as e:
                raise TransferError(f"cannot load NIXL metadata of peer {info.worker_id!r}: {e!r}") from e
            name = name.decode() if isinstance(name, bytes) else str(name)
            if name != info.worker_id:
                if name not in self._peers:
                    self._remove_remote(name)
                raise ValueError(
                    f"add_peer: metadata belongs to NIXL agent {name!r} but the info names "
                    f"worker {info.worker_id!r}"
                )
            self._peers[name] = info
        try:  # optional in NIXL: connect now rather than during the first transfer
            self._nixl.make_connection(name)
        except Exception as e:
            logger.warning("pre-connecting to NIXL peer %r failed: %r", name, e)
        return name

    def remove_peer(self, peer: str) -> None:
        """Forget a peer and disconnect from it; a no-op for an unknown peer."""
        with self._lock:
            if self._peers.pop(peer, None) is not None and not self._closed:
                self._remove_remote(peer)

    def _remove_remote(self, name: str) -> None:
        try:
            self._nixl.remove_remote_agent(name)
        except Exception as e:
            logger.warning("removing NIXL peer %r failed: %r", name, e)

    # ---- transfers -------------------------------------------------------------------

    def write_blocks(
        self, peer: str, src_block_ids: list[int], dst_block_ids: list[int], notif: bytes
    ) -> TransferHandle:
        """Push local blocks into the peer's blocks; the peer gets ``notif`` when they landed."""
        handle = self._prepare("WRITE", peer, src_block_ids, dst_block_ids, notif)
        return self._post(handle, notif)

    def read_blocks(
        self, peer: str, remote_block_ids: list[int], local_block_ids: list[int], notif: bytes
    ) -> TransferHandle:
        """Pull the peer's blocks into local blocks; the peer gets ``notif`` when they are read."""
        handle = self._prepare("READ", peer, local_block_ids, remote_block_ids, notif)
        return self._post(handle, notif)

    def _prepare(
        self, op: str, peer: str, local_ids: list[int], remote_ids: list[int], notif: bytes
    ) -> TransferHandle:
        """Validate and create the NIXL request without posting it."""
        self._check_open()
        info = self._peers.get(peer)
        if info is None:
            raise ValueError(f"unknown peer {peer!r}; call add_peer first (known: {list(self._peers)})")
        if not isinstance(notif, (bytes, bytearray, memoryview)):
            raise ValueError(f"notif must be bytes, got {type(notif).__name__}")
        if len(local_ids) != len(remote_ids):
            raise ValueError(
                f"{op}: {len(local_ids)} local block ids but {len(remote_ids)} remote block ids"
            )
        local_ids = _block_ids(local_ids, self.num_blocks, "local")
        remote_ids = _block_ids(remote_ids, info.num_blocks, f"peer {peer!r}")
        dst_ids = remote_ids if op == "WRITE" else local_ids
        if len(set(dst_ids)) != len(dst_ids):
            raise ValueError(f"{op}: destination block ids repeat: {dst_ids}")
        runs = coalesce_block_runs(local_ids, remote_ids)
        bpb = self.layout.bytes_per_block
        handle = TransferHandle(
            peer=peer, num_bytes=len(local_ids) * bpb, started_at=time.perf_counter(),
            op=op, num_descs=len(runs),
        )
        if not runs:
            return handle
        # One (address, length, device) row per run: the Nx3 form NIXL takes directly.
        arr = np.array(runs, dtype=np.uint64).reshape(-1, 3)
        lengths = arr[:, 2] * bpb
        local = np.stack([self.base_addr + arr[:, 0] * bpb, lengths, lengths * 0 + self.device_id], 1)
        remote = np.stack([info.base_addr + arr[:, 1] * bpb, lengths, lengths * 0 + info.device_id], 1)
        try:
            local_descs = self._nixl.get_xfer_descs(local, self.mem_type)
            remote_descs = self._nixl.get_xfer_descs(remote, info.mem_type)
            handle._xfer = self._nixl.initialize_xfer(op, local_descs, remote_descs, peer, bytes(notif))
        except Exception as e:
            raise TransferError(f"cannot create {handle.describe()}: {e!r}") from e
        with self._lock:
            self._live.add(handle)
        return handle

    def _post(self, handle: TransferHandle, notif: bytes) -> TransferHandle:
        """Start the transfer (an empty one only sends ``notif``); raise on submit failure."""
        handle._is_posted = True
        if handle._xfer is None:
            if notif:
                self.send_notification(handle.peer, bytes(notif))
            self._finish(handle, TransferStatus.DONE)
            return handle
        try:
            state = self._nixl.transfer(handle._xfer)
        except Exception as e:
            self._finish(handle, TransferStatus.FAILED, f"post raised {e!r}")
            raise TransferError(f"cannot post {handle.describe()}: {e!r}") from e
        if state == "ERR":
            self._finish(handle, TransferStatus.FAILED, "post returned ERR")
            raise TransferError(f"cannot post {handle.describe()}: NIXL returned ERR")
        if state == "DONE":
            self._finish(handle, TransferStatus.DONE)
        return handle

    def poll(self, handle: TransferHandle) -> TransferStatus:
        """Advance the handle; once DONE or FAILED, its NIXL request is released."""
        self._reap()
        if handle._status is not TransferStatus.PENDING or not handle._is_posted:
            return handle._status
        try:
            state = self._nixl.check_xfer_state(handle._xfer)
        except Exception as e:
            self._finish(handle, TransferStatus.FAILED, f"check_xfer_state raised {e!r}")
            return handle._status
        if state == "DONE":
            self._finish(handle, TransferStatus.DONE)
        elif state == "ERR":
            self._finish(handle, TransferStatus.FAILED, "NIXL reported ERR")
        return handle._status

    def cancel(self, handle: TransferHandle, reason: str = "cancelled") -> None:
        """Stop waiting for a transfer: release (cancel) its NIXL request and mark it FAILED.

        Data may already have landed partly (or, racing with completion, fully).
        """
        if handle._status is TransferStatus.PENDING:
            self._finish(handle, TransferStatus.FAILED, reason)

    def wait(self, handle: TransferHandle, timeout_s: float) -> None:
        """Block until DONE; TransferError if it failed, TransferTimeout (cancelled) if late."""
        wait_for(self, handle, timeout_s)

    async def wait_async(self, handle: TransferHandle, timeout_s: float) -> None:
        """:meth:`wait` for an event loop: polls between ``asyncio.sleep`` calls."""
        await wait_for_async(self, handle, timeout_s)

    def _finish(self, handle: TransferHandle, status: TransferStatus, error: str | None = None) -> None:
        handle._status = status
        handle.error = error
        handle.finished_at = time.perf_counter()
        xfer, handle._xfer = handle._xfer, None
        with self._lock:
            self._live.discard(handle)
        if xfer is not None:
            try:
                xfer.release()
            except Exception as e:  # NIXL could not cancel it yet; retry on later polls
                logger.warning("releasing NIXL request of %s failed: %r", handle.describe(), e)
                handle.may_still_land = status is not TransferStatus.DONE
                with self._lock:
                    self._unreleased.append(xfer)

    def _reap(self) -> None:
        if not self._unreleased:
            return
        with self._lock:
            pending, self._unreleased = self._unreleased, []
        for xfer in pending:
            try:
                xfer.release()
            except Exception:
                with self._lock:
                    self._unreleased.append(xfer)

    # ---- notifications ---------------------------------------------------------------

    def send_notification(self, peer: str, msg: bytes) -> None:
        """Send a standalone message to a peer (which must have been added here)."""
        self._check_open()
        if peer not in self._peers:
            raise ValueError(f"unknown peer {peer!r}; call add_peer first (known: {list(self._peers)})")
        try:
            self._nixl.send_notif(peer, bytes(msg))
        except Exception as e:
            raise TransferError(f"cannot notify peer {peer!r}: {e!r}") from e

    def get_notifications(self) -> list[tuple[str, bytes]]:
        """Messages received since the last call, as ``(sender agent name, message)``."""
        self._check_open()
        try:
            notifs = self._nixl.get_new_notifs()
        except Exception as e:
            raise TransferError(f"cannot read NIXL notifications: {e!r}") from e
        return [(str(name), bytes(msg)) for name, msgs in notifs.items() for msg in msgs]

    # ---- teardown --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise TransferError(f"transfer agent {self.worker_id!r} is closed")

    def close(self) -> None:
        """Cancel in-flight transfers, forget peers, deregister the pool; idempotent."""
        if self._closed:
            return
        for handle in list(self._live):
            self.cancel(handle, "agent closed")
        self._reap()
        for peer in list(self._peers):
            self.remove_peer(peer)
        self._closed = True
        try:
            self._nixl.deregister_memory(self._reg)
        except Exception as e:
            logger.warning("deregistering the KV pool of %r failed: %r", self.worker_id, e)
        self._reg = None
        if not self._unreleased:  # otherwise keep the agent alive for its stuck requests
            self._nixl = None

    def __enter__(self) -> KVTransferAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

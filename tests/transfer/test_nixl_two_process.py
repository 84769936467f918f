"""Real NIXL (UCX, DRAM) between two spawned processes: bit-exact block moves, notifications,
pull, handshake refusal, injected failures and delays, a dead peer.

Each process runs :func:`_serve`, a tiny command loop over a pipe that owns the agents
and their KV tensors; the test process only exchanges ``AgentInfo`` bytes and compares
raw block bytes. Every pipe read is bounded, so a stuck transfer fails a test instead of
hanging the suite.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow

NUM_BLOCKS = 32
LAYOUT_SHAPE = (2, 2, 4, 2, 8)  # layers, K/V, block_size, kv heads, head_dim
CALL_TIMEOUT_S = 60.0  # only reached when something hangs; the machine may be slow
WAIT_S = 10.0


# ---- child side -------------------------------------------------------------------------


def _serve(conn: Any) -> None:
    """Command loop of one worker process: ``(cmd, kwargs)`` in, ``("ok"|"err", value)`` out."""
    from splitserve.transfer import FaultInjectingAgent, KVTransferAgent

    agents: dict[str, Any] = {}
    caches: dict[str, torch.Tensor] = {}

    def create(name: str, dtype: str, seed: int, head_dim: int = LAYOUT_SHAPE[-1]) -> bytes:
        gen = torch.Generator().manual_seed(seed)
        shape = (NUM_BLOCKS, *LAYOUT_SHAPE[:-1], head_dim)
        caches[name] = torch.randn(shape, generator=gen).to(getattr(torch, dtype))
        agents[name] = KVTransferAgent(name, caches[name])
        return agents[name].info().to_bytes()

    def wrap(name: str, new_name: str, **faults: Any) -> None:
        agents[new_name] = FaultInjectingAgent(agents[name], **faults)

    def move(name: str, op: str, peer: str, local: list[int], remote: list[int], notif: bytes,
             timeout_s: float = WAIT_S, use_async: bool = False) -> dict[str, Any]:
        agent = agents[name]
        if op == "write":
            handle = agent.write_blocks(peer, local, remote, notif)
        else:
            handle = agent.read_blocks(peer, remote, local, notif)
        try:
            if use_async:
                asyncio.run(agent.wait_async(handle, timeout_s))
            else:
                agent.wait(handle, timeout_s)
        finally:
            live = agent.num_live_handles
        assert live == 0, f"{live} NIXL requests left after wait"
        return {"num_bytes": handle.num_bytes, "num_descs": handle.num_descs}

    def notifs(name: str, count: int, timeout_s: float) -> list[tuple[str, bytes]]:
        got: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + timeout_s
        while len(got) < count and time.monotonic() < deadline:
            got += agents[name].get_notifications()
            time.sleep(0.001)
        return got

    def reset() -> None:
        """Close every agent: each one's NIXL progress thread spins, and cores are few."""
        for agent in agents.values():
            agent.close()
        agents.clear()
        caches.clear()

    commands = {
        "create": create,
        "wrap": wrap,
        "move": move,
        "notifs": notifs,
        "add_peer": lambda name, info: agents[name].add_peer(info),
        "send": lambda name, peer, msg: agents[name].send_notification(peer, msg),
        "blocks": lambda name: caches[name].view(torch.uint8).numpy().tobytes(),
        "live": lambda name: agents[name].num_live_handles,
        "reset": reset,
        "die": lambda: os._exit(0),
    }
    while True:
        cmd, kwargs = conn.recv()
        try:
            conn.send(("ok", commands[cmd](**kwargs)))
        except Exception as e:  # sent back and re-raised in the test process
            conn.send(("err", e))


# ---- test side --------------------------------------------------------------------------


class Worker:
    """Handle on one spawned worker process."""

    def __init__(self, ctx: Any) -> None:
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child_conn,), daemon=True)
        self.proc.start()

    def __call__(self, cmd: str, **kwargs: Any) -> Any:
        self.conn.send((cmd, kwargs))
        if not self.conn.poll(CALL_TIMEOUT_S):
            raise TimeoutError(f"worker did not answer {cmd!r} within {CALL_TIMEOUT_S} s")
        status, value = self.conn.recv()
        if status == "err":
            raise value
        return value

    def blocks(self, name: str, dtype: str) -> torch.Tensor:
        """The worker's whole KV pool as raw bytes, one row per block."""
        raw = torch.frombuffer(bytearray(self("blocks", name=name)), dtype=torch.uint8)
        return raw.view(NUM_BLOCKS, -1)

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)


@pytest.fixture(scope="module")
def processes() -> Iterator[tuple[Worker, Worker, Worker]]:
    """Two long-lived workers plus a third for the dead-peer test, spawned in parallel."""
    ctx = mp.get_context("spawn")
    procs = (Worker(ctx), Worker(ctx), Worker(ctx))
    yield procs
    for proc in procs:
        proc.stop()


@pytest.fixture
def workers(processes: tuple[Worker, Worker, Worker]) -> Iterator[tuple[Worker, Worker]]:
    a, b, _ = processes
    yield a, b
    for worker in (a, b):
        worker("reset")


def connect(a: Worker, b: Worker, dtype: str, tag: str) -> tuple[str, str]:
    """Agents ``A-<tag>`` in a and ``B-<tag>`` in b with random caches, each knowing the other."""
    name_a, name_b = f"A-{tag}", f"B-{tag}"
    info_a = a("create", name=name_a, dtype=dtype, seed=1)
    info_b = b("create", name=name_b, dtype=dtype, seed=2)
    assert a("add_peer", name=name_a, info=info_b) == name_b
    assert b("add_peer", name=name_b, info=info_a) == name_a
    return name_a, name_b


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_write_non_contiguous_blocks_bit_exact(workers: tuple[Worker, Worker], dtype: str) -> None:
    a, b = workers
    name_a, name_b = connect(a, b, dtype, f"write-{dtype}")
    src_a, before_b = a.blocks(name_a, dtype), b.blocks(name_b, dtype)
    src_ids, dst_ids = [1, 2, 3, 7, 20, 21], [4, 5, 6, 30, 10, 11]

    result = a("move", name=name_a, op="write", peer=name_b, local=src_ids, remote=dst_ids,
               notif=b"req-42")

    assert result["num_descs"] == 3  # (1->4 x3), (7->30), (20->10 x2)
    assert result["num_bytes"] == len(src_ids) * src_a.shape[1]
    assert b("notifs", name=name_b, count=1, timeout_s=5.0) == [(name_a, b"req-42")]
    after_b = b.blocks(name_b, dtype)
    assert torch.equal(after_b[dst_ids], src_a[src_ids])
    untouched = [i for i in range(NUM_BLOCKS) if i not in dst_ids]
    assert torch.equal(after_b[untouched], before_b[untouched])
    assert torch.equal(a.blocks(name_a, dtype), src_a)

    b("send", name=name_b, peer=name_a, msg=b"ack-42")  # the reverse direction needs add_peer on b
    assert a("notifs", name=name_a, count=1, timeout_s=5.0) == [(name_b, b"ack-42")]


@pytest.mark.parametrize("use_async", [False, True])
def test_read_pulls_blocks_and_notifies_owner(workers: tuple[Worker, Worker], use_async: bool) -> None:
    a, b = workers
    name_a, name_b = connect(a, b, "bfloat16", f"read-{use_async}")
    owner, before_b = a.blocks(name_a, "bfloat16"), b.blocks(name_b, "bfloat16")
    remote_ids, local_ids = [0, 9, 10, 31], [12, 13, 14, 0]

    b("move", name=name_b, op="read", peer=name_a, local=local_ids, remote=remote_ids,
      notif=b"pulled-7", use_async=use_async)

    after_b = b.blocks(name_b, "bfloat16")
    assert torch.equal(after_b[local_ids], owner[remote_ids])
    untouched = [i for i in range(NUM_BLOCKS) if i not in local_ids]
    assert torch.equal(after_b[untouched], before_b[untouched])
    assert torch.equal(a.blocks(name_a, "bfloat16"), owner)
    assert a("notifs", name=name_a, count=1, timeout_s=5.0) == [(name_b, b"pulled-7")]


def test_peer_with_other_layout_is_refused(workers: tuple[Worker, Worker]) -> None:
    from splitserve.transfer import KVLayoutMismatch

    a, b = workers
    a("create", name="A-layout", dtype="float32", seed=1)
    info_c = b("create", name="C-layout", dtype="float32", seed=3, head_dim=16)
    with pytest.raises(KVLayoutMismatch, match="head_dim: 8 \\(local\\) != 16 \\(remote\\)"):
        a("add_peer", name="A-layout", info=info_c)
    with pytest.raises(ValueError, match="unknown peer"):
        a("move", name="A-layout", op="write", peer="C-layout", local=[0], remote=[0], notif=b"")


def test_injected_failure_moves_nothing_then_agent_still_works(workers: tuple[Worker, Worker]) -> None:
    from splitserve.transfer import TransferError

    a, b = workers
    name_a, name_b = connect(a, b, "float32", "fail")
    a("wrap", name=name_a, new_name="A-fail-faulty", fail_fraction=1.0)
    before_b, src_a = b.blocks(name_b, "float32"), a.blocks(name_a, "float32")

    with pytest.raises(TransferError, match="injected failure"):
        a("move", name="A-fail-faulty", op="write", peer=name_b, local=[0, 1], remote=[2, 3],
          notif=b"req-doomed")
    assert b("notifs", name=name_b, count=1, timeout_s=0.3) == []
    assert torch.equal(b.blocks(name_b, "float32"), before_b)

    a("move", name=name_a, op="write", peer=name_b, local=[0, 1], remote=[2, 3], notif=b"req-ok")
    assert b("notifs", name=name_b, count=1, timeout_s=5.0) == [(name_a, b"req-ok")]
    assert torch.equal(b.blocks(name_b, "float32")[[2, 3]], src_a[[0, 1]])


def test_delayed_transfer_times_out_and_never_lands(workers: tuple[Worker, Worker]) -> None:
    from splitserve.transfer import TransferTimeout

    a, b = workers
    name_a, name_b = connect(a, b, "float32", "delay")
    a("wrap", name=name_a, new_name="A-delay-slow", delay_fraction=1.0, delay_s=1.0)
    before_b = b.blocks(name_b, "float32")

    started = time.monotonic()
    with pytest.raises(TransferTimeout, match="within 0.2 s"):
        a("move", name="A-delay-slow", op="write", peer=name_b, local=[5], remote=[6],
          notif=b"req-late", timeout_s=0.2)
    assert time.monotonic() - started < 0.9
    assert a("live", name=name_a) == 0
    # Past the injected delay: the cancelled transfer was never posted.
    assert b("notifs", name=name_b, count=1, timeout_s=1.2) == []
    assert torch.equal(b.blocks(name_b, "float32"), before_b)


def test_dead_peer_raises_instead_of_hanging(
    workers: tuple[Worker, Worker], processes: tuple[Worker, Worker, Worker]
) -> None:
    from splitserve.transfer import TransferError

    a, _ = workers
    doomed = processes[2]
    try:
        a("create", name="A-dead", dtype="float32", seed=1)
        a("add_peer", name="A-dead", info=doomed("create", name="D-dead", dtype="float32", seed=4))
        a("move", name="A-dead", op="write", peer="D-dead", local=[0], remote=[0], notif=b"")
        doomed.conn.send(("die", {}))
        doomed.proc.join(10)
        with pytest.raises(TransferError, match="D-dead"):
            a("move", name="A-dead", op="write", peer="D-dead", local=[1], remote=[1], notif=b"x",
              timeout_s=5.0)
        assert a("live", name="A-dead") == 0
    finally:
        doomed.stop()

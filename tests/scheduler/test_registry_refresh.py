"""The registry asks a replica for its stats directly when Serve's broadcast of them lags, and only then."""

from __future__ import annotations

import asyncio

import pytest

from splitserve.scheduler.directory import Member
from splitserve.scheduler.worker_registry import WorkerRegistry

pytestmark = pytest.mark.unit


def stats(seq: int) -> dict:
    return {"worker_id": "decode-a", "role": "decode", "num_waiting": 0, "num_running": 0, "num_free_blocks": 8,
            "num_total_blocks": 8, "num_blocks_in_flight": 0, "block_size": 16, "num_queued_tokens": 0, "seq": seq, "time": float(seq)}


class Replica:
    """Answers ``record_routing_stats`` with a newer report each time (or fails, when dead)."""

    def __init__(self, dead: bool = False) -> None:
        self.dead, self.calls, self.seq = dead, 0, 100

    @property
    def record_routing_stats(self) -> "Replica":
        return self

    async def remote(self) -> dict:
        self.calls += 1
        if self.dead:
            raise RuntimeError("actor died")
        self.seq += 1
        return stats(self.seq)


class Broadcast:
    """What Serve's router published: a report that ``seq`` says is new or not."""

    def __init__(self, replica: Replica) -> None:
        self.replica, self.seq = replica, 1

    def members(self) -> dict[str, Member]:
        return {"decode-a": Member("decode-a", "decode", self.replica, b"", stats(self.seq))}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def test_stale_broadcast_is_refreshed_directly_and_fresh_one_is_not():
    async def body() -> None:
        replica = Replica()
        broadcast = Broadcast(replica)
        registry = WorkerRegistry(broadcast, refresh_after_s=0.2)
        await registry.sync()  # a new report: nothing to ask
        await asyncio.sleep(0.01)
        assert replica.calls == 0 and registry.reports["decode-a"]["seq"] == 1
        for seq in range(2, 6):  # Serve keeps publishing: still nothing to ask
            broadcast.seq = seq
            await registry.sync()
            await asyncio.sleep(0.05)
        assert replica.calls == 0
        await asyncio.sleep(0.25)  # the broadcast stalls past refresh_after_s
        await registry.sync()
        await asyncio.sleep(0.01)
        assert replica.calls == 1 and registry.reports["decode-a"]["seq"] == 101  # the direct answer is in the view
        assert registry.healthy_ids() == {"decode-a"}
        await registry.sync()
        await asyncio.sleep(0.01)
        assert replica.calls == 1  # fresh again: no second call

    asyncio.run(body())


def test_a_dead_replica_is_asked_at_most_once_per_refresh_period():
    async def body() -> None:
        replica = Replica(dead=True)
        registry = WorkerRegistry(Broadcast(replica), refresh_after_s=0.2)
        await registry.sync()
        for _ in range(10):  # 0.3 s of ticks with a stale report
            await asyncio.sleep(0.03)
            await registry.sync()
        assert 1 <= replica.calls <= 2, replica.calls

    asyncio.run(body())

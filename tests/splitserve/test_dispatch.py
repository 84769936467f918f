"""Dispatcher edge cases with stand-in handles (no engine): calls held for a dead replica give up as soon as
another call finds it dead, and no cleanup is sent to a worker that is gone."""

from __future__ import annotations

import asyncio
import time

import pytest

from splitserve.cleanup import Janitor
from splitserve.dispatch import Dispatcher, RetryableError, WorkerDied
from splitserve.metrics import Metrics
from splitserve.router import RoutedRequest
from splitserve.scheduler import PairDecision
from splitserve.scheduler.worker_registry import WorkerRegistry
from tests.splitserve.conftest import greedy

pytestmark = pytest.mark.unit


class HeldCall:
    """``handle.method.remote(...)`` of a replica that died: Serve holds the call until a replacement is up."""

    def __init__(self, calls: list[str], name: str) -> None:
        self.calls, self.name = calls, name

    def remote(self, *args):
        self.calls.append(self.name)
        return asyncio.get_running_loop().create_future()  # never answered


class DeadReplica:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> HeldCall:
        return HeldCall(self.calls, name)


def dispatcher(handles: dict) -> tuple[Dispatcher, WorkerRegistry]:
    registry = WorkerRegistry({}, handles)
    return Dispatcher(registry, Metrics(), Janitor(timeout_s=1.0), prefill_timeout_s=60, call_timeout_s=30), registry


def test_a_reservation_held_for_a_dead_replica_gives_up_when_another_call_finds_it_dead():
    async def body():
        dead = DeadReplica()
        dispatch, registry = dispatcher({"decode-0": dead})
        req = RoutedRequest("r1", list(range(5, 40)), greedy(4))
        attempt = dispatch.attempt(req, PairDecision("prefill-0", "decode-0", "test"))
        task = asyncio.ensure_future(attempt.__anext__())
        await asyncio.sleep(0.1)
        assert not task.done()  # held, as Serve holds it (for up to call_timeout_s = 30 s)
        t0 = time.monotonic()
        registry.mark_dead("decode-0")  # e.g. a stream from decode-0 just failed with ActorDiedError
        with pytest.raises(RetryableError, match="reserve_failed on decode-0: WorkerDied") as info:
            await task
        assert time.monotonic() - t0 < 1.0 and isinstance(info.value.cause, WorkerDied)
        await asyncio.sleep(0.05)
        assert dead.calls == ["reserve_for"]  # no release sent to a process that is gone

    asyncio.run(body())


def test_a_stream_waiting_for_its_first_chunk_from_a_dead_replica_gives_up_too():
    class HeldStream:
        def options(self, stream: bool = False):
            return self

        @property
        def generate(self):
            return self

        def remote(self, body):
            async def never():
                await asyncio.Event().wait()
                yield {}

            return never()

    async def body():
        dispatch, registry = dispatcher({"decode-0": HeldStream()})
        req = RoutedRequest("r2", list(range(5, 40)), greedy(4))
        task = asyncio.ensure_future(dispatch.attempt(req, PairDecision(None, "decode-0", "test")).__anext__())
        await asyncio.sleep(0.05)
        registry.mark_dead("decode-0")
        with pytest.raises(WorkerDied):
            await task
        assert "decode-0" not in registry.healthy_ids()

    asyncio.run(body())

"""Dispatcher edge cases with stand-in handles (no engine): calls held for a dead replica give up as soon as
another call finds it dead, and no cleanup is sent to a worker that is gone."""

from __future__ import annotations

import asyncio
import time

import pytest

from splitserve.cleanup import Janitor
from splitserve.dispatch import Dispatcher, RetryableError, WorkerDied
from splitserve.failures import WorkerLeft
from splitserve.metrics import Metrics
from splitserve.router import RoutedRequest
from splitserve.scheduler import PairDecision
from splitserve.scheduler.directory import Member
from splitserve.scheduler.worker_registry import WorkerRegistry
from splitserve.serve_router import ReplicaGone
from splitserve.worker_messages import OutputChunk, PrefillResult, Reservation, TokenBatch
from tests.splitserve.conftest import greedy

pytestmark = pytest.mark.unit


class HeldCall:
    """``handle.method.remote(...)`` of a replica that died: Serve holds the call (or a stream's first item)
    until a replacement is up."""

    def __init__(self, calls: list[str], name: str) -> None:
        self.calls, self.name = calls, name

    def remote(self, *args):
        self.calls.append(self.name)
        return self

    def __await__(self):
        return asyncio.get_running_loop().create_future().__await__()  # never answered

    def __aiter__(self):
        return self

    def __anext__(self):
        return asyncio.get_running_loop().create_future()  # never answered


class DeadReplica:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def options(self, **kwargs) -> "DeadReplica":
        return self

    def __getattr__(self, name: str) -> HeldCall:
        return HeldCall(self.calls, name)


class Handles:
    """A fixed set of workers for the registry: decode role, no NIXL info, no stats."""

    def __init__(self, handles: dict) -> None:
        self._members = {w: Member(w, "decode", h, b"", None) for w, h in handles.items()}

    def members(self) -> dict:
        return self._members

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def dispatcher(handles: dict) -> tuple[Dispatcher, WorkerRegistry]:
    registry = WorkerRegistry(Handles(handles))
    return Dispatcher(registry, Metrics(), Janitor(timeout_s=1.0), prefill_timeout_s=60, call_timeout_s=30), registry


def test_a_reservation_held_for_a_dead_replica_gives_up_when_another_call_finds_it_dead():
    async def body():
        dead = DeadReplica()
        dispatch, registry = dispatcher({"decode-0": dead})
        await registry.sync()
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
        # no abort sent to a process that is gone (the registry may ask it for its stats: they look stale)
        assert [c for c in dead.calls if c not in ("record_routing_stats", "feed")] == ["serve_prefilled"]

    asyncio.run(body())


def test_a_stream_waiting_for_its_first_chunk_from_a_dead_replica_gives_up_too():
    class HeldStream:
        def options(self, stream: bool = False):
            return self

        @property
        def generate(self):
            return self

        feed = generate  # neither the request's call nor the token feed ever answers

        def remote(self, body, feed_id=None):
            async def never():
                await asyncio.Event().wait()
                yield {}

            return never()

    async def body():
        dispatch, registry = dispatcher({"decode-0": HeldStream()})
        await registry.sync()
        req = RoutedRequest("r2", list(range(5, 40)), greedy(4))
        task = asyncio.ensure_future(dispatch.attempt(req, PairDecision(None, "decode-0", "test")).__anext__())
        await asyncio.sleep(0.05)
        registry.mark_dead("decode-0")
        with pytest.raises(WorkerDied):
            await task
        assert "decode-0" not in registry.healthy_ids()

    asyncio.run(body())


class Decode:
    """Reserves (after ``while_reserving()``), then sends token 99 on the token feed once the prefill is done."""

    def __init__(self) -> None:
        self.aborted: list[str] = []
        self.settled: list[str | None] = []  # the transfer id each abort said no write into can land
        self.transfer_ids: list[str] = []  # the router's name for each reservation it asked for
        self.prefilled = asyncio.Event()
        self.req_id = None
        self.while_reserving = lambda: None

    def options(self, **kwargs) -> "Decode":
        return self

    @property
    def serve_prefilled(self):
        decode = self

        class _Call:
            def remote(self, req, feed_id, transfer_id):
                decode.req_id = req.req_id
                decode.transfer_ids.append(transfer_id)

                async def stream():
                    decode.while_reserving()
                    yield Reservation(0, [1, 2, 3], transfer_id, time.time() + 60)
                    await asyncio.Event().wait()  # decoding: the tokens go on the feed

                return stream()

        return _Call()

    @property
    def feed(self):
        decode = self

        class _Feed:
            def remote(self, feed_id):
                async def stream():
                    await decode.prefilled.wait()
                    yield TokenBatch([OutputChunk(decode.req_id, [99], "x", False, None, 35, 1, 0)])
                    await asyncio.Event().wait()

                return stream()

        return _Feed()

    @property
    def abort(self):
        decode = self

        class _Abort:
            async def remote(self, req_id, settled_transfer_id=None):
                decode.aborted.append(req_id)
                decode.settled.append(settled_transfer_id)

        return _Abort()


def paired(decode: Decode, prefill: object) -> tuple[Dispatcher, WorkerRegistry]:
    """A dispatcher over decode-0 and prefill-0, taken as paired (the stand-ins have no add_peers)."""
    members = {"decode-0": Member("decode-0", "decode", decode, b"", None), "prefill-0": Member("prefill-0", "prefill", prefill, b"", None)}
    registry = WorkerRegistry(Handles({}))
    registry._members = members
    return Dispatcher(registry, Metrics(), Janitor(timeout_s=1.0), prefill_timeout_s=60, call_timeout_s=30), registry


async def attempt_fails(dispatch: Dispatcher, req_id: str, error: type, match: str) -> pytest.ExceptionInfo:
    """One attempt of a 35-token request on prefill-0 + decode-0 that must fail; its cleanup calls have landed."""
    req = RoutedRequest(req_id, list(range(5, 40)), greedy(4))
    with pytest.raises(error, match=match) as info:
        async for _ in dispatch.attempt(req, PairDecision("prefill-0", "decode-0", "test")):
            pass
    await asyncio.sleep(0.05)
    return info


def test_a_decode_stream_that_does_not_start_from_the_prefill_token_is_refused():
    """D's first token must be the one P sampled (both see the same KV): a mismatch is an error, not a wrong answer."""
    class Prefill:
        @property
        def prefill(self):
            return self

        async def remote(self, msg):
            decode.prefilled.set()
            return PrefillResult(msg.req.req_id, 7, 0, 0.1, 100, 0.01)

    decode = Decode()

    async def body():
        dispatch, registry = paired(decode, Prefill())
        await attempt_fails(dispatch, "r3", RuntimeError, "started from token 99, the prefill sampled 7")
        assert registry.handle("decode-0").aborted == ["r3"]  # the request is let go on D
        assert decode.settled == decode.transfer_ids and decode.transfer_ids[0].startswith("r3#")  # P's write completed

    asyncio.run(body())


def test_a_prefill_worker_that_leaves_while_the_decode_worker_reserves_is_retried_as_its_own_failure():
    """A scale-down removes P between the pairing and the prefill call: the attempt fails as P's (the router
    retries on another P), not as D's (with one decode worker, that failed the request: a 500 in CI)."""
    async def body():
        dispatch, registry = paired(decode, object())
        decode.while_reserving = lambda: registry._members.pop("prefill-0")  # what sync() does when P left
        info = await attempt_fails(dispatch, "r4", RetryableError, "prefill_failed on prefill-0: WorkerLeft: prefill-0 is no longer serving")
        assert info.value.worker_id == "prefill-0" and isinstance(info.value.cause, WorkerLeft)
        assert decode.aborted == ["r4"]  # D's reservation is let go
        assert decode.settled == decode.transfer_ids  # at once: no prefill worker was asked to write into it

    decode = Decode()
    asyncio.run(body())


def test_an_attempt_abandoned_while_the_prefill_worker_may_be_writing_keeps_the_blocks_fenced():
    """The client leaves while P prefills (and may be writing into D's blocks): the abort names no settled
    transfer, so D keeps the blocks until P says it is done (freeing them at once could let P's late write land
    in another request's KV)."""
    class SlowPrefill:
        @property
        def prefill(self):
            return self

        async def remote(self, msg):
            await asyncio.Event().wait()

    async def body():
        dispatch, _ = paired(decode, SlowPrefill())
        req = RoutedRequest("r5", list(range(5, 40)), greedy(4))

        async def consume():
            async for _ in dispatch.attempt(req, PairDecision("prefill-0", "decode-0", "test")):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        assert decode.aborted == ["r5"] and decode.settled == [None]

    decode = Decode()
    asyncio.run(body())


def test_a_prefill_call_serve_refused_to_route_frees_the_reservation_at_once():
    """Serve's router refused the call (the pinned replica left): P never got it, so nothing can land in D's
    blocks and the abort says so (D would otherwise keep them until the reservation's write_by)."""
    class GonePrefill:
        @property
        def prefill(self):
            return self

        async def remote(self, msg):
            raise ReplicaGone("prefill-0 left its deployment")

    async def body():
        dispatch, _ = paired(decode, GonePrefill())
        await attempt_fails(dispatch, "r6", RetryableError, "prefill_failed on prefill-0")
        assert decode.aborted == ["r6"] and decode.settled == decode.transfer_ids

    decode = Decode()
    asyncio.run(body())


class CancelledByServe:
    """A call that Serve cancels (the client left): awaiting it ends in Serve's RequestCancelledError."""

    def __init__(self) -> None:
        self.cancelled = asyncio.get_running_loop().create_future()

    def cancel(self) -> None:
        if not self.cancelled.done():
            self.cancelled.set_result(None)

    def __await__(self):
        try:
            yield from self.cancelled.__await__()
        except asyncio.CancelledError:
            pass
        raise RuntimeError("Request x was cancelled.")  # what Serve's handle raises in place of CancelledError


def test_a_call_abandoned_by_a_cancelled_request_logs_no_unretrieved_exception(caplog):
    """An outsider's hung-up clients left 138 "Task exception was never retrieved" tracebacks in the ingress's log."""
    async def body():
        d, _ = dispatcher({"decode-0": DeadReplica()})
        call = CancelledByServe()
        waiting = asyncio.ensure_future(d._unless_dead("decode-0", call, 30))
        await asyncio.sleep(0.01)
        waiting.cancel()  # the HTTP request was cancelled; the call then ends with Serve's error
        with pytest.raises(asyncio.CancelledError):
            await waiting
        for _ in range(5):
            await asyncio.sleep(0)

    with caplog.at_level("ERROR", logger="asyncio"):
        asyncio.run(body())
        import gc

        gc.collect()
    assert "never retrieved" not in caplog.text

"""Token feeds: the worker's per-step batches (``FeedHub``) and the ingress's readers (``FeedReaders``)."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from splitserve.failures import WorkerDied
from splitserve.feed_reader import FeedEnded, FeedReaders
from splitserve.token_feed import FeedHub
from splitserve.worker_messages import OutputChunk, TokenBatch

pytestmark = pytest.mark.unit

PARENT = contextvars.ContextVar("parent_request", default=None)


def chunk(req_id: str, tokens: list[int], finished: bool = False) -> OutputChunk:
    return OutputChunk(req_id, tokens, "".join(f"<{t}>" for t in tokens), finished, "length" if finished else None, 4, len(tokens), 0)


async def next_batch(stream) -> TokenBatch:
    return await asyncio.wait_for(stream.__anext__(), 1.0)


def test_a_feed_batches_every_request_and_merges_a_lagging_requests_chunks():
    async def body():
        hub = FeedHub()
        hub.bind("ingress-a")
        feed = hub.bind("ingress-a")
        feed.push(chunk("r1", [1]))
        feed.push(chunk("r2", [7]))
        feed.push(chunk("r1", [2], finished=True))  # the reader lagged a step behind r1
        stream = hub.read("ingress-a")
        batch = await next_batch(stream)
        assert [(c.req_id, c.new_token_ids, c.new_text, c.finished) for c in batch.chunks] == [
            ("r1", [1, 2], "<1><2>", True), ("r2", [7], "<7>", False),
        ]
        feed.push(chunk("r2", [8]))
        assert [c.new_token_ids for c in (await next_batch(stream)).chunks] == [[8]]
        await stream.aclose()

    asyncio.run(body())


def test_chunks_wait_for_a_reader_that_comes_late_and_a_new_reader_takes_over():
    async def body():
        hub = FeedHub()
        feed = hub.bind("ingress-a")
        feed.push(chunk("r1", [1]))  # the request's call got there before the ingress's feed call
        first = hub.read("ingress-a")
        assert [c.new_token_ids for c in (await next_batch(first)).chunks] == [[1]]
        waiting = asyncio.ensure_future(first.__anext__())
        await asyncio.sleep(0.01)
        second = hub.read("ingress-a")  # the ingress reopened its feed
        next_of_second = asyncio.ensure_future(next_batch(second))
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiting, 1.0)  # the reader it replaced has left
        feed.push(chunk("r1", [2]))
        assert [c.new_token_ids for c in (await next_of_second).chunks] == [[2]]
        await second.aclose()
        assert len(hub) == 1  # still bound to a request
        hub.unbind("ingress-a")
        assert len(hub) == 0  # no request and no reader: dropped

    asyncio.run(body())


class FakeWorker:
    """A worker handle whose ``feed`` streams the batches put into ``batches``; records opened and closed feeds
    and the request context each feed call was made under (Serve cancels calls with their request)."""

    def __init__(self) -> None:
        self.batches: asyncio.Queue = asyncio.Queue()
        self.opened: list[object] = []
        self.closed = 0

    def options(self, **kwargs) -> "FakeWorker":
        return self

    @property
    def feed(self) -> "FakeWorker":
        return self

    def remote(self, feed_id: str):
        self.opened.append(PARENT.get())
        worker = self

        async def stream():
            try:
                while True:
                    item = await worker.batches.get()
                    if isinstance(item, BaseException):
                        raise item
                    if item is None:
                        return
                    yield item
            finally:
                worker.closed += 1

        return stream()


async def get(sub) -> object:
    return await asyncio.wait_for(sub.get(), 1.0)


def test_a_reader_hands_each_request_its_chunks_and_closes_when_idle():
    async def body():
        worker = FakeWorker()
        readers = FeedReaders("ingress-a", idle_close_s=0.05)
        PARENT.set("http-request-1")  # the request whose arrival opens the feed
        a = readers.subscribe("decode-0", worker, "r1")
        b = readers.subscribe("decode-0", worker, "r2")
        worker.batches.put_nowait(TokenBatch([chunk("r2", [5]), chunk("gone", [9]), chunk("r1", [3])]))
        assert (await get(a)).new_token_ids == [3] and (await get(b)).new_token_ids == [5]
        assert worker.opened == [None]  # one feed for both, not a child of the request that opened it
        a.close()
        await asyncio.sleep(0.1)
        assert worker.closed == 0  # r2 still streams
        b.close()
        await asyncio.sleep(0.1)
        assert worker.closed == 1 and readers.num_open == 0  # idle: closed
        c = readers.subscribe("decode-0", worker, "r3")  # the next request reopens it
        worker.batches.put_nowait(TokenBatch([chunk("r3", [1])]))
        assert (await get(c)).new_token_ids == [1] and len(worker.opened) == 2
        c.close()

    asyncio.run(body())


def test_a_failed_or_ended_feed_is_every_waiting_requests_error():
    async def body():
        worker = FakeWorker()
        readers = FeedReaders("ingress-a")
        a, b = readers.subscribe("decode-0", worker, "r1"), readers.subscribe("decode-0", worker, "r2")
        worker.batches.put_nowait(RuntimeError("replica crashed"))
        for sub in (a, b):
            error = await get(sub)
            assert isinstance(error, RuntimeError) and "replica crashed" in str(error)
        c = readers.subscribe("decode-0", worker, "r3")  # a fresh reader after the failure
        worker.batches.put_nowait(None)  # the worker ended its feed while r3 waited
        assert isinstance(await get(c), FeedEnded)

    asyncio.run(body())


def test_a_worker_found_dead_elsewhere_ends_its_requests_at_once():
    async def body():
        worker = FakeWorker()
        death = asyncio.get_running_loop().create_future()
        readers = FeedReaders("ingress-a", death_signal=lambda worker_id: death)
        a = readers.subscribe("decode-0", worker, "r1")
        await asyncio.sleep(0.01)
        death.set_result(None)  # another call found decode-0 dead; its feed would never say so
        assert isinstance(await get(a), WorkerDied)
        await asyncio.sleep(0.01)
        assert worker.closed == 1 and readers.num_open == 0

    asyncio.run(body())


def test_a_lagging_request_gets_what_waited_as_one_chunk_and_an_error_after_it():
    async def body():
        worker = FakeWorker()
        readers = FeedReaders("ingress-a")
        sub = readers.subscribe("decode-0", worker, "r1")
        for t in (1, 2, 3):
            worker.batches.put_nowait(TokenBatch([chunk("r1", [t])]))
        await asyncio.sleep(0.05)  # the consumer was busy while three steps came in
        merged = await get(sub)
        assert (merged.new_token_ids, merged.new_text) == ([1, 2, 3], "<1><2><3>")
        worker.batches.put_nowait(TokenBatch([chunk("r1", [4])]))
        worker.batches.put_nowait(RuntimeError("replica crashed"))
        await asyncio.sleep(0.05)
        assert (await get(sub)).new_token_ids == [4]  # the chunk before the error first
        assert isinstance(await get(sub), RuntimeError)
        sub.close()

    asyncio.run(body())


def test_a_token_batch_crosses_processes_as_the_same_typed_chunks():
    """A feed's batch is pickled as one msgpack blob of its chunks' fields (Ray's pickler, and plain pickle)."""
    import dataclasses
    import pickle

    import msgpack
    from ray import cloudpickle

    batch = TokenBatch([
        OutputChunk("r1", [5, 6], "héllo \u2603 \ud800", False, None, 12, 2, 4, 0.25),
        OutputChunk("r2", [], "", True, "stop", 3, 9, 0, 1.5),
    ])
    for dumps, loads in ((cloudpickle.dumps, cloudpickle.loads), (pickle.dumps, pickle.loads)):
        back = loads(dumps(batch))
        assert type(back) is TokenBatch and all(type(c) is OutputChunk for c in back.chunks)
        assert back == batch
    _, (blob,) = batch.__reduce__()
    assert [len(row) for row in msgpack.unpackb(blob, unicode_errors="surrogatepass")] == [len(dataclasses.fields(OutputChunk))] * 2

"""A worker's side of the token feed: every request's new tokens for one ingress replica, one item per step.

Without a feed, each streamed token is one item on each request's own Serve
stream: per token and request, a pickle, a gRPC message and a wake-up on both
ends. With one, a request started with a ``feed_id`` (``EngineWorker.generate``,
``resume``, ``DecodeWorker.serve_prefilled``) still has its own call (Serve
counts it in flight, a cancelled call aborts the request, an error ends it), but
its ``OutputChunk``s go to the ``TokenFeed`` of that id, and the ingress reads
the feed (``EngineWorker.feed``): one ``TokenBatch`` per engine step with every
request's new tokens. A reader that lags gets fewer, larger chunks (a request's
waiting chunks are merged).

Life of a feed on the worker: created by whichever comes first, a request bound
to it or its reader; a new reader of the same id takes over from an old one;
dropped when no request is bound and nobody reads it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from splitserve.worker_messages import OutputChunk, TokenBatch


class TokenFeed:
    """Chunks waiting for the reader, one (merged) per request, in the order requests first had one."""

    def __init__(self) -> None:
        self.pending: dict[str, OutputChunk] = {}
        self.ready = asyncio.Event()
        self.num_bound = 0  # requests streaming into this feed
        self.reader = 0  # the current reader's number; 0: none
        self._readers = 0

    def push(self, chunk: OutputChunk) -> None:
        before = self.pending.get(chunk.req_id)
        self.pending[chunk.req_id] = chunk if before is None else before.then(chunk)
        self.ready.set()

    def take(self) -> list[OutputChunk]:
        chunks = list(self.pending.values())
        self.pending.clear()
        self.ready.clear()
        return chunks

    def new_reader(self) -> int:
        self._readers += 1
        self.reader = self._readers
        self.ready.set()  # wakes the reader it replaces, which then leaves
        return self.reader


class FeedHub:
    """The feeds of one worker, by id (each ingress replica reads its own)."""

    def __init__(self) -> None:
        self._feeds: dict[str, TokenFeed] = {}

    def __len__(self) -> int:
        return len(self._feeds)

    def _feed(self, feed_id: str) -> TokenFeed:
        feed = self._feeds.get(feed_id)
        if feed is None:
            feed = self._feeds[feed_id] = TokenFeed()
        return feed

    def bind(self, feed_id: str) -> TokenFeed:
        """A request starts streaming into ``feed_id``; ``unbind`` when it ends."""
        feed = self._feed(feed_id)
        feed.num_bound += 1
        return feed

    def unbind(self, feed_id: str) -> None:
        feed = self._feeds.get(feed_id)
        if feed is not None:
            feed.num_bound -= 1
            self._drop_if_unused(feed_id, feed)

    def _drop_if_unused(self, feed_id: str, feed: TokenFeed) -> None:
        if feed.num_bound <= 0 and not feed.reader and self._feeds.get(feed_id) is feed:
            del self._feeds[feed_id]

    async def read(self, feed_id: str) -> AsyncIterator[TokenBatch]:
        """Every step's chunks of the requests bound to ``feed_id``, until the reader leaves or another takes over."""
        feed = self._feed(feed_id)
        me = feed.new_reader()
        try:
            while True:
                await feed.ready.wait()
                if feed.reader != me:
                    return
                chunks = feed.take()
                if chunks:
                    yield TokenBatch(chunks)
        finally:
            if feed.reader == me:
                feed.reader = 0
                self._drop_if_unused(feed_id, feed)

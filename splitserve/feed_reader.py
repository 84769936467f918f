"""The ingress's side of the token feeds (``splitserve.token_feed``): one reader per worker, each request its inbox.

``FeedReaders.subscribe(worker_id, handle, req_id)`` is called before a request's
call to the worker starts (so no chunk of it can come before its inbox exists);
the returned ``Subscription`` is where its ``OutputChunk``s arrive, and where an
error is put when the feed fails (the worker died) or ends while the request
still streams. ``close()`` it when the request ends. When another call finds the worker dead
(``death_signal``), every request on its feed gets ``WorkerDied`` at once.

A worker's feed is read while a request of this ingress runs there, and closed
``idle_close_s`` after the last one ended: a replica that Serve drains for
shut-down is held by its feed no longer than that. The reader runs in a fresh
``contextvars`` context, because Serve cancels every call an HTTP request
started when its client leaves, and a feed serves all the requests on its
worker, not only the one whose arrival opened it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from splitserve.failures import WorkerDied
from splitserve.worker_messages import OutputChunk

logger = logging.getLogger(__name__)


class FeedEnded(RuntimeError):
    """A worker's token feed ended while requests were streaming on it."""


class Subscription:
    """One request's inbox on a worker's feed. A consumer that lags (a slow client) gets the chunks that waited
    as one (``OutputChunk.then``); an error is handed over after the chunks before it."""

    def __init__(self, reader: _Reader, req_id: str) -> None:
        self._items: deque[OutputChunk | BaseException] = deque()
        self._ready = asyncio.Event()
        self._reader = reader
        self.req_id = req_id

    async def get(self) -> OutputChunk | BaseException:
        items = self._items
        while not items:
            self._ready.clear()
            await self._ready.wait()
        item = items.popleft()
        while items and isinstance(item, OutputChunk) and not item.finished and isinstance(items[0], OutputChunk):
            item = item.then(items.popleft())
        return item

    def put(self, item: OutputChunk | BaseException) -> None:
        self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        self._reader.unsubscribe(self)


class _Reader:
    def __init__(self, owner: FeedReaders, worker_id: str, handle: Any) -> None:
        self.owner = owner
        self.worker_id = worker_id
        self.handle = handle
        self.inboxes: dict[str, Subscription] = {}
        self.idle_timer: asyncio.TimerHandle | None = None
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(self._run(), name=f"feed-{worker_id}", context=contextvars.Context())
        self.death = owner.death_signal(worker_id) if owner.death_signal is not None else None
        if self.death is not None:
            self.death.add_done_callback(self._died)

    def subscribe(self, req_id: str) -> Subscription:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        sub = self.inboxes[req_id] = Subscription(self, req_id)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if self.inboxes.get(sub.req_id) is sub:
            del self.inboxes[sub.req_id]
        if not self.inboxes and not self.task.done() and self.idle_timer is None:
            self.idle_timer = asyncio.get_running_loop().call_later(self.owner.idle_close_s, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self.idle_timer = None
        if not self.inboxes:
            self.owner.forget(self)
            self.task.cancel()

    def _died(self, _: asyncio.Future) -> None:
        if self.task.done():
            return
        self.owner.forget(self)
        self.task.cancel()
        for sub in list(self.inboxes.values()):
            sub.put(WorkerDied(f"{self.worker_id} died while its token feed was open"))

    async def _run(self) -> None:
        stream = self.handle.options(stream=True).feed.remote(self.owner.feed_id)
        try:
            async for batch in stream:
                inboxes = self.inboxes
                for chunk in batch.chunks:
                    sub = inboxes.get(chunk.req_id)
                    if sub is not None:  # a chunk of a request that already left has nobody to go to
                        sub.put(chunk)
            error: BaseException = FeedEnded(f"the token feed of {self.worker_id} ended")
        except asyncio.CancelledError:
            raise
        except Exception as e:  # every request streaming here learns it, and handles it as its own stream's error
            error = e
        finally:
            self.owner.forget(self)
            cancel_call(stream)
            if self.death is not None:
                self.death.remove_done_callback(self._died)
        if self.inboxes:
            logger.warning("token feed of %s: %s (%d requests on it)", self.worker_id, type(error).__name__, len(self.inboxes))
        for sub in list(self.inboxes.values()):
            sub.put(error)


class FeedReaders:
    """This ingress's readers of the workers' token feeds; ``feed_id`` names this ingress on every worker."""

    def __init__(
        self, feed_id: str, idle_close_s: float = 2.0, death_signal: Callable[[str], asyncio.Future] | None = None,
    ) -> None:
        """``death_signal(worker_id)``: a future resolved when a call finds the worker dead (``WorkerRegistry``)."""
        self.feed_id = feed_id
        self.death_signal = death_signal
        self.idle_close_s = idle_close_s
        self._readers: dict[str, _Reader] = {}

    def subscribe(self, worker_id: str, handle: Any, req_id: str) -> Subscription:
        reader = self._readers.get(worker_id)
        if reader is None:
            reader = self._readers[worker_id] = _Reader(self, worker_id, handle)
        return reader.subscribe(req_id)

    def forget(self, reader: _Reader) -> None:
        if self._readers.get(reader.worker_id) is reader:
            del self._readers[reader.worker_id]

    @property
    def num_open(self) -> int:
        return len(self._readers)


def cancel_call(call: Any) -> None:
    """Cancel a Serve call or stream (anything with ``cancel()``), quietly."""
    cancel = getattr(call, "cancel", None)
    if cancel is not None:
        try:
            cancel()
        except Exception:
            pass

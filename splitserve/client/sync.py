"""``Client``: the blocking client, a thin shell over ``AsyncClient``.

Every call runs on one private event loop in a daemon thread (started on first
use, stopped by ``close``), so there is one implementation of retries, pacing
and timing, and the blocking client works in scripts, Ray tasks and notebooks
alike (the caller's own event loop, if any, is never touched). Streams hand
chunks across one at a time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from splitserve.client.async_client import DEFAULT_BASE_URL, AsyncClient, AsyncCompletionStream
from splitserve.client.pacing import AIMDController
from splitserve.client.errors import SplitserveError
from splitserve.client.types import Chunk, Completion, Request

T = TypeVar("T")


class _LoopThread:
    """An event loop in a daemon thread; ``call`` runs a coroutine there and waits for it."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="splitserve-client", daemon=True)
                self._thread.start()
        assert self._thread is not threading.current_thread(), "a blocking Client call from inside its own loop"
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:  # KeyboardInterrupt included: do not leave the coroutine running
            future.cancel()
            raise

    def close(self) -> None:
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is not None:
            asyncio.run_coroutine_threadsafe(_drain(loop), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()


async def _drain(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is still running on the loop (abandoned streams) and finalise async generators."""
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks(loop) if t is not me]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await loop.shutdown_asyncgens()


class Client:
    """The blocking client; same arguments and methods as ``AsyncClient`` (see there).

    Safe to share between threads: every call runs on the client's own loop.
    Close it (``close()`` or ``with``) to stop that loop's thread.

    >>> with Client("http://127.0.0.1:8000") as client:
    ...     print(client.complete("Hello", max_tokens=8).text)
    ...     for chunk in client.stream("Hello", max_tokens=8):
    ...         print(chunk.text, end="")
    ...     results = client.batch(["a", "b", "c"], concurrency=4, progress=True, max_tokens=8)
    """

    def __init__(self, base_url: str = DEFAULT_BASE_URL, **kwargs: Any) -> None:
        self._runner = _LoopThread()
        self._async = AsyncClient(base_url, **kwargs)

    @property
    def base_url(self) -> str:
        return self._async.base_url

    @property
    def aio(self) -> AsyncClient:
        """The underlying ``AsyncClient`` (use it only from ``Client``'s own loop, e.g. not at all)."""
        return self._async

    def close(self) -> None:
        try:
            self._runner.call(self._async.aclose())
        finally:
            self._runner.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def models(self) -> list[str]:
        return self._runner.call(self._async.models())

    def complete(self, prompt: str | list[int], **params: Any) -> Completion:
        return self._runner.call(self._async.complete(prompt, **params))

    def chat(self, messages: list[dict[str, Any]], **params: Any) -> Completion:
        return self._runner.call(self._async.chat(messages, **params))

    def stream(self, prompt: str | list[int], **params: Any) -> CompletionStream:
        return CompletionStream(self._runner, self._async.stream(prompt, **params))

    def stream_chat(self, messages: list[dict[str, Any]], **params: Any) -> CompletionStream:
        return CompletionStream(self._runner, self._async.stream_chat(messages, **params))

    def batch(self, prompts: Sequence[str | list[int] | Request], *, concurrency: int = 8, progress: bool = False,
              return_exceptions: bool = True, controller: AIMDController | None = None,
              **params: Any) -> list[Completion | SplitserveError]:
        return self._runner.call(self._async.batch(
            prompts, concurrency=concurrency, progress=progress, return_exceptions=return_exceptions,
            controller=controller, **params))

    def batch_chat(self, conversations: Sequence[list[dict[str, Any]] | Request], *, concurrency: int = 8,
                   progress: bool = False, return_exceptions: bool = True, controller: AIMDController | None = None,
                   **params: Any) -> list[Completion | SplitserveError]:
        return self._runner.call(self._async.batch_chat(
            conversations, concurrency=concurrency, progress=progress, return_exceptions=return_exceptions,
            controller=controller, **params))

    def run_batch(self, requests: Sequence[Request], **kwargs: Any) -> list[Completion | SplitserveError]:
        return self._runner.call(self._async.run_batch(requests, **kwargs))


class CompletionStream:
    """A blocking iterator of ``Chunk``; ``completion`` once it has ended. ``close()`` (or ``with``) to leave early."""

    def __init__(self, runner: _LoopThread, stream: AsyncCompletionStream) -> None:
        self._runner = runner
        self._stream = stream

    @property
    def completion(self) -> Completion | None:
        return self._stream.completion

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        try:
            return self._runner.call(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def collect(self) -> Completion:
        return self._runner.call(self._stream.collect())

    def close(self) -> None:
        self._runner.call(self._stream.aclose())

    def __enter__(self) -> CompletionStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

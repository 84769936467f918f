"""``AsyncClient``: the asyncio client for splitserve and any OpenAI-compatible server.

One request's life: the body is built from the call's fields (``None`` left
out, so only standard fields reach a server that knows nothing else), sent with
``httpx``, and the answer parsed (``protocol``); every failure becomes one of
the exceptions in ``errors``. Retryable failures (connection errors, 5xx,
429/503) are retried with backoff per ``RetryPolicy``; a stream is retried only
until its first chunk reached the caller.

Batches (``batch``, ``batch_chat``, ``run_batch``) go through the paced queue in
``batch``: always streamed, so every result carries a real TTFT and ITLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import httpx

from splitserve.client import protocol
from splitserve.client.errors import ConnectionFailed, MalformedResponse, RequestTimeout, SplitserveError, error_for_status
from splitserve.client.pacing import AIMDController, RetryPolicy
from splitserve.client.types import Chunk, Completion, Request, Timings, clock

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
USER_AGENT = "splitserve-client/0.1.0"


class AsyncClient:
    """Talks to ``base_url`` (``http://host:8000`` or ``http://host:8000/v1``).

    ``api_key`` (default: ``$SPLITSERVE_API_KEY``) is sent as ``Authorization:
    Bearer``. ``model`` is the default model name (left out when None; splitserve
    then uses the one it serves). ``timeout``: seconds without a byte from the
    server before ``RequestTimeout``; ``connect_timeout``: seconds to connect.
    ``max_retries``: retries after the first try of a retryable failure (or pass
    a ``RetryPolicy`` as ``retry``). ``transport``: an httpx transport (tests).
    Use one instance from one event loop; ``Client`` is the thread-safe blocking form.
    """

    def __init__(
        self, base_url: str = DEFAULT_BASE_URL, *, api_key: str | None = None, model: str | None = None,
        timeout: float = 600.0, connect_timeout: float = 10.0, max_retries: int = 3, retry: RetryPolicy | None = None,
        headers: dict[str, str] | None = None, max_connections: int = 256, transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError(f"timeout and connect_timeout must be > 0 seconds, got {timeout}, {connect_timeout}")
        self.base_url = protocol.api_root(base_url)
        self.model = model
        self.timeout = timeout
        self.retry = retry or RetryPolicy(max_attempts=max_retries + 1)
        api_key = api_key if api_key is not None else os.environ.get("SPLITSERVE_API_KEY")
        all_headers = {"User-Agent": USER_AGENT, **(headers or {})}
        if api_key:
            all_headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.AsyncClient(
            headers=all_headers, timeout=httpx.Timeout(timeout, connect=connect_timeout), transport=transport,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    # ---- lifecycle -----------------------------------------------------------------
    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- single requests -------------------------------------------------------------
    async def models(self) -> list[str]:
        """The ids ``/v1/models`` lists."""
        url = f"{self.base_url}/models"

        async def attempt() -> list[str]:
            with _http_errors(url, self.timeout):
                resp = await self._http.get(url)
            _check_status(resp.status_code, resp.text, resp.headers)
            obj = protocol.parse_json(resp.text)
            try:
                return [m["id"] for m in obj["data"]]
            except (TypeError, KeyError) as e:
                raise MalformedResponse(f"/models response has no data[].id: {resp.text[:200]!r}") from e

        return await self._retrying(attempt)

    async def complete(self, prompt: str | list[int], **params: Any) -> Completion:
        """A completion (not streamed). ``params`` are body fields: ``max_tokens``, ``temperature``, ``stop``,
        ``seed``, ``priority``, ``tenant``, ``return_token_ids``, ``ignore_eos``, ... (None values left out)."""
        return await self._complete(Request(prompt, **params))

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> Completion:
        """A chat completion (not streamed); ``params`` as for ``complete``."""
        return await self._complete(Request(messages=messages, **params))

    def stream(self, prompt: str | list[int], **params: Any) -> AsyncCompletionStream:
        """A streamed completion: ``async for chunk in client.stream(...)``; then ``.completion``."""
        return AsyncCompletionStream(self, Request(prompt, **params))

    def stream_chat(self, messages: list[dict[str, Any]], **params: Any) -> AsyncCompletionStream:
        """A streamed chat completion; ``params`` as for ``complete``."""
        return AsyncCompletionStream(self, Request(messages=messages, **params))

    # ---- batches ------------------------------------------------------------------------
    async def batch(
        self, prompts: Sequence[str | list[int] | Request], *, concurrency: int = 8, progress: bool = False,
        return_exceptions: bool = True, controller: AIMDController | None = None, **params: Any,
    ) -> list[Completion | SplitserveError]:
        """Completions for many prompts through the paced queue; results in input order.

        Each item is a prompt (text or token ids) or a ``Request`` (its own fields
        win over ``params``). At most ``concurrency`` requests are in flight, fewer
        while the server answers 429/503 (see ``pacing.AIMDController``; pass your
        own ``controller`` to tune or inspect it). Every input gets a ``Completion``
        or its error; with ``return_exceptions=False`` a ``BatchFailed`` holding all
        of them is raised if any failed. ``progress`` shows a tqdm bar.
        """
        requests = [p if isinstance(p, Request) else Request(p) for p in prompts]
        return await self.run_batch(requests, concurrency=concurrency, progress=progress,
                                    return_exceptions=return_exceptions, controller=controller, defaults=params)

    async def batch_chat(
        self, conversations: Sequence[list[dict[str, Any]] | Request], *, concurrency: int = 8, progress: bool = False,
        return_exceptions: bool = True, controller: AIMDController | None = None, **params: Any,
    ) -> list[Completion | SplitserveError]:
        """Chat completions for many conversations; as ``batch``."""
        requests = [c if isinstance(c, Request) else Request(messages=c) for c in conversations]
        return await self.run_batch(requests, concurrency=concurrency, progress=progress,
                                    return_exceptions=return_exceptions, controller=controller, defaults=params)

    async def run_batch(
        self, requests: Sequence[Request], *, concurrency: int = 8, progress: bool = False, return_exceptions: bool = True,
        controller: AIMDController | None = None, defaults: dict[str, Any] | None = None,
    ) -> list[Completion | SplitserveError]:
        """``batch`` for a mix of ``Request`` objects (completions and chat)."""
        from splitserve.client.batch import BatchRunner

        runner = BatchRunner(self, list(requests), defaults or {}, controller or AIMDController(concurrency),
                             self.retry, progress=progress)
        return await runner.run(return_exceptions=return_exceptions)

    # ---- internals ------------------------------------------------------------------------
    def _url_body(self, req: Request, defaults: dict[str, Any] | None, stream: bool) -> tuple[str, dict[str, Any]]:
        body = req.body({"model": self.model, **(defaults or {})})
        body["stream"] = stream
        if stream:
            body.setdefault("stream_options", {"include_usage": True})
        else:
            body.pop("stream_options", None)
        return f"{self.base_url}/{'chat/completions' if req.is_chat else 'completions'}", body

    async def _complete(self, req: Request) -> Completion:
        url, body = self._url_body(req, None, stream=False)
        submitted = clock()

        async def attempt(num_attempts: int) -> Completion:
            sent = clock()
            with _http_errors(url, self.timeout):
                resp = await self._http.post(url, json=body)
            _check_status(resp.status_code, resp.text, resp.headers)
            timings = Timings(total_s=clock() - sent, queue_s=sent - submitted, num_attempts=num_attempts)
            return protocol.parse_completion(resp.text, req.is_chat, timings)

        return await self._retrying(attempt, pass_attempt=True)

    async def _retrying(self, attempt: Any, pass_attempt: bool = False) -> Any:
        num_attempts = 0
        while True:
            num_attempts += 1
            try:
                return await (attempt(num_attempts) if pass_attempt else attempt())
            except SplitserveError as e:
                if not self.retry.should_retry(e, num_attempts):
                    raise
                await asyncio.sleep(self.retry.delay_s(num_attempts, getattr(e, "retry_after_s", None)))

    async def _stream_once(self, req: Request, defaults: dict[str, Any] | None,
                           collector: protocol.StreamCollector) -> AsyncIterator[Chunk]:
        """One streamed attempt: yields the chunks worth showing; ``collector`` records everything."""
        url, body = self._url_body(req, defaults, stream=True)
        with _http_errors(url, self.timeout):
            async with self._http.stream("POST", url, json=body, headers={"Accept": "text/event-stream"}) as resp:
                if resp.status_code >= 400:
                    text = (await resp.aread()).decode("utf-8", "replace")
                    _check_status(resp.status_code, text, resp.headers)
                decoder = protocol.SSEDecoder()
                lines = resp.aiter_lines()
                try:
                    async for line in lines:
                        payload = decoder.feed(line)
                        if payload == protocol.DONE:
                            collector.done_at = clock()
                            break  # whatever follows [DONE] is not read (the connection is not reused)
                        if payload is not None:
                            chunk, usage, obj = protocol.parse_chunk(payload, req.is_chat)
                            if collector.add(chunk, usage, obj, clock()):
                                yield chunk
                    else:
                        tail = decoder.flush()
                        if tail == protocol.DONE:
                            collector.done_at = clock()
                        elif tail is not None:
                            raise MalformedResponse(f"the stream ended inside an event: {tail[:200]!r}")
                finally:
                    await lines.aclose()  # now, not when the garbage collector finds it
        if collector.done_at is None and collector.finish_reason is None:
            raise MalformedResponse("the stream ended before 'data: [DONE]' and before any finish_reason")

    async def _collect(self, req: Request, defaults: dict[str, Any] | None, *, queue_s: float,
                       num_attempts: int) -> Completion:
        """One streamed attempt read to the end (the batch path)."""
        collector = protocol.StreamCollector(clock())
        async with contextlib.aclosing(self._stream_once(req, defaults, collector)) as chunks:
            async for _ in chunks:
                pass
        return collector.result(_end_time(collector), queue_s=queue_s, num_attempts=num_attempts)


class AsyncCompletionStream:
    """Chunks of one streamed request; ``completion`` (text, usage, timings) once it has ended.

    Retries (per the client's policy) happen only before the first chunk reached
    you. Leaving early: ``await stream.aclose()`` or ``async with``.
    """

    def __init__(self, client: AsyncClient, request: Request) -> None:
        self._client = client
        self._request = request
        self.completion: Completion | None = None
        self._agen = self._run()

    async def _run(self) -> AsyncIterator[Chunk]:
        client, submitted, num_attempts = self._client, clock(), 0
        while True:
            num_attempts += 1
            sent = clock()
            collector = protocol.StreamCollector(sent)
            has_yielded = False
            try:
                async with contextlib.aclosing(client._stream_once(self._request, None, collector)) as chunks:
                    async for chunk in chunks:
                        has_yielded = True
                        yield chunk  # if the caller leaves here, aclosing closes the HTTP stream at once
            except SplitserveError as e:
                if has_yielded or not client.retry.should_retry(e, num_attempts):
                    raise
                await asyncio.sleep(client.retry.delay_s(num_attempts, getattr(e, "retry_after_s", None)))
                continue
            self.completion = collector.result(_end_time(collector), queue_s=sent - submitted, num_attempts=num_attempts)
            return

    def __aiter__(self) -> AsyncCompletionStream:
        return self

    async def __anext__(self) -> Chunk:
        return await self._agen.__anext__()

    async def collect(self) -> Completion:
        """Read what is left and return the whole completion."""
        async for _ in self:
            pass
        assert self.completion is not None
        return self.completion

    async def aclose(self) -> None:
        await self._agen.aclose()

    async def __aenter__(self) -> AsyncCompletionStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _end_time(collector: protocol.StreamCollector) -> float:
    return collector.done_at if collector.done_at is not None else clock()


def _check_status(status: int, text: str, headers: Any) -> None:
    if status >= 400:
        raise error_for_status(status, text, headers)
    if not 200 <= status < 300:
        raise MalformedResponse(f"unexpected HTTP status {status}: {text[:200]!r}")


@contextlib.contextmanager
def _http_errors(url: str, timeout: float) -> Iterator[None]:
    """httpx's exceptions as the client's own, each saying what failed and where."""
    try:
        yield
    except httpx.ConnectTimeout as e:
        raise ConnectionFailed(f"could not connect to {url} in time: {e!r}") from e
    except httpx.TimeoutException as e:
        raise RequestTimeout(f"{url} sent nothing for {timeout:g} s ({type(e).__name__})") from e
    except httpx.ConnectError as e:
        raise ConnectionFailed(f"cannot connect to {url}: {e} (is the server running?)") from e
    except httpx.DecodingError as e:
        raise MalformedResponse(f"cannot decode the response from {url}: {e}") from e
    except httpx.TransportError as e:
        raise ConnectionFailed(f"connection to {url} failed: {type(e).__name__}: {e}") from e

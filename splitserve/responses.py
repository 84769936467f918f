"""How a request's chunks and failures become HTTP: the SSE stream, and the client's view of a failure.

``sse_events`` renders a request's ``OutputChunk``s (from the router, or one
chunk replayed from the response cache) as OpenAI's streamed events, ending
with an error event and ``[DONE]`` when the request fails: a stream never ends
silently. ``error_for`` maps a routing or serving failure to its status and a
short public reason; the details go to the log under the request id, never to
the client. ``ClosingStreamingResponse`` aborts the request on its worker as
soon as the response ends, however it ends.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from splitserve import openai_protocol as oai
from splitserve.http_guard import APIError, internal_error_message, public_message
from splitserve.router import RequestFailed
from splitserve.scheduler import NoWorkerAvailable, PromptTooLarge
from splitserve.worker_messages import OutputChunk

logger = logging.getLogger(__name__)


def error_for(e: BaseException, req_id: str | None = None) -> APIError:
    """The client's view of a routing or serving failure: a short reason, never internals (see ``public_message``)."""
    if isinstance(e, PromptTooLarge):
        return APIError(400, public_message(e), param="prompt")
    if isinstance(e, NoWorkerAvailable):
        retry = max(1, round(e.retry_after_s or 1))
        logger.warning("request %s refused (503, retry after %d s): %s", req_id, retry, e)  # operators see why
        return APIError(503, f"no worker can take the request now: {public_message(e)}", "ServiceUnavailableError", headers={"Retry-After": str(retry)})
    logger.error("request %s failed: %s", req_id, e, exc_info=e)  # the whole story, server-side only
    message = public_message(e, req_id) if isinstance(e, RequestFailed) else internal_error_message(req_id)
    return APIError(500, message, "InternalServerError")


def ended_early(finish: str | None, req_id: str) -> APIError:
    """A stream that finished without "stop" or "length": the engine ended it ("error": this request alone failed)."""
    reason = "generation failed for this request" if finish == "error" else f"the request ended early ({finish})"
    return APIError(500, f"{reason} (request id {req_id})", "InternalServerError")


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator however the response ends, so the request is aborted on its worker at once.

    When the client leaves, Starlette stops iterating the body (ASGI spec >= 2.4:
    ``send`` raises ``OSError``) but leaves the generator to the garbage
    collector; until then the request keeps decoding for nobody.
    """

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def sse_events(
    chunks: AsyncGenerator[OutputChunk, None], rid: str, num_prompt_tokens: int, model: str, created: int, chat: bool,
    include_usage: bool, return_token_ids: bool,
) -> AsyncIterator[bytes]:
    """OpenAI's streamed events for one request's ``chunks`` (chat or completion shape), then usage and ``[DONE]``."""
    n_out = 0
    text_events = oai.TextEvents(rid, model, created, chat)
    if chat:
        yield oai.sse_event(oai.chat_chunk(rid, model, "", role="assistant", created=created))
    try:
        async with contextlib.aclosing(chunks):  # closed with this stream, so the request is aborted at once
            async for chunk in chunks:
                n_out = chunk.num_output_tokens
                finish = chunk.finish_reason if chunk.finished else None
                if finish not in (None, "stop", "length"):
                    err = ended_early(finish, rid)
                    yield oai.sse_event(oai.error_body(err.message, err.type, None, err.status))
                    yield oai.sse_event("[DONE]")
                    return
                text = chunk.new_text
                if not text and finish is None and not (return_token_ids and chunk.new_token_ids):
                    continue
                if finish is None and not return_token_ids:  # most events: only the text changes
                    yield text_events.event(text)
                    continue
                if chat:
                    event = oai.chat_chunk(rid, model, text, finish_reason=finish, created=created)
                else:
                    event = oai.completion_chunk(rid, model, text, finish_reason=finish, created=created)
                if return_token_ids:
                    event["choices"][0]["token_ids"] = chunk.new_token_ids
                yield oai.sse_event(event)
    except Exception as e:  # the stream ends with an error event, never silently; details only in the log
        err = error_for(e, rid)
        yield oai.sse_event(oai.error_body(err.message, err.type, None, err.status))
        yield oai.sse_event("[DONE]")
        return
    if include_usage:
        usage = oai.chat_usage_chunk if chat else oai.completion_usage_chunk
        yield oai.sse_event(usage(rid, model, num_prompt_tokens, n_out, created=created))
    yield oai.sse_event("[DONE]")

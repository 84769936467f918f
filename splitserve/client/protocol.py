"""The OpenAI wire format on the client side: URLs, server-sent events, response bodies.

Pure functions (no I/O). Only standard fields are required of a response; the
extensions splitserve and vLLM add (``token_ids``, ``prompt_token_ids``) are
read when present. Anything that does not fit raises ``MalformedResponse``
naming what was wrong, with an excerpt of what arrived.
"""

from __future__ import annotations

import json
from typing import Any

from splitserve.client.errors import MalformedResponse, error_for_code, error_message
from splitserve.client.types import Chunk, Completion, Timings, Usage

DONE = "[DONE]"
_SSE_FIELDS = ("data", "event", "id", "retry")


def api_root(base_url: str) -> str:
    """``http://host:8000``, ``http://host:8000/`` and ``http://host:8000/v1`` all give ``http://host:8000/v1``."""
    url = base_url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
    return url if url.endswith("/v1") else url + "/v1"


def _excerpt(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[:n] + "..."


class SSEDecoder:
    """Turns response lines into event payloads: ``feed(line)`` returns the data of a finished event, or None."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None  # comment / keep-alive
        name, _, value = line.partition(":")
        if name not in _SSE_FIELDS:
            raise MalformedResponse(f"expected server-sent events ('data: ...' lines), got {_excerpt(line)!r}")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """The last event when the body ended without its blank line."""
        return self.feed("")


def parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise MalformedResponse(f"response is not valid JSON ({e}): {_excerpt(text)!r}") from e


def raise_if_error(obj: Any) -> None:
    """An error object inside a 200 response (splitserve and vLLM put errors in the stream this way)."""
    if isinstance(obj, dict) and "error" in obj and "choices" not in obj:
        err = obj["error"]
        code = err.get("code") if isinstance(err, dict) else None
        status = code if isinstance(code, int) and 400 <= code < 600 else 500
        message, type_, param = error_message(obj, "error event without a message")
        raise error_for_code(status, message, type_=type_, param=param)


def _usage(obj: dict) -> Usage | None:
    u = obj.get("usage")
    if u is None:
        return None
    try:
        prompt, completion = int(u["prompt_tokens"]), int(u.get("completion_tokens") or 0)
        return Usage(prompt, completion, int(u.get("total_tokens") or prompt + completion))
    except (TypeError, KeyError, ValueError) as e:
        raise MalformedResponse(f"bad usage object: {_excerpt(json.dumps(u))!r}") from e


def _first_choice(obj: Any, what: str) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
        raise MalformedResponse(f"{what} has no 'choices' list: {_excerpt(json.dumps(obj))!r}")
    choices = obj["choices"]
    if not choices:
        return None
    if not isinstance(choices[0], dict):
        raise MalformedResponse(f"{what}: choices[0] is not an object: {_excerpt(json.dumps(obj))!r}")
    return choices[0]


def _token_ids(choice: dict) -> list[int] | None:
    ids = choice.get("token_ids")
    if ids is not None and not (isinstance(ids, list) and all(isinstance(t, int) for t in ids)):
        raise MalformedResponse(f"token_ids must be a list of integers, got {_excerpt(repr(ids))}")
    return ids


def parse_completion(text: str, chat: bool, timings: Timings) -> Completion:
    """A whole (non-streaming) completion or chat completion body."""
    obj = parse_json(text)
    raise_if_error(obj)
    choice = _first_choice(obj, "completion response")
    if choice is None:
        raise MalformedResponse(f"completion response has no choices: {_excerpt(text)!r}")
    if chat:
        message = choice.get("message")
        if not isinstance(message, dict):
            raise MalformedResponse(f"chat response choice has no 'message' object: {_excerpt(text)!r}")
        content = message.get("content") or ""
    else:
        content = choice.get("text")
    if not isinstance(content, str):
        raise MalformedResponse(f"completion response has no text: {_excerpt(text)!r}")
    return Completion(
        text=content, finish_reason=choice.get("finish_reason"), timings=timings, usage=_usage(obj),
        token_ids=_token_ids(choice), prompt_token_ids=obj.get("prompt_token_ids"), id=obj.get("id"), model=obj.get("model"),
    )


def parse_chunk(payload: str, chat: bool) -> tuple[Chunk | None, Usage | None, dict]:
    """One stream event: (the chunk, or None for a usage-only or empty event; usage if present; the object)."""
    obj = parse_json(payload)
    raise_if_error(obj)
    choice = _first_choice(obj, "stream event")
    usage = _usage(obj)
    if choice is None:
        return None, usage, obj
    if chat:
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            raise MalformedResponse(f"chat stream event has no 'delta' object: {_excerpt(payload)!r}")
        text = delta.get("content") or ""
    else:
        text = choice.get("text") or ""
    if not isinstance(text, str):
        raise MalformedResponse(f"stream event text is not a string: {_excerpt(payload)!r}")
    return Chunk(text, _token_ids(choice), choice.get("finish_reason")), usage, obj



class StreamCollector:
    """Assembles one streamed response into a ``Completion`` and times it (``now`` is passed in: pure).

    The first chunk that carries text or token ids sets the time to first token;
    each later one adds its gap to the inter-token latencies (split evenly over
    its tokens when the server sends token ids, one gap per chunk otherwise).
    """

    def __init__(self, sent_at: float) -> None:
        self.sent_at = sent_at
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.itl_s: list[float] = []
        self.parts: list[str] = []
        self.token_ids: list[int] | None = None
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.id: str | None = None
        self.model: str | None = None
        self.done_at: float | None = None  # when 'data: [DONE]' arrived

    def add(self, chunk: Chunk | None, usage: Usage | None, obj: dict, now: float) -> bool:
        """Record one event; True when it carried something the caller should see."""
        self.id = self.id or obj.get("id")
        self.model = self.model or obj.get("model")
        if usage is not None:
            self.usage = usage
        if chunk is None:
            return False
        if chunk.token_ids is not None:
            self.token_ids = (self.token_ids or []) + chunk.token_ids
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        n = len(chunk.token_ids) if chunk.token_ids is not None else (1 if chunk.text else 0)
        if n:
            if self.first_at is None:
                self.first_at = now  # the TTFT; tokens that came along with the first add no gap
            else:
                self.itl_s.extend([(now - self.last_at) / n] * n)
            self.last_at = now
        self.parts.append(chunk.text)
        return bool(chunk.text or chunk.token_ids or chunk.finish_reason)

    def result(self, now: float, *, queue_s: float = 0.0, num_attempts: int = 1) -> Completion:
        timings = Timings(
            total_s=now - self.sent_at, ttft_s=None if self.first_at is None else self.first_at - self.sent_at,
            itl_s=self.itl_s, queue_s=queue_s, num_attempts=num_attempts,
        )
        return Completion(
            text="".join(self.parts), finish_reason=self.finish_reason, timings=timings, usage=self.usage,
            token_ids=self.token_ids, id=self.id, model=self.model,
        )

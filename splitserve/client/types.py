"""Records the client hands back: a request to send, a streamed chunk, a finished completion.

Plain dataclasses, no I/O. Times are seconds, measured on the client with
``time.perf_counter`` (what the caller experiences, network included).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

clock = time.perf_counter  # every client-side time is read from this clock


class Request:
    """One request for a batch: a completion ``prompt`` or chat ``messages``, plus body fields.

    ``Request("Hello", max_tokens=8, priority=1, tenant="team-a")`` or
    ``Request(messages=[{"role": "user", "content": "Hi"}])``. Keyword
    arguments become JSON body fields (``None`` values are left out) and win
    over the batch-wide defaults. ``priority`` also orders the client's own
    queue: a lower value goes first, as in vLLM (the server orders its own queue the same way).
    """

    __slots__ = ("prompt", "messages", "params")

    def __init__(self, prompt: str | list[int] | None = None, *, messages: list[dict[str, Any]] | None = None,
                 **params: Any) -> None:
        if (prompt is None) == (messages is None):
            raise ValueError("a Request needs exactly one of prompt (completions) or messages (chat)")
        if messages is not None and (not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages)):
            raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
        self.prompt = prompt
        self.messages = messages
        self.params = params

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def body(self, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON body: defaults, then this request's fields; ``None`` values dropped."""
        merged = {**(defaults or {}), **self.params}
        if self.is_chat:
            merged["messages"] = self.messages
        else:
            merged["prompt"] = self.prompt
        return {k: v for k, v in merged.items() if v is not None}

    def __repr__(self) -> str:
        what = f"messages={self.messages!r}" if self.is_chat else f"prompt={self.prompt!r}"
        return f"Request({what[:80]}, {self.params!r})"


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(slots=True)
class Timings:
    """Client-side latency of one request.

    ``queue_s``: from submission to the start of the attempt that succeeded
    (waiting for a slot, backoff, failed attempts). ``ttft_s``: from sending to
    the first generated text (None for a non-streaming call). ``itl_s``: the gap
    before each later token (a chunk of k tokens counts k gaps of 1/k each when
    token ids are known, one gap otherwise). ``total_s``: from sending to the end.
    """

    total_s: float
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    queue_s: float = 0.0
    num_attempts: int = 1

    @property
    def e2e_s(self) -> float:
        """What the caller waited in all: ``queue_s + total_s``."""
        return self.queue_s + self.total_s

    @property
    def mean_itl_s(self) -> float | None:
        return statistics.fmean(self.itl_s) if self.itl_s else None

    @property
    def median_itl_s(self) -> float | None:
        return statistics.median(self.itl_s) if self.itl_s else None


@dataclass(slots=True)
class Chunk:
    """One streamed piece: new text, its token ids when the server sends them, and the finish reason on the last."""

    text: str
    token_ids: list[int] | None = None
    finish_reason: str | None = None


@dataclass(slots=True)
class Completion:
    """A finished completion or chat answer."""

    text: str
    finish_reason: str | None
    timings: Timings
    usage: Usage | None = None
    token_ids: list[int] | None = None  # when requested with return_token_ids (splitserve, vLLM)
    prompt_token_ids: list[int] | None = None
    id: str | None = None
    model: str | None = None

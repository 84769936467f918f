"""OpenAI-compatible request and response shapes for the HTTP ingress (pydantic v2).

Requests: ``CompletionRequest`` (``/v1/completions``) and ``ChatCompletionRequest``
(``/v1/chat/completions``) accept the parameters vLLM accepts; range errors come
from field constraints, so ``validation_error_message`` names the field.
``to_sampling_params`` makes the engine's ``SamplingParams``.

Unsupported features are refused with a message saying so, never silently
ignored: n/best_of other than 1, logprobs, echo, penalties other than neutral,
suffix, logit_bias, beam search, tools, structured output, non-text content
parts, and several prompts in one completion request (send one per request).
Unknown extra fields ARE ignored, because OpenAI clients send fields newer than
this schema (so a misspelled parameter is ignored too).

Responses are plain dicts in exactly the shape the official ``openai`` client
parses; ``sse_event`` frames them as server-sent events.
"""

from __future__ import annotations

import json
import time
from json.encoder import encode_basestring  # type: ignore[attr-defined]  # the C encoder json.dumps uses for a str
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from splitserve.engine.sampling_params import INT64_MAX, SamplingParams
from splitserve.metrics import TENANT_PATTERN

FinishReason = Literal["stop", "length"]
_FINISH_REASONS = ("stop", "length")


# Parameters splitserve does not implement: the values that mean "off", and what to do instead.
_OFF = "not implemented; leave it unset"
_NEUTRAL: dict[str, tuple[tuple, str]] = {
    "n": ((1,), "only n=1; send several requests for several samples"),
    "best_of": ((1,), "only 1"),
    "presence_penalty": ((0,), "only 0"),
    "frequency_penalty": ((0,), "only 0"),
    "repetition_penalty": ((1,), "only 1.0"),
    "min_p": ((0,), "only 0"),
    "min_tokens": ((0,), "only 0"),
    "logit_bias": (({},), "leave it empty"),
    "echo": ((False,), "only false"),
    "logprobs": ((False,), _OFF),  # completions: an int, so only None passes; chat: None or false
    "top_logprobs": ((0,), _OFF),
    "prompt_logprobs": ((), _OFF),
    "suffix": ((), _OFF),
    "use_beam_search": ((False,), _OFF),
    "tools": (([],), "tool calling is " + _OFF),
    "tool_choice": (("none", "auto"), "tool calling is " + _OFF),
    "response_format": (({"type": "text"},), "only text; structured output is " + _OFF),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """Fields shared by both endpoints. Extra fields are ignored (see the module docstring)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(None, ge=0, description="0 (or below 1e-5) is greedy; finite")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, le=INT64_MAX, description="-1 or 0: off; above the vocabulary: keeps every token")
    min_p: float | None = None
    seed: int | None = Field(None, description="any integer; reduced modulo 2**64 for the generator")
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, le=INT64_MAX)]] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    echo: bool = False
    user: str | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # vLLM extension: each choice also carries its token ids
    # refused unless neutral (``_NEUTRAL``) on both routes, as vLLM accepts them on both
    best_of: int | None = None
    use_beam_search: bool = False
    prompt_logprobs: int | None = None
    # splitserve extensions
    priority: int = Field(0, ge=-INT64_MAX - 1, le=INT64_MAX, description="lower is served first (vLLM's convention)")
    tenant: str | None = Field(None, pattern=TENANT_PATTERN, description="label for per-tenant metrics: 1-64 of A-Z a-z 0-9 . _ : -")

    @field_validator("top_k")
    @classmethod
    def _check_top_k(cls, v: int | None) -> int | None:
        if v is not None and v < 1 and v not in (0, -1):
            raise ValueError(f"top_k must be -1 or 0 (disabled) or an integer >= 1, got {v}")
        return v

    @field_validator(*_NEUTRAL, check_fields=False)
    @classmethod
    def _check_unsupported(cls, v: Any, info: ValidationInfo) -> Any:
        allowed, what = _NEUTRAL[info.field_name]
        # Compare bools only with bools: logprobs=0 (an int) is a request, not "false".
        if v is not None and not any(v == a and isinstance(v, bool) == isinstance(a, bool) for a in allowed):
            raise ValueError(f"{info.field_name}={v!r} is not supported by splitserve ({what})")
        return v

    @model_validator(mode="after")
    def _check_stream_options(self) -> _SamplingRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be set when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        """Whether a streaming response ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The engine's ``SamplingParams``; ``default_max_tokens`` applies when the client sent none.

        Checking that prompt + max_tokens fits the context is the ingress's job
        (it knows the prompt length). ``SamplingParams`` re-validates and raises
        ``ValueError`` naming the field.
        """
        return SamplingParams(
            max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
        )


class CompletionRequest(_SamplingRequest):
    """``/v1/completions``. ``prompt`` is normalised to a string or a list of token ids."""

    prompt: str | list[int]
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        shape = "prompt must be a string, a list of token ids, or a list holding one of those"
        if isinstance(v, str):
            return v
        if not isinstance(v, list) or not v:
            raise ValueError(shape)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            if any(t < 0 for t in v):
                raise ValueError("prompt token ids must be >= 0")
            return v
        if all(isinstance(p, (str, list)) for p in v):
            if len(v) > 1:
                raise ValueError(
                    f"batched prompts are not supported ({len(v)} prompts in one request); "
                    "send one prompt per request"
                )
            return cls._one_prompt(v[0])
        raise ValueError(shape)

    @property
    def prompt_text(self) -> str | None:
        return self.prompt if isinstance(self.prompt, str) else None

    @property
    def prompt_token_ids(self) -> list[int] | None:
        return None if isinstance(self.prompt, str) else self.prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    """One chat turn. ``content`` may be a string or a list of ``{"type": "text", "text": ...}`` parts."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v: Any) -> Any:
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                if kind != "text":
                    raise ValueError(f"content part of type {kind!r} is not supported; only 'text' parts are")
        return v

    @property
    def text(self) -> str:
        """The content as one string (text parts joined by newlines, as vLLM does)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    """``/v1/chat/completions``. ``max_completion_tokens`` wins over (and is copied into) ``max_tokens``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = Field(None, description="a client's own template: refused unless the server allows it")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="extra template variables (and chat_template, as vLLM accepts it)")

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message=true needs add_generation_prompt=false")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    def conversation(self) -> list[dict[str, str]]:
        """Messages as ``[{"role", "content"}]`` with string content, for ``apply_chat_template``."""
        return [{"role": m.role, "content": m.text} for m in self.messages]


# --- errors -----------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: int | str | None = None
) -> dict:
    """The JSON body of an error response, in OpenAI's shape."""
    return ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code)).model_dump()


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "null"}


def _field_path(loc: tuple) -> str:
    """``("messages", 0, "content")`` -> ``"messages.0.content"``, dropping pydantic's union branch tags."""
    parts = [
        str(p) for p in loc
        if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p or p.startswith("function-")))
    ]
    return ".".join(parts)


def validation_error_message(exc: ValidationError) -> str:
    """One human line per problem, each naming its field: ``"max_tokens: Input should be ..."``."""
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        msg = err["msg"].removeprefix("Value error, ")
        path = _field_path(err["loc"])
        line = f"{path}: {msg}" if path else msg
        if line not in lines:
            lines.append(line)
    return "; ".join(lines)


def validation_error_body(exc: ValidationError) -> dict:
    """``error_body`` for a request that failed validation (HTTP 400); ``param`` is the first bad field."""
    paths = [p for p in (_field_path(e["loc"]) for e in exc.errors(include_url=False)) if p]
    return error_body(validation_error_message(exc), param=paths[0] if paths else None, code=400)


# --- responses --------------------------------------------------------------
# finish_reason: "stop" or "length" (None too on a stream chunk that is not the
# last). ``created`` defaults to now: pass one value to every chunk of a stream.


def completion_id(req_id: str) -> str:
    return req_id if req_id.startswith("cmpl-") else f"cmpl-{req_id}"


def chat_completion_id(req_id: str) -> str:
    return req_id if req_id.startswith("chatcmpl-") else f"chatcmpl-{req_id}"


def usage_info(prompt_tokens: int, completion_tokens: int) -> dict:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


def _body(rid: str, obj: str, model: str, created: int | None, choices: list, usage: dict | None = None) -> dict:
    body = {"id": rid, "object": obj, "created": int(time.time()) if created is None else created,
            "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def _choice(finish_reason: str | None, is_final: bool, **fields: Any) -> dict:
    assert finish_reason in _FINISH_REASONS or (finish_reason is None and not is_final), (
        f"finish_reason must be one of {_FINISH_REASONS}{'' if is_final else ' or None'}", finish_reason)
    return {"index": 0, **fields, "logprobs": None, "finish_reason": finish_reason}


def completion_response(
    req_id: str, model: str, text: str, finish_reason: FinishReason,
    prompt_tokens: int, completion_tokens: int, created: int | None = None,
) -> dict:
    """A whole ``/v1/completions`` response (``object: "text_completion"``)."""
    choice = _choice(finish_reason, True, text=text)
    return _body(completion_id(req_id), "text_completion", model, created, [choice],
                 usage_info(prompt_tokens, completion_tokens))


def completion_chunk(
    req_id: str, model: str, text: str, finish_reason: FinishReason | None = None, created: int | None = None
) -> dict:
    """One streamed ``/v1/completions`` chunk (the same object name as the whole response)."""
    return _body(completion_id(req_id), "text_completion", model, created, [_choice(finish_reason, False, text=text)])


def completion_usage_chunk(
    req_id: str, model: str, prompt_tokens: int, completion_tokens: int, created: int | None = None
) -> dict:
    """The last streamed chunk when ``stream_options.include_usage``: empty choices, usage set."""
    return _body(completion_id(req_id), "text_completion", model, created, [],
                 usage_info(prompt_tokens, completion_tokens))


def chat_completion_response(
    req_id: str, model: str, text: str, finish_reason: FinishReason,
    prompt_tokens: int, completion_tokens: int, created: int | None = None,
) -> dict:
    """A whole ``/v1/chat/completions`` response (``object: "chat.completion"``)."""
    choice = _choice(finish_reason, True, message={"role": "assistant", "content": text})
    return _body(chat_completion_id(req_id), "chat.completion", model, created, [choice],
                 usage_info(prompt_tokens, completion_tokens))


def chat_chunk(
    req_id: str, model: str, delta_text: str | None, role: str | None = None,
    finish_reason: FinishReason | None = None, created: int | None = None,
) -> dict:
    """One streamed chat chunk (``object: "chat.completion.chunk"``).

    Send the first with ``role="assistant", delta_text=""``, then one per text
    delta, and the last with ``finish_reason`` (``delta_text=None`` gives an
    empty delta). ``delta`` holds ``role`` / ``content`` only when given.
    """
    delta: dict[str, str] = {}
    if role is not None:
        delta["role"] = role
    if delta_text is not None:
        delta["content"] = delta_text
    choice = _choice(finish_reason, False, delta=delta)
    return _body(chat_completion_id(req_id), "chat.completion.chunk", model, created, [choice])


def chat_usage_chunk(
    req_id: str, model: str, prompt_tokens: int, completion_tokens: int, created: int | None = None
) -> dict:
    """The last streamed chat chunk when ``stream_options.include_usage``: empty choices, usage set."""
    return _body(chat_completion_id(req_id), "chat.completion.chunk", model, created, [],
                 usage_info(prompt_tokens, completion_tokens))


def models_list(names: list[str], owned_by: str = "splitserve", created: int | None = None) -> dict:
    """``/v1/models``."""
    ts = int(time.time()) if created is None else created
    data = [{"id": name, "object": "model", "created": ts, "owned_by": owned_by} for name in names]
    return {"object": "list", "data": data}


class TextEvents:
    """One stream's text-only events as SSE bytes, the parts that never change encoded once: the same bytes as
    ``sse_event(completion_chunk(...))`` / ``sse_event(chat_chunk(...))`` with no finish reason."""

    _MARK = "\0"  # stands for the text while the rest is encoded; JSON always escapes it

    def __init__(self, req_id: str, model: str, created: int, chat: bool) -> None:
        body = chat_chunk(req_id, model, self._MARK, created=created) if chat else completion_chunk(req_id, model, self._MARK, created=created)
        parts = sse_event(body).split(json.dumps(self._MARK).encode())
        self._head, self._tail = (parts[0], parts[1]) if len(parts) == 2 else (b"", b"")  # a NUL in the model name: never
        self._chat, self._id, self._model, self._created = chat, req_id, model, created

    def event(self, text: str) -> bytes:
        if not self._head:
            build = chat_chunk if self._chat else completion_chunk
            return sse_event(build(self._id, self._model, text, created=self._created))
        return self._head + encode_basestring(text).encode() + self._tail  # what json.dumps(text, ensure_ascii=False) returns, ~15x faster


def sse_event(data: dict | str) -> bytes:
    """One server-sent event: ``b"data: {...}\\n\\n"``; ``sse_event("[DONE]") == b"data: [DONE]\\n\\n"``."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return ("".join(f"data: {line}\n" for line in payload.split("\n")) + "\n").encode()

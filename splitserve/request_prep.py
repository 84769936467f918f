"""From request bytes to prompt token ids, off the event loop: parse, validate, render the chat template, tokenize.

Each step costs time in proportion to what the client sent: a 4 MB body takes
tens of milliseconds to parse and validate, a 3.9 MB prompt about 3 s to
tokenize, and a chat template is a program. On the ingress's event loop any of
these stalls ``/health`` and every other request (load reports go stale, and
healthy workers look dead). So they run in ``EDGE_THREADS`` threads of their
own (``off_loop``): the tokenizer releases the GIL while it works, and pure
Python work yields the GIL to the loop every few milliseconds.

A small job runs inline instead (``near_loop``: a body or text of at most
``INLINE_MAX_CHARS``): a trip to an edge thread and back costs the process
~150-200 µs of CPU (thread wake-ups and GIL hand-overs), two to four times what
parsing and tokenizing a short prompt costs (~60-90 µs), and every request
made two or three such trips. Inline, the loop is held at most ~0.3 ms.

A chat template also has a hard wall-clock limit (``http.chat_template_timeout_s``):
the render stops itself at its deadline (``BoundedSandbox``), and the ingress stops
waiting for it shortly after in any case; either way the client gets a 400. A
template from the client is refused unless ``http.allow_client_chat_template``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from splitserve import openai_protocol as oai
from splitserve.chat_template import RESERVED_KWARGS, ChatTemplateRenderer, RenderLimits, TemplateLimitExceeded
from splitserve.http_guard import APIError, public_message
from splitserve.request_body import BodyError, parse_json_body

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

EDGE_THREADS = 4  # concurrent parse/render/tokenize jobs per ingress process
INLINE_MAX_CHARS = 4096  # bodies and texts up to this size are parsed and tokenized on the event loop itself
TEMPLATE_GRACE_S = 0.25  # the ingress waits this much past the template's own deadline
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _edge_pool() -> ThreadPoolExecutor:
    """One pool per process (an ingress replica is a process), created on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=EDGE_THREADS, thread_name_prefix="ingress-edge")
        return _pool


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in an edge thread; its result or exception comes back to the awaiting coroutine."""
    return await asyncio.get_running_loop().run_in_executor(_edge_pool(), functools.partial(fn, *args))


async def near_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` inline when ``size`` (the bytes or characters it works on) is at most ``INLINE_MAX_CHARS``,
    else in an edge thread (``off_loop``)."""
    if size <= INLINE_MAX_CHARS:
        return fn(*args)
    return await off_loop(fn, *args)


class PromptBuilder:
    """The CPU-bound half of the ingress's request preparation; every method is thread-safe and raises ``APIError``."""

    def __init__(self, tokenizer: Any, vocab_size: int, http: Any) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.allow_client_template = http.allow_client_chat_template
        self.template_timeout_s = http.chat_template_timeout_s
        template = None
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            template = tokenizer.get_chat_template()
        special = dict(getattr(tokenizer, "special_tokens_map", {}) or {}) if tokenizer is not None else {}
        # the ceiling; each render is held to a limit in proportion to its own request (chat_text)
        limits = RenderLimits(timeout_s=http.chat_template_timeout_s, max_chars=2 * http.max_request_bytes + 64 * 1024)
        self.renderer = ChatTemplateRenderer(template, special, limits)

    # ---- body ---------------------------------------------------------------------
    @staticmethod
    def parse(raw: bytes, model: type[M]) -> M:
        """The validated request model; 400 naming the field for anything malformed."""
        try:
            data = parse_json_body(raw)
        except BodyError as e:
            raise APIError(400, str(e), param=e.param) from e
        try:
            return model.model_validate(data)
        except ValidationError as e:
            body = oai.validation_error_body(e)["error"]
            raise APIError(400, body["message"], param=body["param"]) from e
        except RecursionError as e:  # pydantic recursing on a shape the depth limit let through
            raise APIError(400, "request body is nested too deeply") from e

    # ---- prompts ------------------------------------------------------------------
    @staticmethod
    def completion_size(req: oai.CompletionRequest) -> int:
        """What ``completion_ids`` works on: the prompt's characters, or its token ids."""
        return len(req.prompt_token_ids) if req.prompt_token_ids is not None else len(req.prompt_text or "")

    def completion_ids(self, req: oai.CompletionRequest) -> list[int]:
        if req.prompt_token_ids is not None:
            ids = list(req.prompt_token_ids)
        else:
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send the prompt as a list of token ids", param="prompt")
            ids = self.tokenizer.encode(req.prompt_text or "")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(400, f"prompt token ids must be in [0, {self.vocab_size - 1}]; got {bad[:5]}", param="prompt")
        return ids

    def chat_text(self, req: oai.ChatCompletionRequest) -> str:
        """The conversation through the chat template (the model's, or the client's when allowed)."""
        template, variables = self._template_inputs(req)
        if self.tokenizer is None or (template is None and self.renderer.default_template is None):
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        param = "chat_template" if template is not None else "messages"
        conversation = req.conversation()
        # what a template adds is markup around the messages: twice the input plus 64 KiB is generous for any
        # real template, and stops a 135-byte body from becoming a 4 MB prompt
        size = sum(len(m["content"]) for m in conversation) + len(template or self.renderer.default_template or "")
        size += len(json.dumps(variables, ensure_ascii=False)) if variables else 0
        try:
            return self.renderer.render(
                conversation, add_generation_prompt=req.add_generation_prompt, continue_final_message=req.continue_final_message,
                template=template, variables=variables, max_chars=2 * size + 64 * 1024,
            )
        except TemplateLimitExceeded as e:
            raise APIError(400, f"cannot apply the chat template: {e}", param=param) from e
        except Exception as e:  # template errors (unsupported role, raise_exception, syntax) are the client's
            raise APIError(400, f"cannot apply the chat template: {public_message(e)}", param=param) from e

    def chat_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    async def chat_text_bounded(self, req: oai.ChatCompletionRequest) -> str:
        """``chat_text`` off the loop, given up on (400) if it outlives its limit: the hard wall-clock bound."""
        try:
            return await asyncio.wait_for(off_loop(self.chat_text, req), self.template_timeout_s + TEMPLATE_GRACE_S)
        except TimeoutError as e:
            raise APIError(400, f"cannot apply the chat template: it took longer than {self.template_timeout_s:g} s", param="messages") from e

    def _template_inputs(self, req: oai.ChatCompletionRequest) -> tuple[str | None, dict[str, Any]]:
        """The client's template (top-level ``chat_template`` or vLLM's ``chat_template_kwargs.chat_template``) and variables."""
        variables = dict(req.chat_template_kwargs or {})
        nested = variables.pop("chat_template", None)
        template = req.chat_template if req.chat_template is not None else nested
        name = "chat_template" if req.chat_template is not None else "chat_template_kwargs.chat_template"
        if template is not None:
            if not self.allow_client_template:
                raise APIError(
                    400, f"{name}: this server does not accept chat templates from clients (the operator can allow them "
                    "with http.allow_client_chat_template); leave it unset to use the model's template", param=name,
                )
            if not isinstance(template, str):
                raise APIError(400, f"{name}: must be a string holding a Jinja template", param=name)
        for key in RESERVED_KWARGS:
            if key in variables:
                raise APIError(400, f"chat_template_kwargs.{key}: set by the server; pass it as a request field instead",
                               param=f"chat_template_kwargs.{key}")
        return template, variables

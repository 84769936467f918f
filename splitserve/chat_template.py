"""Chat templates rendered with bounded work, so no request can hold the ingress for long.

A chat template is a program: the model's own (trusted, the operator chose the
checkpoint) or one a client sends in ``chat_template`` (untrusted, refused unless
``http.allow_client_chat_template``). Both render here, off the event loop, in
``BoundedSandbox``: Jinja's ``ImmutableSandboxedEnvironment`` (no attribute
escapes, no mutation of lists or dicts) plus limits Jinja lacks:

- **time**: every loop iteration, call, operator and output chunk checks the
  render's deadline, so a runaway template stops itself within milliseconds of
  it (a Python thread cannot be killed from outside, so it must stop itself);
- **loops**: ``range()`` is capped at ``MAX_RANGE`` items, as Jinja's sandbox does;
  every ``{% for %}`` iteration counts against the deadline, nested ones too;
- **size**: the output, every string or list built by ``*``, ``+``, ``~``, ``%``,
  ``format`` and the size-taking filters (``center``, ``indent``, ``replace``, ...)
  is checked against ``max_chars`` *before* it is built where it could be large,
  and integer powers and products are capped in bits.

The environment otherwise mirrors what transformers uses for
``apply_chat_template`` (``trim_blocks``, ``lstrip_blocks``, loop controls, the
``{% generation %}`` tag, ``tojson``, ``raise_exception``, ``strftime_now``, the
special tokens as variables, ``continue_final_message`` cut after the last
message), so the model's template renders exactly as transformers renders it.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_RANGE = 65_536  # items one range() may produce (Jinja's own sandbox allows 100,000)
MAX_INT_ARG = 65_536  # an integer passed to a call or filter (a width, a count, a tab size)
MAX_INT_BITS = 4096  # integer results of ** and * in a template
_WIDE_FORMAT = re.compile(r"\d{7,}")  # a width or precision of a million characters or more
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message
RESERVED_KWARGS = ("messages", "tools", "documents", "add_generation_prompt", "continue_final_message")  # set by the server


class TemplateLimitExceeded(ValueError):
    """A chat template went over its time or size budget (an HTTP 400 for the client)."""


@dataclass(frozen=True, slots=True)
class RenderLimits:
    """Per-render budget: wall-clock seconds and characters of any value or of the output."""

    timeout_s: float
    max_chars: int


@dataclass(slots=True)
class _Budget:
    deadline: float
    max_chars: int
    num_chars: int = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitExceeded("the chat template took longer than its time limit")

    def size(self, n: int, what: str) -> None:
        if n > self.max_chars:
            raise TemplateLimitExceeded(f"the chat template built a {what} of {n} characters; the limit is {self.max_chars}")


class _BoundedCodeGenerator(CodeGenerator):
    """Routes every ``{% for %}`` iterable and every ``~`` concatenation through the environment's budget."""

    def visit_For(self, node: nodes.For, frame: Any) -> None:  # noqa: N802 - Jinja's visitor names
        node.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [node.iter], [], None, None, lineno=node.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Any) -> None:  # noqa: N802
        self.write("environment.bounded_str(")
        super().visit_Concat(node, frame)
        self.write(")")


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body (transformers uses it for assistant masks)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` without underscore attributes (as transformers allows)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attributes may not start with '_': {name!r}")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with a per-render budget of time and size (see the module docstring)."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
        self._local = threading.local()
        self.globals.update(
            range=self._range, raise_exception=_raise_exception, namespace=_Namespace,
            strftime_now=lambda fmt: datetime.now().strftime(fmt), dict=lambda *a, **k: dict(*a, **k),
        )
        self.filters["tojson"] = _tojson
        for name in ("center", "indent", "wordwrap", "truncate", "format", "join", "tojson", "string", "list", "map", "batch"):
            self.filters[name] = self._sized_filter(self.filters[name])
        self.filters["replace"] = self._sized_filter(self._replace)

    # ---- the budget -----------------------------------------------------------
    @property
    def budget(self) -> _Budget:
        budget = getattr(self._local, "budget", None)
        assert budget is not None, "templates of a BoundedSandbox render only through render_bounded"
        return budget

    def render_bounded(self, template: jinja2.Template, limits: RenderLimits, variables: dict[str, Any]) -> str:
        """Render ``template`` within ``limits``; raises ``TemplateLimitExceeded`` past them."""
        budget = self._local.budget = _Budget(time.monotonic() + limits.timeout_s, limits.max_chars)
        parts: list[str] = []
        try:
            for part in template.generate(**variables):
                budget.num_chars += len(part)
                budget.size(budget.num_chars, "prompt")
                budget.tick()
                parts.append(part)
        finally:
            self._local.budget = None
        return "".join(parts)

    def bounded_iter(self, iterable: Iterable[Any]) -> Iterator[Any]:
        budget = self.budget
        for item in iterable:
            budget.tick()
            yield item

    def bounded_str(self, value: Any) -> Any:
        self.budget.size(len(value), "string")
        return value

    def _range(self, *args: int) -> Iterator[int]:
        r = range(*args)
        if len(r) > MAX_RANGE:
            raise TemplateLimitExceeded(f"range() of {len(r)} items in the chat template; the limit is {MAX_RANGE}")
        return self.bounded_iter(r)

    # ---- interception -----------------------------------------------------------
    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's signature
        budget = __self.budget
        budget.tick()
        _check_int_args((*args, *kwargs.values()))  # "x".ljust(10**9), "x".center(...), ...
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format to make it safe
        owner = getattr(method, "__self__", None)
        if isinstance(owner, str):  # str methods whose output can dwarf their input
            name = getattr(method, "__name__", "")
            if name == "replace" and len(args) >= 2:
                __self._replace(owner, *args)  # the same estimate as the filter
            elif name == "expandtabs":
                budget.size(len(owner) + owner.count("\t") * int(args[0] if args else kwargs.get("tabsize", 8)), "string")
            elif name in ("format", "format_map") and _WIDE_FORMAT.search(owner):
                raise TemplateLimitExceeded("a format string in the chat template asks for a width of a million characters or more")
        return __self._checked(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = self.budget
        budget.tick()
        if operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and max(1, abs(left).bit_length()) * right > MAX_INT_BITS:
                raise TemplateLimitExceeded(f"{left} ** {right} in the chat template is too large")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    budget.size(len(seq) * max(n, 0), "string")
            if isinstance(left, int) and isinstance(right, int) and abs(left).bit_length() + abs(right).bit_length() > MAX_INT_BITS:
                raise TemplateLimitExceeded("an integer product in the chat template is too large")
        elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            budget.size(len(left) + len(right), "string")
        elif operator == "%" and isinstance(left, str) and _WIDE_FORMAT.search(left):
            raise TemplateLimitExceeded("a format string in the chat template asks for a width of a million characters or more")
        return self._checked(super().call_binop(context, operator, left, right))

    def _checked(self, value: Any) -> Any:
        if isinstance(value, (str, list, tuple)):
            self.budget.size(len(value), "string")
        return value

    def _sized_filter(self, fn: Any) -> Any:
        skip = 2 if getattr(fn, "jinja_pass_arg", None) is not None else 1  # (context,) value, then the filter's arguments

        @functools.wraps(fn)
        def bounded(*args: Any, **kwargs: Any) -> Any:
            self.budget.tick()
            _check_int_args((*args[skip:], *kwargs.values()))
            value = args[skip - 1] if len(args) >= skip else None
            if fn.__name__ == "do_format" and _WIDE_FORMAT.search(str(value)):
                raise TemplateLimitExceeded("a format string in the chat template asks for a width of a million characters or more")
            if fn.__name__ == "do_indent" and isinstance(value, str):  # the indent repeats on every line
                width = args[skip] if len(args) > skip else kwargs.get("width", 4)
                self.budget.size(len(value) + (value.count("\n") + 1) * len(width if isinstance(width, str) else " " * min(int(width), MAX_INT_ARG)), "string")
            return self._checked(fn(*args, **kwargs))

        return bounded

    def _replace(self, s: Any, old: Any, new: Any, count: int | None = None) -> str:
        s, old, new = str(s), str(old), str(new)
        n = s.count(old) if old else len(s) + 1
        if count is not None and count >= 0:
            n = min(n, count)
        self.budget.size(len(s) + n * (len(new) - len(old)), "string")
        return s.replace(old, new, -1 if count is None else count)


def _check_int_args(values: Iterable[Any]) -> None:
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT_ARG:
            raise TemplateLimitExceeded(f"an argument of {value} in the chat template; the limit is {MAX_INT_ARG}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    """transformers' ``tojson``: no HTML escaping, with indent/separators/sort_keys."""
    if isinstance(indent, int) and indent > 64:
        raise TemplateLimitExceeded(f"tojson indent {indent} in the chat template; the limit is 64")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplateRenderer:
    """Renders conversations with the model's template, or a client's one, in one shared ``BoundedSandbox``.

    Thread-safe: each render's budget lives in a thread-local, compiled
    templates are cached by source (a client's template is compiled once).
    """

    def __init__(self, default_template: str | None, special_tokens: dict[str, Any], limits: RenderLimits) -> None:
        self.default_template = default_template
        self.special_tokens = {k: v for k, v in special_tokens.items() if isinstance(v, str)}
        self.limits = limits
        self.env = BoundedSandbox()
        self._compile = functools.lru_cache(maxsize=16)(self.env.from_string)

    def render(
        self, messages: list[dict[str, str]], *, add_generation_prompt: bool, continue_final_message: bool = False,
        template: str | None = None, variables: dict[str, Any] | None = None, max_chars: int | None = None,
    ) -> str:
        """The prompt text. Template errors raise ``jinja2.TemplateError``; limits ``TemplateLimitExceeded``.

        ``max_chars`` tightens the size limit for this render (e.g. in proportion to the request's size).
        """
        source = template if template is not None else self.default_template
        if source is None:
            raise ValueError("this model has no chat template")
        compiled = self._compile(source)
        messages = [dict(m) for m in messages]
        if continue_final_message:
            if not messages or not isinstance(messages[-1].get("content"), str):
                raise ValueError("continue_final_message needs a final message with text content")
            final = messages[-1]["content"]
            messages[-1]["content"] = final + _CONTINUE_TAG
        values = {**self.special_tokens, **(variables or {})}
        limits = self.limits if max_chars is None else RenderLimits(self.limits.timeout_s, min(max_chars, self.limits.max_chars))
        text = self.env.render_bounded(compiled, limits, {
            **values, "messages": messages, "tools": None, "documents": None, "add_generation_prompt": add_generation_prompt,
        })
        if continue_final_message:
            text = _cut_after_final_message(text, final)
        return text


def _cut_after_final_message(text: str, final: str) -> str:
    """What transformers does for ``continue_final_message``: end the prompt right after that message's text."""
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise ValueError("continue_final_message: the chat template dropped part of the final message")
    at = text.rindex(tag)
    return text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()

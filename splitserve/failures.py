"""What went wrong in a call to a worker, said plainly: did the worker die, and a one-line reason safe to show.

Errors that cross Ray carry the remote traceback, the node's IP, the worker's
pid and the actor's id in their text. The router's messages end up in HTTP
error bodies and in logs read by people who want the reason, not the dump:
``describe`` keeps the error's type and the first line of its own message
(unwrapping Ray's ``RayTaskError`` to the exception the worker raised), removes
addresses, pids, actor ids and file paths, and never returns an empty reason
(``TimeoutError()`` has no message; "no answer within 10 s" is what happened).

``is_worker_death`` recognises the errors of a worker process that is gone (or
unreachable) by class name, so the router needs no Ray import and the
in-process test doubles (``ReplicaDied``) count too.
"""

from __future__ import annotations

import asyncio
import re

_DEATH_ERRORS = frozenset({
    "RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
    "ActorUnschedulableError", "ReplicaDied", "WorkerDied",
})
_MAX_CHARS = 240
_SCRUB = [
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b"), "<address>"),
    (re.compile(r"\bpid[=: ]+\d+", re.IGNORECASE), "pid=<pid>"),
    (re.compile(r"\b(?:actor_id|node_id|worker_id|task_id)[=: ]+[0-9a-f]+", re.IGNORECASE), "<id>"),
    (re.compile(r"\b[0-9a-f]{24,}\b"), "<id>"),
    (re.compile(r"(?:/[\w.@+-]+){2,}\.py\b(?:\", line \d+)?"), "<file>"),
    (re.compile(r"ray::\S+"), "<actor>"),
]


class WorkerDied(RuntimeError):
    """A call gave up on a worker that another call found dead (``is_worker_death`` knows the name)."""


class WorkerLeft(LookupError):
    """The worker is no longer a member: Serve scaled it down or replaced it after the request was paired with it."""


def never_reached_worker(e: BaseException) -> bool:
    """True when the call failed before the worker got it: the replica it was steered to had left (Serve's
    router refused it) or the worker was no longer a member when the call was made."""
    return any(cls.__name__ in ("ReplicaGone", "WorkerLeft") for cls in type(_unwrap(e)).__mro__)


def is_worker_death(e: BaseException) -> bool:
    """True when ``e`` says the worker's process died or cannot be reached (not that the request was bad)."""
    return any(cls.__name__ in _DEATH_ERRORS for cls in type(e).__mro__)


def _unwrap(e: BaseException) -> BaseException:
    """The exception the worker raised, out of Ray's ``RayTaskError`` wrapper (and its ``cause`` chain)."""
    seen = 0
    while type(e).__name__.startswith("RayTaskError") and getattr(e, "cause", None) is not None and seen < 5:
        e = e.cause
        seen += 1
    return e


def scrub(text: str) -> str:
    """``text`` with IP addresses, pids, actor/node ids and source paths replaced by placeholders."""
    for pattern, placeholder in _SCRUB:
        text = pattern.sub(placeholder, text)
    return text


def describe(e: BaseException, *, timeout_s: float | None = None) -> str:
    """``"TransferError: WRITE of 4096 bytes ... failed: injected failure"``: type + first line, scrubbed, never empty."""
    e = _unwrap(e)
    name = type(e).__name__
    if is_worker_death(e):
        return f"{name}: the worker died or is unreachable"
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)) and not str(e).strip():
        return f"no answer within {timeout_s:g} s" if timeout_s is not None else "no answer in time"
    if isinstance(e, asyncio.CancelledError):
        return "cancelled"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # Ray's own wrappers put "ray::Actor.method() (pid=..., ip=...)" first; the reason follows
    lines = [line for line in lines if not line.startswith(("ray::", "Traceback", "File ", "^"))] or lines
    first = scrub(lines[0]) if lines else ""
    if len(first) > _MAX_CHARS:
        first = first[: _MAX_CHARS - 1] + "…"
    return f"{name}: {first}" if first else name

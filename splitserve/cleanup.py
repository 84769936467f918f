"""Cleanup calls (release a reservation, abort a request) that run to completion whoever is cancelled.

Why a module for this: a cleanup call is issued *because* something was
cancelled, and the usual ``await asyncio.shield(call)`` does not survive that
under Ray Serve. A call made while the ingress serves an HTTP request is a
*child* of that request, and Serve cancels every child (pending or in flight)
when the request is cancelled, i.e. when the client leaves: the shielded
release is itself cancelled, and its blocks stay reserved until the decode
worker's reaper, minutes later. A second cancellation of the awaiting task
(``cancel_and_wait`` in a cancelled handler) ends a plain ``shield`` the same way.

So ``Janitor.run`` starts the call as its own task in a *fresh* ``contextvars``
context (Serve finds no parent request there, so nothing cancels it with one),
keeps the task in a set until it is done (the event loop only holds weak
references to tasks), bounds it by ``timeout_s``, and counts and logs a failure
in one line without the remote traceback. The caller waits for it at most
``grace_s`` (so a cleanup normally lands before the caller moves on), and a
caller cancelled while waiting leaves it running.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from splitserve.failures import describe

logger = logging.getLogger(__name__)


class Janitor:
    """Runs cleanup coroutines detached from the caller's cancellation; counts what failed.

    ``on_failure(kind)`` is called once per failed cleanup (``kind``: "release", "abort", ...).
    """

    def __init__(
        self, timeout_s: float = 10.0, grace_s: float = 2.0, on_failure: Callable[[str], None] | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.on_failure = on_failure
        self._tasks: set[asyncio.Task] = set()
        self.num_started = 0
        self.num_failed = 0

    @property
    def num_pending(self) -> int:
        return len(self._tasks)

    def submit(self, kind: str, subject: str, call: Callable[[], Awaitable[Any]]) -> asyncio.Task:
        """Start ``call()`` now as a detached task; returns it (already tracked)."""
        task = asyncio.get_running_loop().create_task(
            self._bounded(kind, subject, call), name=f"cleanup-{kind}-{subject}", context=contextvars.Context(),
        )
        self.num_started += 1
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run(self, kind: str, subject: str, call: Callable[[], Awaitable[Any]]) -> None:
        """``submit`` and wait up to ``grace_s`` for it; never raises but a cancellation of the caller."""
        task = self.submit(kind, subject, call)
        await asyncio.wait({task}, timeout=self.grace_s)  # neither a timeout nor our cancellation cancels the task

    async def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait (bounded) for every cleanup started so far; True when none is left."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
        return not self._tasks

    async def _bounded(self, kind: str, subject: str, call: Callable[[], Awaitable[Any]]) -> None:
        try:
            await asyncio.wait_for(call(), self.timeout_s)
        except BaseException as e:  # the worker's reaper frees it eventually; say so once, briefly
            self.num_failed += 1
            if self.on_failure is not None:
                self.on_failure(kind)
            logger.warning("%s of %s failed: %s", kind, subject, describe(e, timeout_s=self.timeout_s))
            if not isinstance(e, Exception):
                raise

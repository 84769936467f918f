"""The paced batch: the asyncio glue between ``pacing`` (pure policy) and the HTTP client.

A request's life in a batch::

    pending (PendingQueue: priority, then input order)
      -> in flight (a slot from AIMDController; streamed, so TTFT/ITL are measured)
      -> done: a Completion, or its error once retries are spent
      -> or back to pending after a retryable failure, eligible after its backoff

One dispatcher loop starts requests while the controller has room and the
queue has an eligible one, then sleeps until a request finishes, a backoff or a
``Retry-After`` pause ends. It returns only when every input has its result or
error: nothing is dropped, whatever the server does.

Safety rule: the controller, queue and result list are touched only from the
event loop that runs ``BatchRunner.run`` (single-threaded asyncio), so they
need no locks; the wake-up event is cleared before the state is examined, so a
completion between the check and the wait is never missed.
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING, Any

from splitserve.client.errors import BatchFailed, Overloaded, SplitserveError
from splitserve.client.pacing import AIMDController, PendingQueue, RetryPolicy, Ticket
from splitserve.client.types import Completion, Request, clock

if TYPE_CHECKING:
    from splitserve.client.async_client import AsyncClient


class BatchRunner:
    def __init__(self, client: AsyncClient, requests: list[Request], defaults: dict[str, Any],
                 controller: AIMDController, retry: RetryPolicy, *, progress: bool = False,
                 rng: random.Random | None = None) -> None:
        self.client = client
        self.requests = requests
        self.defaults = defaults
        self.controller = controller
        self.retry = retry
        self.progress = progress
        self.rng = rng or random.Random()
        self.results: list[Completion | BaseException | None] = [None] * len(requests)
        self.num_attempts = [0] * len(requests)
        self.num_done = 0
        self.num_failed = 0
        self.queue = PendingQueue()
        self._wake = asyncio.Event()
        self._bar: Any = None
        self._submitted = 0.0

    async def run(self, *, return_exceptions: bool = True) -> list[Completion | SplitserveError]:
        for i, req in enumerate(self.requests):
            self.queue.push(i, _priority(req, self.defaults))
        tasks: set[asyncio.Task] = set()
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=len(self.requests), unit="req", desc="requests", dynamic_ncols=True)
        self._submitted = clock()
        try:
            while self.num_done < len(self.requests):
                self._wake.clear()
                now = clock()
                while self.controller.can_start(now):
                    i = self.queue.pop_ready(now)
                    if i is None:
                        break
                    task = asyncio.ensure_future(self._send(i, self.controller.on_start(now)))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                await self._sleep(now)
        finally:
            for task in list(tasks):  # only when run() itself is cancelled
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if self._bar is not None:
                self._bar.close()
        assert all(r is not None for r in self.results)
        if not return_exceptions and self.num_failed:
            raise BatchFailed(list(self.results))
        return list(self.results)  # type: ignore[arg-type]

    async def _sleep(self, now: float) -> None:
        """Until something changes: a request finished, a pause or a backoff ended."""
        wait = self.controller.wait_s(now)
        if wait is None:  # every slot taken: only a finishing request can change that
            timeout = None
        elif wait > 0:  # paused for Retry-After
            timeout = wait
        else:  # a free slot but nothing eligible: wait for the next backoff to end (pop_ready moved the due ones)
            ready_at = self.queue.next_ready_at()
            timeout = None if ready_at is None else max(0.0, ready_at - now)
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _send(self, i: int, ticket: Ticket) -> None:
        self.num_attempts[i] += 1
        ctrl = self.controller
        try:
            result = await self.client._collect(self.requests[i], self.defaults, queue_s=clock() - self._submitted,
                                                num_attempts=self.num_attempts[i])
        except SplitserveError as e:
            now = clock()
            retry_after = getattr(e, "retry_after_s", None)
            if isinstance(e, Overloaded):
                ctrl.on_overload(ticket, now, retry_after)
            else:
                ctrl.on_failure(ticket, now)
            if self.retry.should_retry(e, self.num_attempts[i]):
                delay = self.retry.delay_s(self.num_attempts[i], retry_after, self.rng)
                self.queue.push(i, _priority(self.requests[i], self.defaults), ready_at=now + delay)
            else:
                self._finish(i, e)
        except Exception as e:  # a bug, not the server: still this item's result, never a lost item
            ctrl.on_failure(ticket, clock())
            self._finish(i, e)
        else:
            ctrl.on_success(ticket, clock())
            self._finish(i, result)
        finally:
            self._wake.set()

    def _finish(self, i: int, result: Completion | BaseException) -> None:
        assert self.results[i] is None, f"request {i} finished twice"
        self.results[i] = result
        self.num_done += 1
        self.num_failed += isinstance(result, BaseException)
        if self._bar is not None:
            self._bar.set_postfix(limit=self.controller.limit, in_flight=self.controller.in_flight,
                                  failed=self.num_failed, refresh=False)
            self._bar.update(1)


def _priority(req: Request, defaults: dict[str, Any]) -> int:
    return int(req.params.get("priority", defaults.get("priority")) or 0)

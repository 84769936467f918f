"""An ``LLMEngine`` driven from asyncio: the step loop runs in one dedicated thread.

Lifecycle: ``start()`` (inside a running event loop) launches the loop task. Every
engine mutation (add, abort, reserve, release) is queued with ``call(fn)`` and
applied by the engine thread *between* steps, so the engine itself needs no
locks. Each step's outputs are routed to per-request asyncio queues that
``generate`` / ``stream`` consume. The loop sleeps when there is no work.
Safety rule: only the engine thread touches the ``LLMEngine``; the event loop
thread only touches ``_queues`` and futures.

If a step raises (a bug, or a device error), every in-flight request receives the
error, its blocks are freed, and the loop goes on serving new requests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

from splitserve.engine.aio import cancel_and_wait
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineStepError(RuntimeError):
    """The engine step failed while this request was in flight."""


class EngineStopped(RuntimeError):
    """The engine loop has been stopped: no call into it can run any more."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        engine.runner.steps_off_main_thread()  # every step runs on the executor's thread below
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self._ops: list[tuple[Callable[[], Any], asyncio.Future]] = []
        self._ops_lock = threading.Lock()
        self._queues: dict[str, asyncio.Queue] = {}
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self.num_steps = 0

    # ---- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        if self._stopped:
            raise EngineStopped("the engine has been stopped")
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._task = self._loop.create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        """Stop the loop; calls still queued, and any made later, fail with ``EngineStopped`` (none waits forever)."""
        self._stopped = True
        await cancel_and_wait(self._task)
        self._task = None
        self._executor.shutdown(wait=True)
        with self._ops_lock:
            ops, self._ops = self._ops, []
        for _, fut in ops:
            _resolve(fut, None, EngineStopped("the engine stopped before this call ran"))
        for q in self._queues.values():
            q.put_nowait(EngineStopped("the engine stopped while this request ran"))

    # ---- calls into the engine thread ------------------------------------------
    def run_before_start(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread and wait for it; only before ``start()`` (nothing else steps the engine then),
        e.g. ``engine.warm_up.warm_up`` on the thread that will step the engine."""
        if self._task is not None or self._stopped:
            raise RuntimeError("run_before_start: the engine loop has already started")
        return self._executor.submit(fn).result()

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in the engine thread between steps; its result or exception comes back."""
        self.start()
        fut = self._loop.create_future()
        with self._ops_lock:
            self._ops.append((fn, fut))
        self._wakeup.set()
        return await fut

    def _apply_ops(self) -> list[RequestOutput]:
        """Run queued calls; a call that returns a ``RequestOutput`` also has it routed to its stream."""
        with self._ops_lock:
            ops, self._ops = self._ops, []
        outputs = []
        for fn, fut in ops:
            try:
                result, error = fn(), None
            except Exception as e:  # delivered to the caller, the loop keeps going
                result, error = None, e
            if isinstance(result, RequestOutput):
                outputs.append(result)
            self._loop.call_soon_threadsafe(_resolve, fut, result, error)
        return outputs

    def _step_once(self) -> list[RequestOutput]:
        outputs = self._apply_ops()
        if not self.engine.has_unfinished_requests():
            return outputs
        self.num_steps += 1
        return outputs + self.engine.step()

    async def _run(self) -> None:
        while True:
            with self._ops_lock:
                has_ops = bool(self._ops)
            if not has_ops and not self.engine.has_unfinished_requests():
                await self._wakeup.wait()
            self._wakeup.clear()
            try:
                outputs = await self._loop.run_in_executor(self._executor, self._step_once)
            except Exception as e:
                logger.exception("engine step failed; failing in-flight requests")
                await self._loop.run_in_executor(self._executor, self._abort_all)
                for q in self._queues.values():
                    q.put_nowait(EngineStepError(f"engine step failed: {e}"))
                continue
            for out in outputs:
                q = self._queues.get(out.req_id)
                if q is not None:
                    q.put_nowait(out)

    def _abort_all(self) -> None:
        for req_id in list(self._queues):
            self.engine.abort_request(req_id)

    # ---- streams ---------------------------------------------------------------
    async def stream(self, req_id: str, add: Callable[[], RequestOutput | Any], coalesce: bool = False) -> AsyncIterator[RequestOutput]:
        """Register ``req_id``, run ``add`` in the engine thread, then yield its outputs until finished.

        ``coalesce``: when the consumer fell behind and several outputs are
        waiting, yield them as one (new tokens and text joined, the rest from the
        latest), so a slow hop after this one (a Ray stream, HTTP) carries fewer,
        larger chunks instead of falling further behind.
        If the consumer stops early (client gone, cancellation, error), the request is
        aborted and its blocks freed.
        """
        q: asyncio.Queue = asyncio.Queue()
        self._queues[req_id] = q
        finished = False
        try:
            await self.call(add)  # outputs it returns arrive through the queue, in order
            pending = None  # an error met while coalescing: raised after the outputs before it
            while True:
                if pending is not None:
                    item, pending = pending, None
                else:
                    item = await q.get()
                if isinstance(item, Exception):
                    raise item
                while coalesce and not item.finished and not q.empty():
                    nxt = q.get_nowait()
                    if isinstance(nxt, Exception):
                        pending = nxt
                        break
                    item = replace(nxt, new_token_ids=item.new_token_ids + nxt.new_token_ids, new_text=item.new_text + nxt.new_text)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(req_id, None)
            if not finished:
                await asyncio.shield(self._abort_quietly(req_id))

    async def _abort_quietly(self, req_id: str) -> None:
        try:
            await self.abort(req_id)
        except EngineStopped:
            return  # the engine is gone, and its blocks with it: there is nothing left to abort
        except Exception:  # pragma: no cover - abort must never raise into a finally
            logger.exception("abort of %s failed", req_id)

    def generate(
        self, req_id: str, prompt: str | list[int], params: SamplingParams, *, priority: int = 0, keep_kv: bool = False,
        coalesce: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        arrived = time.monotonic()  # not when the step thread gets to it: a long step would hide that wait from its deadline
        add = lambda: self.engine.add_request(prompt, params, req_id, priority=priority, keep_kv=keep_kv, arrival_time=arrived)  # noqa: E731
        return self.stream(req_id, add, coalesce=coalesce)

    async def abort(self, req_id: str) -> bool:
        """Abort ``req_id`` between steps; a step of nothing but requests being aborted is given up at its next layer."""
        self.engine.stop_soon(req_id)
        return await self.call(lambda: self.engine.abort_request(req_id))


def _resolve(fut: asyncio.Future, result: Any, error: Exception | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)

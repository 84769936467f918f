"""In-process serving stack for the ingress and router tests: real workers, no Ray.

Real ``PrefillWorker`` / ``DecodeWorker`` objects on the tiny checkpoint (their
NIXL agents are real: same process, different agent names, so KV transfers
really move bytes), wrapped in ``LocalHandle`` stand-ins for Ray Serve handles,
behind a real ``IngressCore`` and its FastAPI app.

Why one event loop per module and not ``asyncio.run`` per test: a worker's
``AsyncEngine`` binds its step loop (and the decode worker its notification
poller) to the loop that first uses it, and worker construction costs about a
second, so workers shared between tests must live on one loop. ``AioRunner``
owns that loop; each test runs its coroutine to completion on it (bounded, so a
hang fails the test instead of stalling the run). No pytest-asyncio needed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

import httpx
import pytest

from splitserve import LLM, SamplingParams
from splitserve.config import ServeConfig
from splitserve.decode.worker import DecodeWorker
from splitserve.worker_base import EngineWorker
from splitserve.ingress import IngressCore, build_http_app
from splitserve.prefill.worker import PrefillWorker
from splitserve.router import RoutedRequest
from splitserve.scheduler.directory import LocalDirectory
from tests.fakes import LocalHandle
from tests.helpers import assert_no_leaks

T = TypeVar("T")

DEFAULT_BLOCKS = 256


class AioRunner:
    """One event loop for a module; ``run`` drives a coroutine on it with a deadline."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Awaitable[T], timeout_s: float = 60.0) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout_s))

    def close(self) -> None:
        loop = self.loop
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        stuck: set = set()
        if pending:
            _, stuck = loop.run_until_complete(asyncio.wait(pending, timeout=15.0))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        assert not stuck, f"tasks that ignored cancellation: {sorted(t.get_name() for t in stuck)}"  # a hang, reported


def engine_config(model: str, num_kv_blocks: int = DEFAULT_BLOCKS, **kw: Any) -> dict:
    return {"model": model, "dtype": "float32", "num_kv_blocks": num_kv_blocks, **kw}


def make_prefill(model: str, worker_id: str, num_kv_blocks: int = DEFAULT_BLOCKS, **options: Any) -> PrefillWorker:
    return PrefillWorker(engine_config(model, num_kv_blocks), options, worker_id=worker_id)


def make_decode(model: str, worker_id: str, num_kv_blocks: int = DEFAULT_BLOCKS, role: str = "decode", **options: Any) -> DecodeWorker:
    return DecodeWorker(engine_config(model, num_kv_blocks), options, worker_id=worker_id, role=role)


def worker_is_idle(w: EngineWorker) -> bool:
    """Nothing queued, running, reserved, held for transfer or in flight in NIXL; every block free."""
    e = w.engine
    return (
        not e.has_unfinished_requests()
        and e.pool.num_free_blocks == e.pool.num_blocks
        and e.num_blocks_in_flight() == 0
        and not len(getattr(w, "_landings", ()))
        and not getattr(w, "_waiters", None)
        and w.agent.num_live_handles == 0
    )


async def settle(workers: Iterable[EngineWorker], timeout_s: float = 5.0) -> None:
    """Wait (bounded) for in-flight aborts and releases to land, then assert nothing leaked."""
    workers = list(workers)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not all(worker_is_idle(w) for w in workers):
        await asyncio.sleep(0.02)
    for w in workers:
        assert_no_leaks(w.engine)
        e = w.engine
        assert e.num_blocks_in_flight() == 0, f"{w.worker_id}: reserved {dict(e._reserved)} held {dict(e._held)}"
        assert not len(getattr(w, "_landings", ())), f"{w.worker_id}: open or fenced reservations {w._landings._by_tid}"
        assert w.agent.num_live_handles == 0, f"{w.worker_id}: {w.agent.num_live_handles} NIXL requests not released"


async def stop_workers(workers: Iterable[EngineWorker]) -> None:
    for w in workers:
        poller = getattr(w, "_poller", None)
        if poller is not None and not poller.done():
            poller.cancel()
            try:
                await poller
            except asyncio.CancelledError:
                pass
        await w.aengine.stop()
        w.agent.close()


class Stack:
    """An ``IngressCore`` + app over given workers, each behind its own ``LocalHandle``.

    ``routing.local_prefill_budget_s`` is 0 unless a test sets it: the tiny checkpoint prefills a short
    prompt in well under the default budget, so with it every prompt a test sends after the first
    would be prefilled on the decode worker, not through the transfer path the test is about.
    """

    def __init__(
        self, model: str, prefill: list[EngineWorker], decode: list[EngineWorker], *, mode: str | None = None,
        **cfg: Any,
    ) -> None:
        self.model = model
        self.prefill_workers = {w.worker_id: w for w in prefill}
        self.decode_workers = {w.worker_id: w for w in decode}
        self.handles = {wid: LocalHandle(w) for wid, w in {**self.prefill_workers, **self.decode_workers}.items()}
        mode = mode or ("disaggregated" if prefill else "aggregated")
        engine = {"model": model, **cfg.pop("engine", {})}
        cfg["routing"] = {"local_prefill_budget_s": 0.0, **cfg.get("routing", {})}
        self.cfg = ServeConfig(mode=mode, num_prefill=max(1, len(prefill)), num_decode=len(decode), engine=engine, **cfg)
        self.directory = LocalDirectory(self.handles, poll_interval_s=self.cfg.routing.load_report_interval_s)
        self.core = IngressCore(self.cfg, model, self.directory)
        self.app = build_http_app(self.core)

    @property
    def workers(self) -> list[EngineWorker]:
        return [*self.prefill_workers.values(), *self.decode_workers.values()]

    def client(self, **headers: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://test", headers=headers, timeout=60)

    async def __aenter__(self) -> "Stack":
        assert await self.core.registry.wait_ready(30), f"workers never reported: {sorted(self.core.registry.reports)}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.core.registry.stop()
        if exc[0] is None:  # do not hide the test's own failure behind a leak report
            await settle(self.workers)

    def metrics_text(self) -> str:
        self.core.metrics.update_workers(list(self.core.registry.reports.values()), self.core.registry.healthy_ids())
        return self.core.metrics.render().decode()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text (labels must match exactly those given, as a subset)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def greedy(max_tokens: int, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


async def collect(core: IngressCore, prompt: list[int], params: SamplingParams, req_id: str | None = None) -> tuple[list[int], list]:
    """Drive ``core.router.stream`` to the end; the generated token ids and the raw chunks."""
    import uuid

    rreq = RoutedRequest(req_id or uuid.uuid4().hex, list(prompt), params)
    chunks = [c async for c in core.router.stream(rreq)]
    return [t for c in chunks for t in c.new_token_ids], chunks


class Reference:
    """Offline ``LLM`` greedy outputs (the correctness oracle), cached per (prompt, max_tokens)."""

    def __init__(self, model: str) -> None:
        self.llm = LLM(model, dtype="float32", num_kv_blocks=DEFAULT_BLOCKS)
        self._cache: dict[tuple, Any] = {}

    def output(self, prompt: list[int], max_tokens: int):
        key = (tuple(prompt), max_tokens)
        if key not in self._cache:
            self._cache[key] = self.llm.generate([list(prompt)], greedy(max_tokens), use_tqdm=False)[0].outputs[0]
        return self._cache[key]

    def tokens(self, prompt: list[int], max_tokens: int) -> list[int]:
        return list(self.output(prompt, max_tokens).token_ids)

    def text(self, prompt: list[int], max_tokens: int) -> str:
        return self.output(prompt, max_tokens).text


@pytest.fixture(scope="module")
def aio():
    runner = AioRunner()
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def reference(tiny_model) -> Reference:
    ref = Reference(tiny_model)
    yield ref
    assert_no_leaks(ref.llm.engine)

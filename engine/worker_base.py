"""What prefill and decode workers share: an engine in a thread, a NIXL agent, a load report.

Lifecycle: construction loads the model, allocates the KV pool and registers it
with NIXL once. The ingress then collects every worker's ``agent_info()`` and
hands each worker the infos of the peers it will send KV to (``add_peers``);
the layout and protocol version are checked there and a mismatch is refused.
``load()`` is polled by the ingress to keep its view of queue depths and free
blocks fresh; ``instance_id`` changes when a replica restarts, which tells the
ingress to redo the handshake.

Any worker can also serve a whole request (``generate``: prefill and decode
here) and take over a request whose decode worker died mid-stream (``resume``:
prompt + the tokens already streamed are prefilled here, and the stream goes
on). A consumer that stops early aborts the request, which frees its blocks.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.outputs import RequestOutput
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.worker_messages import ResumeRequest
from splitserve.scheduler.types import WorkerBusy
from splitserve.transfer import make_transfer_agent

__all__ = ["EngineWorker", "WorkerBusy", "WorkerOptions", "output_chunk"]

logger = logging.getLogger(__name__)


@dataclass
class WorkerOptions:
    """Knobs of a worker process beyond the engine's."""

    transfer_timeout_s: float = 30.0  # one KV transfer, prefill side
    kv_wait_timeout_s: float = 60.0  # decode side: from generate_prefilled until the KV notification
    reservation_ttl_s: float = 300.0  # reserved blocks no request claimed are freed after this
    fail_fraction: float = 0.0  # fault injection (tests)
    delay_fraction: float = 0.0
    delay_s: float = 0.0
    fault_seed: int = 0
    prefix_report_max_blocks: int = 16384  # cap on the cached-block hashes a load report carries


def output_chunk(out: RequestOutput) -> dict[str, Any]:
    """The plain dict a worker streams to the ingress for one ``RequestOutput``."""
    return {
        "req_id": out.req_id,
        "new_token_ids": out.new_token_ids,
        "new_text": out.new_text,
        "finished": out.finished,
        "finish_reason": out.finish_reason,
        "num_prompt_tokens": len(out.prompt_token_ids),
        "num_output_tokens": len(out.token_ids),
        "num_cached_tokens": out.metrics.num_cached_tokens,
    }


class EngineWorker:
    role = "both"

    def __init__(self, worker_id: str, engine_config: dict | EngineConfig, options: dict | WorkerOptions | None = None):
        cfg = engine_config if isinstance(engine_config, EngineConfig) else EngineConfig(**engine_config)
        self.options = options if isinstance(options, WorkerOptions) else WorkerOptions(**(options or {}))
        self.worker_id = worker_id
        self.instance_id = uuid.uuid4().hex
        self.engine = LLMEngine(cfg)
        self.aengine = AsyncEngine(self.engine)
        o = self.options
        self.agent = make_transfer_agent(
            worker_id, self.engine.runner.kv_cache,
            fail_fraction=o.fail_fraction, delay_fraction=o.delay_fraction, delay_s=o.delay_s, seed=o.fault_seed,
        )
        self.num_requests = 0
        self.num_failed = 0
        self.num_resumed = 0  # requests taken over from a worker that died mid-stream
        self.transfer_bytes = 0
        self.transfer_seconds = 0.0
        logger.info("%s worker %s ready (pid %d, %d KV blocks)", self.role, worker_id, os.getpid(), self.engine.pool.num_blocks)

    # ---- handshake ---------------------------------------------------------------
    async def agent_info(self) -> bytes:
        return self.agent.info().to_bytes()

    async def add_peers(self, infos: list[bytes]) -> list[str]:
        """Load peers' NIXL metadata; raises ``KVLayoutMismatch`` naming the differing fields."""
        return [self.agent.add_peer(info) for info in infos]

    # ---- observability -----------------------------------------------------------
    async def load(self, known_prefix_version: int | None = None) -> dict[str, Any]:
        """A snapshot of queue depth and KV use (reads counters only: never waits for a step).

        ``known_prefix_version``: the ``prefix_version`` of the last summary the
        caller holds. When the cache changed since (or the caller holds none: -1),
        the report carries ``prefix_hashes``, the hottest cached block hashes
        (``BlockPool.hottest_hashes``) for prefix-aware routing; ``None`` never
        sends them.
        """
        report = self._load_counters()
        pool = self.engine.pool
        if known_prefix_version is not None and pool.enable_prefix_caching:
            version = pool.prefix_version
            report["prefix_version"] = version
            if version != known_prefix_version:
                report["prefix_hashes"] = pool.hottest_hashes(self.options.prefix_report_max_blocks)
        return report

    def _load_counters(self) -> dict[str, Any]:
        e = self.engine
        sched = e.scheduler
        return {
            "worker_id": self.worker_id,
            "instance_id": self.instance_id,
            "role": self.role,
            "num_waiting": len(sched.waiting),
            "num_running": len(sched.running),
            "num_free_blocks": e.pool.num_free_blocks,
            "num_total_blocks": e.pool.num_blocks,
            "num_blocks_in_flight": e.num_blocks_in_flight(),
            "block_size": e.block_size,
            "num_queued_tokens": sum(s.num_uncomputed_tokens for s in list(sched.waiting)),
            "num_requests": self.num_requests,
            "num_failed": self.num_failed,
            "num_resumed": self.num_resumed,
            "transfer_bytes": self.transfer_bytes,
            "transfer_seconds": self.transfer_seconds,
            "prefix_hits": e.pool.num_prefix_hits,
            "prefix_queries": e.pool.num_prefix_queries,
            "time": time.time(),
        }

    async def check_health(self) -> None:
        """Ray Serve health hook: the engine loop must be alive."""
        task = self.aengine._task
        if task is not None and task.done():
            raise RuntimeError(f"engine loop of {self.worker_id} stopped: {task.exception()!r}")

    async def abort(self, req_id: str) -> bool:
        return await self.aengine.abort(req_id)

    # ---- whole requests here -----------------------------------------------------
    async def generate(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Prefill and decode here: aggregated mode, short prompts, fallbacks, and degraded mode
        (a prefill worker serving whole requests while no decode worker is healthy)."""
        params = SamplingParams.from_dict(req["sampling"])
        prompt = req.get("prompt_token_ids") or req.get("prompt")
        add = lambda: self.engine.add_request(prompt, params, req["req_id"], priority=req.get("priority", 0))  # noqa: E731
        async for chunk in self._stream_here(req["req_id"], add):
            yield chunk

    async def resume(self, msg: ResumeRequest) -> AsyncIterator[dict[str, Any]]:
        """Continue a request another worker was streaming when it died (prompt + tokens sent, prefilled here)."""
        self.num_resumed += 1
        params = SamplingParams.from_dict(msg.sampling)
        logger.info(
            "%s resumes %s after %s died: %d prompt + %d streamed tokens to prefill",
            self.worker_id, msg.req_id, msg.origin_worker_ids[-1] if msg.origin_worker_ids else "its worker",
            len(msg.prompt_token_ids), len(msg.output_token_ids),
        )
        add = lambda: self.engine.resume_request(  # noqa: E731
            msg.req_id, msg.prompt_token_ids, msg.output_token_ids, params, num_sent_chars=msg.num_sent_chars,
            priority=msg.priority,
        )
        async for chunk in self._stream_here(msg.req_id, add):
            yield chunk

    async def _stream_here(self, req_id: str, add: Callable[[], Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream a request ``add`` puts into this engine; a consumer that leaves aborts it (``AsyncEngine.stream``)."""
        self.num_requests += 1
        finished = False
        try:
            async for out in self.aengine.stream(req_id, add, coalesce=True):
                finished = out.finished
                yield output_chunk(out)
        except BaseException:
            if not finished:
                self.num_failed += 1
            raise

    async def reset_prefix_cache(self) -> None:
        await self.aengine.call(self.engine.pool.reset_prefix_cache)

    def __del__(self) -> None:
        agent = getattr(self, "agent", None)
        if agent is not None:
            try:
                agent.close()
            except Exception:
                pass

"""What prefill and decode workers share: an engine in a thread, a NIXL agent, published load.

Lifecycle of a worker replica:
  1. construction loads the model, allocates the KV pool, warms the engine up on
     its step thread (``engine.warm_up``: the first request pays no one-time costs,
     and the step costs routing reads are measured before traffic) and registers
     the pool with NIXL once; the worker names itself ``<role>-<Serve replica id>`` (a restarted
     replica is a new replica with a new name, so its peers re-handshake);
  2. Serve captures ``record_replica_metadata()`` once before routing to it: the
     name, role, KV layout and the NIXL agent metadata the prefill side needs;
  3. from then on Serve asks ``record_routing_stats()`` every routing-stats period
     (the ``WorkerStats`` the pairing policy reads, published to the ingress's
     request routers) and ``record_autoscaling_stats()`` for the SLA planner;
  4. the ingress hands prefill workers the decode workers' agent infos
     (``add_peers``; layout and protocol version are checked there, a mismatch
     refused) and fetches a worker's prefix-cache summary when its
     ``prefix_version`` changed (``prefix_summary``);
  5. removal: Serve stops routing to the replica and waits for its in-flight
     calls (streams included) up to the graceful-shutdown timeout, then the NIXL
     agent is closed.

Any worker can also serve a whole request (``generate``: prefill and decode here)
and take over a request whose decode worker died mid-stream (``resume``: prompt +
the tokens already streamed are prefilled here, and the stream goes on). A
consumer that stops early aborts the request, which frees its blocks.

Tokens go back on the request's own stream, or, when the call names a
``feed_id``, on that ingress's token feed (``feed``; ``splitserve.token_feed``):
one item per engine step for all its requests, while the request's own call
only lasts as long as the request (and ends with its error, if any).
"""

from __future__ import annotations

import base64
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.block_pool import WorkerBusy
from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.warm_up import warm_up
from splitserve.token_feed import FeedHub
from splitserve.transfer import make_transfer_agent
from splitserve.worker_messages import GenerateRequest, OutputChunk, ResumeRequest, TokenBatch, WorkerStats
from splitserve.worker_metrics import BusyMeter, WorkerMeters

__all__ = ["EngineWorker", "WorkerBusy", "WorkerOptions", "own_worker_id"]

logger = logging.getLogger(__name__)


@dataclass
class WorkerOptions:
    """Knobs of a worker process beyond the engine's."""

    transfer_timeout_s: float = 30.0  # one KV transfer, prefill side
    kv_wait_timeout_s: float = 150.0  # decode side: from the reservation until the KV notification (> the router's prefill timeout)
    reservation_ttl_s: float = 300.0  # reserved blocks no request claimed are freed after this
    fail_fraction: float = 0.0  # fault injection (tests)
    delay_fraction: float = 0.0
    delay_s: float = 0.0
    fault_seed: int = 0
    prefix_report_max_blocks: int = 16384  # cap on the cached-block hashes a prefix summary carries
    meter_window_s: float = 30.0  # the SLA planner's view of this worker: rates and p90s over this window
    warm_up_prompt_tokens: int = 32  # before serving, time a throwaway prompt of this many tokens (engine.warm_up); 0: no


def own_worker_id(role: str) -> str:
    """``<role>-<Serve replica id>`` inside a Serve replica (unique: a restart is a new replica); an aggregated
    worker (role "both") is ``worker-<id>``."""
    from ray import serve

    return f"{'worker' if role == 'both' else role}-{serve.get_replica_context().replica_id.unique_id}"


def startup_phases(init_start: float, engine_ready: float, agent_ready: float) -> dict[str, float]:
    """Where this worker's cold start went (seconds): process start to the constructor (interpreter, Ray worker,
    imports, Serve replica set-up), the engine (weights, KV pool, kernel probes), the NIXL agent."""
    try:
        import psutil

        process_start = psutil.Process().create_time()
    except Exception:  # pragma: no cover - psutil comes with Ray
        process_start = init_start
    return {
        "process_to_init_s": round(max(0.0, init_start - process_start), 3), "engine_s": round(engine_ready - init_start, 3),
        "transfer_agent_s": round(agent_ready - engine_ready, 3), "total_s": round(max(0.0, agent_ready - process_start), 3),
    }


def accelerator_memory_bytes(device: Any) -> int:
    """GPU memory this process has allocated on ``device`` (0 on CPU, where the KV pool is ordinary memory)."""
    if getattr(device, "type", "cpu") != "cuda":
        return 0
    import torch

    return int(torch.cuda.memory_allocated(device))


def node_id() -> str:
    """The Ray node this process runs on ("" outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:
        return ""


class EngineWorker:
    role = "both"

    def __init__(self, engine_config: dict | EngineConfig, options: dict | WorkerOptions | None = None, worker_id: str | None = None):
        t0 = time.time()
        cfg = engine_config if isinstance(engine_config, EngineConfig) else EngineConfig(**engine_config)
        self.options = options if isinstance(options, WorkerOptions) else WorkerOptions(**(options or {}))
        self.worker_id = worker_id or own_worker_id(self.role)
        self.engine = LLMEngine(cfg)
        self.aengine = AsyncEngine(self.engine)
        if self.options.warm_up_prompt_tokens > 0:
            self.aengine.run_before_start(lambda: warm_up(self.engine, self.options.warm_up_prompt_tokens))
        t1 = time.time()
        o = self.options
        self.agent = make_transfer_agent(
            self.worker_id, self.engine.runner.kv_cache,
            fail_fraction=o.fail_fraction, delay_fraction=o.delay_fraction, delay_s=o.delay_s, seed=o.fault_seed,
        )
        self.startup = startup_phases(t0, t1, time.time())
        self.meters = WorkerMeters(self.options.meter_window_s, started_s=time.monotonic())
        self.busy = BusyMeter(self.options.meter_window_s)
        self.busy.sample(time.monotonic(), 0.0)
        self.num_requests = 0
        self.num_failed = 0
        self.num_resumed = 0  # requests taken over from a worker that died mid-stream
        self.transfer_bytes = 0
        self.transfer_seconds = 0.0
        self._seq = 0
        self.feeds = FeedHub()
        logger.info("%s worker %s ready (pid %d, %d KV blocks); cold start %s", self.role, self.worker_id, os.getpid(),
                    self.engine.pool.num_blocks, self.startup)

    # ---- handshake ---------------------------------------------------------------
    async def agent_info(self) -> bytes:
        return self.agent.info().to_bytes()

    async def add_peers(self, infos: list[bytes]) -> list[str]:
        """Load peers' NIXL metadata; raises ``KVLayoutMismatch`` naming the differing fields."""
        return [self.agent.add_peer(info) for info in infos]

    async def forget_peers(self, worker_ids: list[str]) -> None:
        """Drop peers that left (best effort: a stale entry is never used, as names are never reused)."""
        for worker_id in worker_ids:
            try:
                self.agent.remove_peer(worker_id)
            except Exception:
                pass

    # ---- what Serve collects -------------------------------------------------------
    def record_replica_metadata(self) -> dict[str, Any]:
        """Static facts, captured by Serve once before the replica gets traffic."""
        return {
            "worker_id": self.worker_id, "role": self.role, "block_size": self.engine.block_size,
            "num_total_blocks": self.engine.pool.num_blocks, "agent_info": base64.b64encode(self.agent.info().to_bytes()).decode(),
            "node_id": node_id(), "startup": dict(self.startup),
        }

    def record_routing_stats(self) -> dict[str, Any]:
        """The load the pairing policy reads (reads counters only: never waits for a step)."""
        return self.stats().to_dict()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What the SLA planner needs from this replica (rates and latency percentiles over the last window)."""
        return self.meters.snapshot(time.monotonic())

    def stats(self) -> WorkerStats:
        e = self.engine
        sched = e.scheduler
        self._seq += 1
        pool = e.pool
        return WorkerStats(
            worker_id=self.worker_id, role=self.role, num_waiting=len(sched.waiting), num_running=len(sched.running),
            num_free_blocks=pool.num_free_blocks, num_total_blocks=pool.num_blocks, num_blocks_in_flight=e.num_blocks_in_flight(),
            block_size=e.block_size, num_queued_tokens=sched.num_queued_prompt_tokens(),
            num_requests=self.num_requests, num_failed=self.num_failed, num_resumed=self.num_resumed,
            transfer_bytes=self.transfer_bytes, transfer_seconds=self.transfer_seconds, prefix_hits=pool.num_prefix_hits,
            prefix_queries=pool.num_prefix_queries, prefix_version=pool.prefix_version if pool.enable_prefix_caching else -1,
            num_tokens=e.num_step_tokens, busy_s=e.busy_s, decode_step_s=e.decode_step_s if sched.running else 0.0,
            prompt_s_per_token=e.prompt_s_per_token, busy_fraction=self.busy.sample(time.monotonic(), e.busy_s),
            accelerator_memory_bytes=accelerator_memory_bytes(e.runner.device), seq=self._seq, time=time.time(),
        )

    async def prefix_summary(self, known_version: int = -1) -> tuple[int, list[int]] | None:
        """``(version, hottest cached block hashes)`` when the cache changed since ``known_version``, else None."""
        pool = self.engine.pool
        if not pool.enable_prefix_caching or pool.prefix_version == known_version:
            return None
        return pool.prefix_version, pool.hottest_hashes(self.options.prefix_report_max_blocks)

    async def check_health(self) -> None:
        """Ray Serve health hook: the engine loop must be alive."""
        task = self.aengine._task
        if task is not None and task.done():
            raise RuntimeError(f"engine loop of {self.worker_id} stopped: {task.exception()!r}")

    async def abort(self, req_id: str) -> bool:
        return await self.aengine.abort(req_id)

    # ---- whole requests here -----------------------------------------------------
    async def feed(self, feed_id: str) -> AsyncIterator[TokenBatch]:
        """The token feed ``feed_id``: each engine step's chunks of the requests started with it (one reader at a
        time: a new one takes over)."""
        async for batch in self.feeds.read(feed_id):
            yield batch

    async def generate(self, req: GenerateRequest, feed_id: str | None = None) -> AsyncIterator[OutputChunk]:
        """Prefill and decode here: aggregated mode, short prompts, fallbacks, and degraded mode
        (a prefill worker serving whole requests while no decode worker is healthy)."""
        arrived = time.monotonic()  # the request's deadlines count from here, not from when the step thread adds it
        add = lambda: self.engine.add_request(  # noqa: E731
            req.prompt_token_ids, req.params, req.req_id, priority=req.priority, arrival_time=arrived,
        )
        async for chunk in self._stream_here(req.req_id, len(req.prompt_token_ids), add, feed_id, req.params.stream_interval):
            yield chunk

    async def resume(self, msg: ResumeRequest, feed_id: str | None = None) -> AsyncIterator[OutputChunk]:
        """Continue a request another worker was streaming when it died (prompt + tokens sent, prefilled here)."""
        self.num_resumed += 1
        logger.info(
            "%s resumes %s after %s died: %d prompt + %d streamed tokens to prefill",
            self.worker_id, msg.req_id, msg.origin_worker_ids[-1] if msg.origin_worker_ids else "its worker",
            len(msg.prompt_token_ids), len(msg.output_token_ids),
        )
        add = lambda: self.engine.resume_request(  # noqa: E731
            msg.req_id, msg.prompt_token_ids, msg.output_token_ids, msg.params, num_sent_chars=msg.num_sent_chars,
            priority=msg.priority,
        )
        n = len(msg.prompt_token_ids) + len(msg.output_token_ids)
        async for chunk in self._stream_here(msg.req_id, n, add, feed_id, msg.params.stream_interval):
            yield chunk

    async def _stream_here(
        self, req_id: str, num_prompt_tokens: int, add: Callable[[], Any], feed_id: str | None, interval: int,
    ) -> AsyncIterator[OutputChunk]:
        """Stream a request ``add`` puts into this engine; a consumer that leaves aborts it (``AsyncEngine.stream``)."""
        self.num_requests += 1
        self.meters.on_arrival(time.monotonic(), num_prompt_tokens)
        async for chunk in self._stream(req_id, add, time.monotonic(), feed_id, interval):
            yield chunk

    async def _stream(
        self, req_id: str, add: Callable[[], Any], start: float, feed_id: str | None, interval: int,
    ) -> AsyncIterator[OutputChunk]:
        """The engine's outputs for ``req_id`` as chunks, timed for the planner (first token, gaps, output length):
        yielded, or pushed to the token feed ``feed_id`` (then this yields nothing and ends when the request does).
        ``interval`` (``SamplingParams.stream_interval``): after the first chunk, tokens are held back until this
        many are waiting or the request finished."""
        finished = False
        last = held = None
        feed = self.feeds.bind(feed_id) if feed_id is not None else None
        try:
            async for out in self.aengine.stream(req_id, add, coalesce=feed is None):
                now = time.monotonic()
                if last is None:
                    self.meters.on_first_token(now, now - start)
                elif out.new_token_ids:
                    self.meters.on_tokens(now, now - last, len(out.new_token_ids))
                last = now
                finished = out.finished
                if finished:
                    self.meters.on_finish(now, len(out.token_ids))
                chunk = OutputChunk.of(out) if held is None else held.then(OutputChunk.of(out))
                if interval > 1 and not finished and len(chunk.new_token_ids) < interval and len(out.token_ids) > len(chunk.new_token_ids):
                    held = chunk  # not the first tokens, not the last, fewer than the interval
                    continue
                held = None
                if feed is None:
                    yield chunk
                else:
                    feed.push(chunk)
        except BaseException:
            if not finished:
                self.num_failed += 1
            raise
        finally:
            if feed is not None:
                self.feeds.unbind(feed_id)

    async def reset_prefix_cache(self) -> None:
        await self.aengine.call(self.engine.pool.reset_prefix_cache)

    def __del__(self) -> None:
        agent = getattr(self, "agent", None)
        if agent is not None:
            try:
                agent.close()
            except Exception:
                pass

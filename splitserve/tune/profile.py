"""Measure one worker's prefill and decode curves on this machine with the real engine, in-process.

    profiles = measure_profile(model_dir, num_threads=1)   # LLMEngine, the same code the workers run
    save_profile(profiles, "profile.json")

* prefill: one prompt of ``t`` random token ids (prefix caching off) for each ``t``
  in ``prefill_tokens`` (up to the token budget); the time of the one engine step
  that computes it, median of ``repeats``; fitted ``a + b*t + c*t^2``.
* decode: for each context length, ``max(batch_sizes)`` sequences are prefilled
  (distinct prompts) and then shrunk to each batch size by aborting; the median
  time of a few decode steps is recorded against (batch size, context tokens);
  fitted ``a + b*n + c*k``.
* transfer: KV bytes per token from the model's shape; link bandwidth and fixed
  latency are assumptions (``TransferProfile`` arguments), stated in ``meta``.

Each worker of a sweep takes one unit (one CPU here), so the default is one
torch thread, as the workers run with ``num_cpus=1``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

from splitserve.tune.curves import Profiles, TransferProfile, fit_decode, fit_error, fit_prefill

logger = logging.getLogger(__name__)

DEFAULT_PREFILL_TOKENS = (16, 64, 128, 256, 512, 1024, 2048)
DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16)
DEFAULT_CONTEXTS = (128, 512)
# Same-host KV moves (NIXL over UCX shared memory / TCP) plus the control round trips of the
# disaggregated path (reserve on D, prefill call on P, notification): assumed, not measured here.
LOCAL_TRANSFER = {"bandwidth_bytes_per_s": 1e9, "latency_s": 0.02}


def measure_profile(
    model: str | None = None, *, dtype: str = "auto", num_threads: int | None = 1, token_budget: int = 2048,
    max_num_seqs: int = 128, prefill_tokens: tuple[int, ...] = DEFAULT_PREFILL_TOKENS,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES, contexts: tuple[int, ...] = DEFAULT_CONTEXTS,
    repeats: int = 2, decode_steps: int = 3, seed: int = 0, transfer: dict[str, float] | None = None,
    kv_capacity_blocks: int | None = 2048, num_busy: int = 1, progress=None,
) -> Profiles:
    """Run the engine here and fit the curves; ``progress(str)`` (optional) is told what is being measured.

    ``kv_capacity_blocks`` is the KV pool of the workers the profile stands for (as
    ``tune --num-kv-blocks`` deploys them); None = the engine's default pool size here.
    ``num_busy`` > 1 measures while ``num_busy - 1`` other processes run the same engine
    flat out (prefills and decode batches): the speed of one unit when every unit of the
    machine is busy, as in a sweep whose split uses all of them.
    """
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine, resolve_model_path

    model_path = resolve_model_path(model)
    longest = max(max(prefill_tokens), max(contexts) + decode_steps + 4)
    need_tokens = max(longest, max(batch_sizes) * (max(contexts) + decode_steps + 4)) + 64
    cfg = EngineConfig(model=model_path, dtype=dtype, num_threads=num_threads, enable_prefix_caching=False,
                       max_num_batched_tokens=token_budget, max_num_seqs=max(max_num_seqs, max(batch_sizes)),
                       num_kv_blocks=need_tokens // 16 + len(batch_sizes) + 8)
    engine = LLMEngine(cfg)
    vocab = engine.model_config.vocab_size
    rng = random.Random(seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(min(5, vocab - 1), vocab) for _ in range(n)]

    with _BusyNeighbours(num_busy - 1, cfg.model_dump(), progress):
        prefill_points = _measure_prefill(engine, prompt, [t for t in prefill_tokens if t <= token_budget], repeats, progress)
        decode_points = _measure_decode(engine, prompt, sorted(batch_sizes), contexts, decode_steps, progress)
    prefill = fit_prefill(prefill_points, token_budget)
    kv_capacity = kv_capacity_blocks * engine.block_size if kv_capacity_blocks else _kv_capacity_tokens(engine, cfg)
    decode = fit_decode(decode_points, max_num_seqs, kv_capacity)
    mc = engine.model_config
    itemsize = engine.runner.kv_cache.element_size()
    kv_bytes_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * itemsize
    link = {**LOCAL_TRANSFER, **(transfer or {})}
    meta: dict[str, Any] = {
        "source": "measured on this machine with the in-process engine (splitserve.tune.profile)",
        "device": f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
        "model": f"{model_path} ({mc.num_params / 1e6:.0f}M params, {mc.num_layers} layers, {engine.runner.dtype})",
        "num_params": mc.num_params, "num_threads": num_threads, "num_busy": num_busy,
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": list(os.getloadavg()),
        "prefill_points": prefill_points, "decode_points": decode_points,
        "prefill_fit_error": fit_error(prefill_points, prefill.latency),
        "decode_fit_error": fit_error(decode_points, decode.step),
        "transfer_assumption": "bandwidth and fixed latency assumed for same-host NIXL plus control round trips; bytes/token from the model shape",
    }
    return Profiles(prefill, decode, TransferProfile(kv_bytes_per_token, link["bandwidth_bytes_per_s"], link["latency_s"]), meta)


def _measure_prefill(engine, prompt, token_counts: list[int], repeats: int, progress) -> list[tuple[int, float]]:
    from splitserve.engine.sampling_params import SamplingParams

    one = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    engine.add_request(prompt(32), one)  # warm-up
    _drain(engine)
    points = []
    for t in token_counts:
        if progress:
            progress(f"prefill {t} tokens")
        times = []
        for _ in range(repeats if t <= 512 else 1):
            engine.add_request(prompt(t), one)
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
            _drain(engine)
        points.append((t, statistics.median(times)))
    return points


def _measure_decode(engine, prompt, batch_sizes: list[int], contexts: tuple[int, ...], steps: int, progress) -> list[tuple[int, int, float]]:
    from splitserve.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=4 * steps * len(batch_sizes) + 8, ignore_eos=True, temperature=0.0)
    points = []
    for ctx in contexts:
        if progress:
            progress(f"decode context {ctx}: prefilling {batch_sizes[-1]} sequences")
        req_ids = [engine.add_request(prompt(ctx), params) for _ in range(batch_sizes[-1])]
        while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running + list(engine.scheduler.waiting)):
            engine.step()
        for n in reversed(batch_sizes):
            if progress:
                progress(f"decode context {ctx}: batch {n}")
            for rid in req_ids[n:]:
                engine.abort_request(rid)
            req_ids = req_ids[:n]
            engine.step()  # one untimed step after the batch changed
            times, ctx_tokens = [], []
            for _ in range(steps):
                ctx_tokens.append(sum(s.num_tokens for s in engine.scheduler.running))
                t0 = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - t0)
            points.append((n, int(statistics.median(ctx_tokens)), statistics.median(times)))
        for rid in req_ids:
            engine.abort_request(rid)
    return points


class _BusyNeighbours:
    """``n`` processes that keep an engine busy (as the other workers of a sweep would) until the block ends."""

    def __init__(self, n: int, engine_config: dict, progress) -> None:
        self.n, self.engine_config, self.progress = n, engine_config, progress
        self.procs: list = []

    def __enter__(self) -> "_BusyNeighbours":
        if self.n <= 0:
            return self
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.stop, ready = ctx.Event(), ctx.Semaphore(0)
        self.procs = [ctx.Process(target=_busy_loop, args=(self.engine_config, self.stop, ready, i), daemon=True) for i in range(self.n)]
        for p in self.procs:
            p.start()
        if self.progress:
            self.progress(f"starting {self.n} busy neighbour(s)")
        deadline = time.monotonic() + 300
        for _ in self.procs:
            if not ready.acquire(timeout=max(0.0, deadline - time.monotonic())):
                self.__exit__()
                raise RuntimeError("the busy neighbour processes did not start within 300 s")
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.procs:
            return
        self.stop.set()
        for p in self.procs:
            p.join(60)
            if p.is_alive():
                p.terminate()
                p.join(10)
        self.procs = []


def _busy_loop(engine_config: dict, stop, ready, index: int) -> None:
    """Child process: prefill a 512-token prompt, decode 8 sequences for a while, repeat until ``stop``."""
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(**engine_config))
    vocab = engine.model_config.vocab_size
    rng = random.Random(1000 + index)
    params = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.0)
    ready.release()
    while not stop.is_set():
        for _ in range(8):
            engine.add_request([rng.randrange(5, vocab) for _ in range(64)], params)
        engine.add_request([rng.randrange(5, vocab) for _ in range(512)], params)
        while engine.has_unfinished_requests() and not stop.is_set():
            engine.step()
        for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
            engine.abort_request(seq.req_id)


def _drain(engine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def _kv_capacity_tokens(engine, cfg) -> int:
    """KV tokens a worker with the default pool size would hold on this machine (not the small profiling pool)."""
    from splitserve.engine.config import resolve_num_blocks

    default = cfg.model_copy(update={"num_kv_blocks": None})
    return resolve_num_blocks(default, engine.runner.bytes_per_block, engine.runner.device) * engine.block_size


def save_profile(profiles: Profiles, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profiles.to_dict(), indent=2) + "\n")
    return path


def load_profile(path: str | Path) -> Profiles:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"profile file {str(path)!r} does not exist; write one with 'splitserve tune --profile-only --out DIR'")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"profile file {str(path)!r} is not JSON: {e}") from e
    return Profiles.from_dict(data)

"""The measured sweep: deploy each split on a local Ray, drive it at each rate, record goodput.

For every split (``plan_splits``): deploy it with ``splitserve.serve_cli.deploy``
(a ``ServeConfig`` whose workers each take one *unit*: one CPU, or a fraction of
the CPUs when more units than CPUs are asked for), warm it up with one request,
then for each rate send the workload's requests open-loop (``loadgen``), wait
for every one to finish (bounded), and summarize against the SLO; then
``serve.delete`` the application before the next split so splits never share
the machine. Ray is started with ``address="local"`` (never someone else's
cluster) unless one is already initialized, and shut down at the end if we started it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field

from splitserve.tune.loadgen import run_load
from splitserve.tune.planner import Row
from splitserve.tune.simulator import NO_LOCAL_PREFILL, LocalPrefill, Split
from splitserve.tune.workload import SLO, RequestRecord, Workload, summarize

logger = logging.getLogger(__name__)

APP_NAME = "splitserve-tune"
SERVED_NAME = "tune"


@dataclass
class SweepConfig:
    model: str
    workload: Workload
    slo: SLO
    rates: list[float]
    num_requests: int = 20
    units: int = 2
    splits: list[Split] | None = None
    dtype: str = "auto"
    num_kv_blocks: int = 2048
    max_num_batched_tokens: int = 2048
    port: int = 8765
    ready_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    seed: int = 0
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    local_prefill: LocalPrefill = NO_LOCAL_PREFILL  # the servers' routing.local_prefill_* (and what the simulator is told)

    @property
    def unit_cpus(self) -> float:
        """CPUs per worker: one per unit, or an equal share when there are more units than CPUs."""
        return 1.0 if self.units <= self.cpus else round(self.cpus / self.units, 3)


def plan_splits(units: int) -> list[Split]:
    """What fits ``units`` one-unit workers: the aggregated baseline with 1 and ``units`` workers, then every P:D."""
    if units < 1:
        raise ValueError(f"--units must be >= 1, got {units}")
    out = [Split(0, 1, "aggregated")]
    if units > 1:
        out.append(Split(0, units, "aggregated"))
        out.extend(Split(p, units - p) for p in range(1, units))
    return out


def serve_config(cfg: SweepConfig, split: Split):
    from splitserve.config import ServeConfig

    share = {"num_cpus": cfg.unit_cpus}
    return ServeConfig.model_validate({
        "mode": split.mode, "num_prefill": split.num_prefill, "num_decode": split.num_decode, "app_name": APP_NAME,
        "engine": {"model": cfg.model, "dtype": cfg.dtype, "num_kv_blocks": cfg.num_kv_blocks,
                   "max_num_batched_tokens": cfg.max_num_batched_tokens, "num_threads": max(1, math.floor(cfg.unit_cpus))},
        "http": {"host": "127.0.0.1", "port": cfg.port, "served_model_name": SERVED_NAME},
        "prefill_resources": share, "decode_resources": share,
        "routing": {"request_timeout_s": cfg.request_timeout_s, "prefill_timeout_s": cfg.request_timeout_s,
                    "local_prefill_threshold_tokens": cfg.local_prefill.threshold_tokens,
                    "local_prefill_budget_s": cfg.local_prefill.budget_s},
    })


def _start_ray(cfg: SweepConfig) -> bool:
    """Start a private local Ray sized for the largest split; False if one was already running (left as is)."""
    import ray

    if ray.is_initialized():
        return False
    need = math.ceil(cfg.units * cfg.unit_cpus) + 1
    ray.init(address="local", num_cpus=max(cfg.cpus, need), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    return True


def _vocab_size(model: str) -> int:
    from splitserve.engine.model_config import ModelConfig

    return ModelConfig.from_pretrained(model).vocab_size


def run_sweep(cfg: SweepConfig, progress=None) -> tuple[list[Row], dict[tuple[str, float], list[RequestRecord]]]:
    """Measure every (split, rate); ``progress(split_label, rate, row)`` after each. Returns rows and raw records."""
    import ray
    from ray import serve

    from splitserve.serve_cli import deploy

    splits = cfg.splits or plan_splits(cfg.units)
    for s in splits:
        if s.num_units > cfg.units:
            raise ValueError(f"split {s.label} needs {s.num_units} units but --units is {cfg.units}")
    vocab = _vocab_size(cfg.model)
    longest = cfg.workload.prompt_len.max_value + cfg.workload.output_len.max_value
    started = _start_ray(cfg)
    rows: list[Row] = []
    records: dict[tuple[str, float], list[RequestRecord]] = {}
    try:
        for si, split in enumerate(splits):
            scfg = serve_config(cfg, split)
            t = time.monotonic()
            url = deploy(scfg, cfg.ready_timeout_s)
            logger.info("%s ready at %s in %.0f s", split.label, url, time.monotonic() - t)
            try:
                warm = cfg.workload.requests(1.0, 1, seed=cfg.seed + 999)
                run_load(url, SERVED_NAME, warm, vocab, seed=cfg.seed * 1000 + 999 + si, request_timeout_s=cfg.request_timeout_s)
                for ri, rate in enumerate(cfg.rates):
                    specs = cfg.workload.requests(rate, cfg.num_requests, seed=cfg.seed)
                    assert max(s.prompt_len + s.output_len for s in specs) <= longest
                    recs = run_load(url, SERVED_NAME, specs, vocab, seed=cfg.seed * 1000 + si * 100 + ri,
                                    request_timeout_s=cfg.request_timeout_s)
                    row = Row(split.label, rate, summarize(recs, cfg.slo))
                    rows.append(row)
                    records[(split.label, rate)] = recs
                    if progress is not None:
                        progress(split.label, rate, row)
            finally:
                serve.delete(APP_NAME)
    finally:
        if started:
            serve.shutdown()
            ray.shutdown()
    return rows, records


def best_of(rows: list[Row]) -> tuple[str, float]:
    """The split with the highest goodput at any rate (ties: higher attainment, then listed first)."""
    if not rows:
        raise ValueError("no results to choose from")
    best: dict[str, tuple[float, float]] = {}
    for r in rows:
        cur = (r.summary.goodput, r.summary.attainment)
        if r.split not in best or cur > best[r.split]:
            best[r.split] = cur
    label = max(best, key=lambda k: best[k])
    return label, best[label][0]

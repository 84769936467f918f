"""Goodput of the engine's scheduling to latency targets against first come, first served, on the engine alone.

Replays Poisson arrivals in real time through one ``LLMEngine`` (no server: what is measured is the
scheduler's choice of work per step, nothing else differs): ``--num-prompts`` random prompts of
``--prompt-len`` tokens, ``--output-len`` tokens out each (``ignore_eos``), prefix caching off, at each
of ``--request-rates``. Every policy sees the same prompts and arrival times. Per rate and policy it
prints goodput (requests with TTFT <= ``--ttft-s`` and TPOT <= ``--tpot-s``, over the time from the
first arrival to the last finish, as vLLM's bench client counts it), requests served per second, TTFT
p50/p99, mean TPOT and the p99 inter-token gap, with goodput as a ratio to first come, first served.

    python benchmarks/slo_scheduling.py
    python benchmarks/slo_scheduling.py --request-rates 1,2 --num-prompts 48 --model /path/to/checkpoint

It runs on the OpenMP runtime the serving workers preload (as ``benchmarks/engine.py`` does).
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from common import machine_lines, markdown_table, on_workers_openmp

from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.tune.workload import SLO, LengthDist, RequestRecord, RunSummary, Workload, record_from_token_times, summarize


def replay(engine: LLMEngine, prompts: list[list[int]], offsets: list[float], output_len: int) -> list[list[float]]:
    """Adds each prompt at its arrival (between steps, stamped with its true arrival), steps until all finish;
    returns each request's token times in seconds from the start (the clock of ``offsets``)."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    start = time.monotonic()
    token_times: list[list[float]] = [[] for _ in prompts]
    pending = finished = 0
    while finished < len(prompts):
        now = time.monotonic()
        while pending < len(prompts) and start + offsets[pending] <= now:
            engine.add_request(prompts[pending], params, str(pending), arrival_time=start + offsets[pending])
            pending += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, start + offsets[pending] - now))
            continue
        for out in engine.step():
            token_times[int(out.req_id)].extend([time.monotonic() - start] * len(out.new_token_ids))
            finished += out.finished
    return token_times


def met(records: list[RequestRecord], slo: SLO) -> tuple[int, int]:
    """How many requests met the TTFT target, and how many the TPOT target."""
    ttft = sum(1 for r in records if r.ttft_s is not None and r.ttft_s <= slo.ttft_s)
    tpot = sum(1 for r in records if r.itl_mean_s is not None and r.itl_mean_s <= slo.itl_s)
    return ttft, tpot


def row(rate: float, name: str, s: RunSummary, ttft_met: int, tpot_met: int, mean_tpot: float, baseline: float) -> list[str]:
    ratio = f"{s.goodput / baseline:.2f}x" if baseline else "n/a"
    return [f"{rate:g}", name, f"{s.goodput:.3f} ({s.num_good}/{s.num_requests}; {ttft_met}, {tpot_met})", ratio, f"{s.throughput:.3f}",
            f"{s.ttft_p50 * 1e3:,.0f} / {s.ttft_p99 * 1e3:,.0f}", f"{mean_tpot * 1e3:,.0f}", f"{s.itl_p99 * 1e3:,.0f}"]


def main() -> None:
    on_workers_openmp()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the default model)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--request-rates", default="0.5,1,2")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--ttft-s", type=float, default=3.0)
    ap.add_argument("--tpot-s", type=float, default=0.15)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    policies = {"first come, first served": (None, None), "latency targets": (args.ttft_s, args.tpot_s)}
    engines = {
        name: LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, enable_prefix_caching=False, num_threads=args.threads,
                                     slo_ttft_s=ttft, slo_tpot_s=tpot))
        for name, (ttft, tpot) in policies.items()
    }
    vocab = next(iter(engines.values())).model_config.vocab_size
    workload = Workload("fixed", LengthDist("fixed", args.prompt_len), LengthDist("fixed", args.output_len), seed=args.seed)
    slo = SLO(args.ttft_s, args.tpot_s)
    rng = random.Random(args.seed)
    rows = []
    for rate in [float(r) for r in args.request_rates.split(",")]:
        specs = workload.requests(rate, args.num_prompts)
        prompts = [[rng.randrange(vocab) for _ in range(spec.prompt_len)] for spec in specs]
        baseline = None
        for name, engine in engines.items():
            replay(engine, prompts[:2], [0.0, 0.0], 4)  # warm-up: first-step costs and the step-cost estimates
            times = replay(engine, prompts, [spec.arrival_s for spec in specs], args.output_len)
            records = [record_from_token_times(spec, t) for spec, t in zip(specs, times)]
            summary = summarize(records, slo)
            baseline = summary.goodput if baseline is None else baseline
            mean_tpot = sum(r.itl_mean_s or 0.0 for r in records) / len(records)
            rows.append(row(rate, name, summary, *met(records, slo), mean_tpot, baseline))
            print(" | ".join(rows[-1]), flush=True)
    threads = args.threads or torch.get_num_threads()
    print("\n".join(machine_lines(threads)))
    print(f"- workload: {args.num_prompts} prompts x {args.prompt_len} tokens in, {args.output_len} out, Poisson arrivals; "
          f"SLO TTFT <= {args.ttft_s:g} s, TPOT <= {args.tpot_s * 1e3:g} ms\n")
    print(markdown_table(["req/s", "policy", "goodput req/s (good/all; TTFT met, TPOT met)", "vs FCFS", "served req/s", "TTFT p50 / p99 ms",
                          "TPOT mean ms", "ITL p99 ms"], rows))


if __name__ == "__main__":
    main()

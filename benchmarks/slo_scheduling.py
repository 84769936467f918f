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
import statistics
import time
from dataclasses import dataclass, field

from common import machine_lines, markdown_table, on_workers_openmp

from splitserve.engine.config import EngineConfig
from splitserve.engine.llm_engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams


@dataclass
class Trace:
    arrival: float
    token_times: list[float] = field(default_factory=list)

    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    def tpot(self) -> float:
        n = len(self.token_times)
        return (self.token_times[-1] - self.token_times[0]) / (n - 1) if n > 1 else 0.0


def arrivals(rate: float, n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def replay(engine: LLMEngine, prompts: list[list[int]], offsets: list[float], output_len: int) -> list[Trace]:
    """Adds each prompt at its arrival (between steps, stamped with its true arrival), steps until all finish."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    start = time.monotonic()
    traces = [Trace(start + off) for off in offsets]
    pending = 0
    finished = 0
    while finished < len(prompts):
        now = time.monotonic()
        while pending < len(prompts) and traces[pending].arrival <= now:
            engine.add_request(prompts[pending], params, str(pending), arrival_time=traces[pending].arrival)
            pending += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, traces[pending].arrival - now))
            continue
        for out in engine.step():
            stamp = time.monotonic()
            trace = traces[int(out.req_id)]
            trace.token_times.extend([stamp] * len(out.new_token_ids))
            finished += out.finished
    return traces


def summarize(traces: list[Trace], ttft_s: float, tpot_s: float) -> dict[str, float]:
    duration = max(t.token_times[-1] for t in traces) - min(t.arrival for t in traces)
    good = sum(1 for t in traces if t.ttft() <= ttft_s and t.tpot() <= tpot_s)
    gaps = sorted(b - a for t in traces for a, b in zip(t.token_times, t.token_times[1:]))
    ttfts = sorted(t.ttft() for t in traces)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {
        "goodput": good / duration, "served": len(traces) / duration, "good": good,
        "ttft_ok": sum(1 for t in traces if t.ttft() <= ttft_s), "tpot_ok": sum(1 for t in traces if t.tpot() <= tpot_s),
        "ttft_p50": statistics.median(ttfts), "ttft_p99": pct(ttfts, 0.99),
        "tpot_mean": statistics.mean(t.tpot() for t in traces), "itl_p99": pct(gaps, 0.99) if gaps else 0.0,
    }


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
    rng = random.Random(args.seed)
    rows = []
    for rate in [float(r) for r in args.request_rates.split(",")]:
        prompts = [[rng.randrange(vocab) for _ in range(args.prompt_len)] for _ in range(args.num_prompts)]
        offsets = arrivals(rate, args.num_prompts, args.seed + int(rate * 1000))
        baseline = None
        for name, engine in engines.items():
            replay(engine, prompts[:2], [0.0, 0.0], 4)  # warm-up: first-step costs and the step-cost estimates
            s = summarize(replay(engine, prompts, offsets, args.output_len), args.ttft_s, args.tpot_s)
            baseline = s["goodput"] if baseline is None else baseline
            ratio = f"{s['goodput'] / baseline:.2f}x" if baseline else "n/a"
            rows.append([f"{rate:g}", name, f"{s['goodput']:.3f} ({s['good']}/{args.num_prompts}; {s['ttft_ok']}, {s['tpot_ok']})", ratio, f"{s['served']:.3f}",
                         f"{s['ttft_p50'] * 1e3:,.0f} / {s['ttft_p99'] * 1e3:,.0f}", f"{s['tpot_mean'] * 1e3:,.0f}",
                         f"{s['itl_p99'] * 1e3:,.0f}"])
            print(" | ".join(rows[-1]), flush=True)
    threads = args.threads or __import__("torch").get_num_threads()
    print("\n".join(machine_lines(threads)))
    print(f"- workload: {args.num_prompts} prompts x {args.prompt_len} tokens in, {args.output_len} out, Poisson arrivals; "
          f"SLO TTFT <= {args.ttft_s:g} s, TPOT <= {args.tpot_s * 1e3:g} ms\n")
    print(markdown_table(["req/s", "policy", "goodput req/s (good/all; TTFT met, TPOT met)", "vs FCFS", "served req/s", "TTFT p50 / p99 ms",
                          "TPOT mean ms", "ITL p99 ms"], rows))


if __name__ == "__main__":
    main()

"""Decode step time from the main thread and from a worker thread, under GNU OpenMP and the workers' LLVM runtime.

A serving worker steps on ``AsyncEngine``'s thread; GNU OpenMP (torch's own) is slow
there when the team is as large as the CPUs (``engine/openmp.py``). This runs the
same engine steps both ways, in a fresh process per OpenMP runtime (a runtime is
chosen at process start), and prints the median step time of each.

    python benchmarks/step_thread.py                         # 1 x 200-token context, every CPU as threads
    python benchmarks/step_thread.py --batch 4 --context 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from common import machine_lines, markdown_table


def measure(threads: int, context: int, batch: int, steps: int) -> dict[str, float]:
    """Median decode step (ms) of ``batch`` greedy sequences, stepped from the main thread, then from a new thread."""
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.llm_engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(num_threads=threads, small_step_threads=threads, enable_prefix_caching=False))

    def decode_steps() -> float:
        for i in range(batch):
            engine.add_request(list(range(100, 100 + context)), SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True))
        times = []
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        return statistics.median(times[batch + 2 :]) * 1e3  # past the prefills

    result = {"main thread": decode_steps()}
    box: list[float] = []
    worker = threading.Thread(target=lambda: box.append(decode_steps()))
    worker.start()
    worker.join()
    result["worker thread"] = box[0]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per runtime, alternating")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.threads, args.context, args.batch, args.steps)))
        return
    from splitserve.engine.openmp import OPENMP_ENV_VAR, llvm_openmp_library, openmp_env

    library = llvm_openmp_library()
    runtimes = {"GNU (torch's own)": {OPENMP_ENV_VAR: "gnu"}}
    if library is not None:
        runtimes[f"LLVM ({os.path.basename(library)})"] = openmp_env(library, os.environ.get("LD_PRELOAD", ""))
    child = [sys.executable, __file__, "--child", *sys.argv[1:]]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in runtimes}
    for _ in range(args.repeats):
        for name, env in runtimes.items():
            out = subprocess.run(child, env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    rows = []
    for name, results in runs.items():
        for where in ("main thread", "worker thread"):
            values = [r[where] for r in results]
            rows.append([name, where, f"{statistics.median(values):.1f}", ", ".join(f"{v:.1f}" for v in values)])
    print("\n".join(machine_lines(args.threads, openmp=False)))
    print(f"- decode steps: batch {args.batch}, context {args.context}, {args.threads} threads; median of each process's steps\n")
    print(markdown_table(["OpenMP runtime", "stepped from", "step ms (median of runs)", "each run"], rows))


if __name__ == "__main__":
    main()

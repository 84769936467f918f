"""The batch scheduler's CPU per engine step with N streams decoding: ``schedule`` + ``advance`` of every chunk.

No model runs: this is the bookkeeping a decode worker pays on its step thread before and after each
forward pass, the part that must stay linear in the number of running sequences (a GPU decode worker
runs hundreds at once, with steps of ~10-30 ms). The table gives µs per step and per running
sequence at each N: a per-sequence figure that stays flat as N grows is linear scheduling; one that
grows with N is quadratic.

    python benchmarks/scheduler_step.py
    python benchmarks/scheduler_step.py --running 64,256,1024 --steps 200
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import command_line, machine_lines, markdown_table

from splitserve.engine.batch_scheduler import BatchScheduler
from splitserve.engine.block_pool import BlockPool
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.sequence import Sequence

BLOCK_SIZE = 16


def step_us(num_running: int, steps: int, rounds: int = 5) -> float:
    """Median over ``rounds`` of the mean µs per step, with ``num_running`` 16-token prompts decoding."""
    num_blocks = num_running * (1 + (16 + rounds * steps + 2) // BLOCK_SIZE + 1)
    sched = BatchScheduler(BlockPool(num_blocks, BLOCK_SIZE, True), max_num_batched_tokens=max(4096, num_running * 16), max_num_seqs=num_running)
    for i in range(num_running):
        prompt = [1000 * i + j for j in range(16)]
        sched.add(Sequence(req_id=f"r{i}", token_ids=prompt, num_prompt_tokens=16, params=SamplingParams(max_tokens=10**6)))

    def step() -> None:
        out = sched.schedule(time.monotonic())
        for chunk in out.chunks:
            sched.advance(chunk)
            if chunk.samples:
                chunk.seq.token_ids.append(7)

    step()  # the prefills: every sequence decodes from here on
    assert len(sched.running) == num_running and not sched.waiting
    per_round = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        per_round.append((time.perf_counter() - start) / steps * 1e6)
    return statistics.median(per_round)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--running", default="16,64,256,1024", help="running sequences per level, comma-separated")
    ap.add_argument("--steps", type=int, default=100, help="steps per round (5 rounds, median)")
    args = ap.parse_args()
    levels = [int(n) for n in args.running.split(",")]
    rows = []
    for n in levels:
        us = step_us(n, args.steps)
        rows.append([str(n), f"{us:,.0f}", f"{us / n:.2f}"])
    print("\n".join(machine_lines(1, openmp=False)))
    print(f"- command: `{command_line()}`\n")
    print(markdown_table(["running sequences", "µs per step", "µs per sequence"], rows))


if __name__ == "__main__":
    main()

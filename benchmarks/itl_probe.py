"""Inter-token latency of one streamed completion against a running server (no load beside it).

Sends a greedy ``/v1/completions`` stream (random prompt ids, ``ignore_eos``) and prints the median and
10th/90th percentile gap between streamed events after the first five (the decode step as a client sees it).

    python benchmarks/itl_probe.py --url http://127.0.0.1:8000 --prompt-len 200 --max-tokens 64
"""

from __future__ import annotations

import argparse
import random
import time

import httpx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    model = httpx.get(f"{args.url}/v1/models", timeout=30).json()["data"][0]["id"]
    rng = random.Random(1)
    for _ in range(args.repeats):
        body = {"model": model, "prompt": [rng.randrange(100, 40000) for _ in range(args.prompt_len)], "max_tokens": args.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True}
        stamps = []
        with httpx.Client(timeout=300) as client, client.stream("POST", f"{args.url}/v1/completions", json=body) as r:
            r.raise_for_status()
            stamps = [time.perf_counter() for line in r.iter_lines() if line.startswith("data: {")]
        gaps = sorted(b - a for a, b in zip(stamps[5:], stamps[6:]))
        pick = lambda q: gaps[min(len(gaps) - 1, int(q * len(gaps)))] * 1e3  # noqa: E731
        print(f"{len(stamps)} events, ITL p50 {pick(0.5):.1f} ms (p10 {pick(0.1):.1f}, p90 {pick(0.9):.1f})")


if __name__ == "__main__":
    main()

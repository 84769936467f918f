"""A workload that changes mid-run, served by a fixed split and by the SLA planner.

    python benchmarks/planner_phases.py [--model DIR] [--profile runs/tune/profile.json] [--out runs/planner]

Phase 1 is RAG traffic (long prompts, short answers), phase 2 chat traffic
(short prompts, long answers), back to back at fixed rates. Each system is
deployed in turn on one local Ray (so they never share the CPU), serves the
same requests (same lengths, same arrival times, same prompt tokens), and is
deleted:

* ``fixed``: 1 prefill + 1 decode replica;
* ``planner``: prefill 1..``--max-prefill`` and decode 1..``--max-decode`` replicas
  under the SLA planner, with the profile ``splitserve tune --profile-only``
  measured on this machine (``--profile`` to reuse one).

Per phase it prints goodput (requests/s meeting both SLOs) and SLO attainment;
the replicas per role over time go to ``OUT/replicas.png`` and everything to
``OUT/result.json``. A TTFT counted from the request's arrival includes any
queueing, as a user sees it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_lines, markdown_table  # noqa: E402

from splitserve.tune.loadgen import make_prompts, run_load_async  # noqa: E402
from splitserve.tune.workload import SLO, LengthDist, RequestSpec, Workload, summarize  # noqa: E402

RAG = Workload("rag", LengthDist("normal", 768, 64, 640, 896), LengthDist("normal", 16, 2, 12, 20), arrival="constant")
CHAT = Workload("chat", LengthDist("normal", 48, 8, 32, 64), LengthDist("normal", 96, 8, 80, 112), arrival="constant")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the default model)")
    ap.add_argument("--profile", default=None, help="planner profile; default: measure one with `splitserve tune --profile-only`")
    ap.add_argument("--out", default="runs/planner")
    ap.add_argument("--phase-s", type=float, default=90.0, help="seconds of each phase")
    ap.add_argument("--rag-rate", type=float, default=0.6)
    ap.add_argument("--chat-rate", type=float, default=1.5)
    ap.add_argument("--ttft-slo", type=float, default=3.0)
    ap.add_argument("--itl-slo", type=float, default=0.15)
    ap.add_argument("--interval-s", type=float, default=5.0, help="the planner's decision interval")
    ap.add_argument("--systems", default="fixed,planner")
    ap.add_argument("--max-prefill", type=int, default=2, help="the planner's prefill range is 1..this")
    ap.add_argument("--max-decode", type=int, default=1, help="the planner's decode range is 1..this (1: decode fixed)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def schedule(args: argparse.Namespace) -> tuple[list[RequestSpec], list[str]]:
    """Both phases' requests on one clock, and each request's phase."""
    rag = RAG.requests(args.rag_rate, max(1, int(args.phase_s * args.rag_rate)), seed=args.seed)
    chat = CHAT.requests(args.chat_rate, max(1, int(args.phase_s * args.chat_rate)), seed=args.seed + 1)
    specs = list(rag) + [RequestSpec(len(rag) + s.index, args.phase_s + s.arrival_s, s.prompt_len, s.output_len) for s in chat]
    return specs, ["rag"] * len(rag) + ["chat"] * len(chat)


def measure_profile(model: str | None, out: Path) -> Path:
    cmd = ["splitserve", "tune", "--profile-only", "--out", str(out)] + (["--model", model] if model else [])
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out / "profile.json"


def app_config(system: str, args: argparse.Namespace, model: str | None, profile: Path) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "mode": "disaggregated", "app_name": system, "drain_timeout_s": 60.0,
        "engine": {"model": model, "enable_prefix_caching": False},
        "prefill_resources": {"num_cpus": 1}, "decode_resources": {"num_cpus": 1},
    }
    if system == "planner":
        ranged = lambda hi: {"min": 1, "max": hi} if hi > 1 else 1  # noqa: E731
        cfg.update(num_prefill=ranged(args.max_prefill), num_decode=ranged(args.max_decode), planner={
            "ttft_slo_s": args.ttft_slo, "itl_slo_s": args.itl_slo, "profile": str(profile), "interval_s": args.interval_s,
            "predictor": "constant"})
    return cfg


def watch_replicas(url: str, stop: threading.Event, t0: float, out: list[dict[str, Any]]) -> None:
    while not stop.is_set():
        try:
            report = httpx.get(f"{url}/admin/workers", timeout=5).json()
            counts = {role: sum(1 for w in report["workers"] if w["role"] == role and w["healthy"]) for role in ("prefill", "decode")}
            out.append({"t": round(time.monotonic() - t0, 2), **counts, "planner": report.get("planner", {})})
        except (httpx.HTTPError, ValueError):
            pass
        stop.wait(1.0)


def run_system(system: str, args: argparse.Namespace, model: str | None, profile: Path, port: int,
               specs: list[RequestSpec], prompts: list[list[int]]) -> dict[str, Any]:
    from ray import serve

    from splitserve.app import build_app
    from splitserve.config import ServeConfig

    cfg = ServeConfig.model_validate(app_config(system, args, model, profile))
    t_deploy = time.monotonic()
    serve.run(build_app(cfg), name=system, route_prefix=f"/{system}")
    url = f"http://127.0.0.1:{port}/{system}"
    while httpx.get(f"{url}/health", timeout=10).json().get("status") != "ok":
        time.sleep(0.5)
    print(f"{system}: serving after {time.monotonic() - t_deploy:.0f} s", flush=True)
    served = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    replicas: list[dict[str, Any]] = []
    stop = threading.Event()
    t0 = time.monotonic()
    watcher = threading.Thread(target=watch_replicas, args=(url, stop, t0, replicas), daemon=True)
    watcher.start()
    records = asyncio.run(run_load_async(url, served, specs, prompts, request_timeout_s=300.0))
    stop.set()
    watcher.join()
    serve.delete(system)
    return {"records": records, "replicas": replicas}


def plot(results: dict[str, dict[str, Any]], phase_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(8, 2.6 * len(results)), sharex=True, squeeze=False)
    for ax, (system, res) in zip(axes[:, 0], results.items()):
        ts = [r["t"] for r in res["replicas"]]
        for role, style in (("prefill", "-"), ("decode", "--")):
            ax.step(ts, [r[role] for r in res["replicas"]], style, where="post", label=role)
        ax.axvline(phase_s, color="grey", lw=0.8)
        ax.set_ylabel("replicas")
        ax.set_ylim(0, 3)
        ax.set_title(f"{system}: RAG until {phase_s:.0f} s, then chat", fontsize=9)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    profile = Path(args.profile) if args.profile else measure_profile(args.model, out)
    specs, phases = schedule(args)
    from splitserve.engine.llm_engine import resolve_model_path
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(resolve_model_path(args.model)))
    prompts = make_prompts(specs, vocab, args.seed)
    slo = SLO(args.ttft_slo, args.itl_slo)

    import ray
    from ray import serve

    from splitserve.serve_cli import LOCAL_ENV

    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)
    # logical CPUs: up to 2 + 2 replicas of one CPU each, on however many cores this machine has
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = 8765
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = {}
    try:
        for system in args.systems.split(","):
            results[system] = run_system(system, args, args.model, profile, port, specs, prompts)
    finally:
        serve.shutdown()
        ray.shutdown()

    rows, dump = [], {}
    for system, res in results.items():
        dump[system] = {"replicas": res["replicas"], "phases": {}}
        for phase in ("rag", "chat"):
            recs = [r for r, p in zip(res["records"], phases) if p == phase]
            s = summarize(recs, slo)
            peak = {role: max((r[role] for r in res["replicas"] if (r["t"] < args.phase_s) == (phase == "rag")), default=0)
                    for role in ("prefill", "decode")}
            dump[system]["phases"][phase] = {**s.__dict__, "peak_replicas": peak}
            rows.append([system, phase, f"{s.goodput:.2f}", f"{s.attainment:.0%}", f"{(s.ttft_p50 or 0) * 1000:.0f}",
                         f"{(s.ttft_p90 or 0) * 1000:.0f}", f"{(s.itl_p90 or 0) * 1000:.0f}", f"{peak['prefill']}P{peak['decode']}D",
                         str(s.num_requests - s.num_completed)])
    plot(results, args.phase_s, out / "replicas.png")
    (out / "result.json").write_text(json.dumps(dump, indent=1, default=str))
    print("\n".join(machine_lines(1)))
    print(f"command: {command_line()}")
    print(f"SLO: {slo.describe()}; RAG {RAG.describe()} at {args.rag_rate} req/s, then chat {CHAT.describe()} at "
          f"{args.chat_rate} req/s, {args.phase_s:.0f} s each\n")
    print(markdown_table(["system", "phase", "goodput req/s", "SLO met", "TTFT p50 ms", "TTFT p90 ms", "ITL p90 ms",
                          "peak replicas", "failed"], rows))
    print(f"\nreplicas over time: {out / 'replicas.png'}")


if __name__ == "__main__":
    main()

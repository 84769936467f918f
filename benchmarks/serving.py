"""Serving benchmark: splitserve (disaggregated, aggregated) and optionally vLLM-CPU, one after the other.

Each server is started on the same checkpoint, driven by vLLM's own serving
benchmark client (``../shared/peer/vllm-cpu.sh bench``) with the same workload,
then stopped before the next one starts (two servers would share two cores).
Prints one table (TTFT and inter-token latency p50/p99, throughput, goodput at the
stated SLOs) with ratios against the aggregated baseline measured in the same run.

    python benchmarks/serving.py --peer-venv /tmp/peer/vllm --workload rag --request-rate 0.25 --num-prompts 16
    python benchmarks/serving.py --peer-venv /tmp/peer/vllm --systems splitserve-disagg,splitserve-agg,vllm-cpu --workload chat
    python benchmarks/serving.py --peer-venv /tmp/peer/vllm --systems splitserve-agg@256   # chunked prefill: 256 tokens per step

The vLLM venv comes from ``vllm-cpu.sh setup VENV`` (it is never imported here).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT.parent / "shared" / "peer" / "vllm-cpu.sh"

WORKLOADS = {
    # name: vLLM bench arguments
    "rag": ["--dataset-name", "random", "--random-input-len", "1024", "--random-output-len", "64"],
    "chat": ["--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "256"],
    "prefix": ["--dataset-name", "random", "--random-input-len", "256", "--random-output-len", "64", "--random-prefix-len", "768"],
}


def splitserve_cmd(system: str, model: str, port: int) -> list[str]:
    """``splitserve-disagg`` / ``splitserve-agg``, optionally ``@N``: a prefill token budget of N per step."""
    base = [sys.executable, "-m", "splitserve.cli", "serve", "--model", model, "--port", str(port)]
    system, _, budget = system.partition("@")
    if budget:
        base += ["--max-num-batched-tokens", budget]
    if system == "splitserve-disagg":
        return base + ["--mode", "disaggregated", "--prefill", "1", "--decode", "1", "--worker-cpus", "1"]
    if system == "splitserve-agg":
        return base + ["--mode", "aggregated", "--decode", "1", "--worker-cpus", "2"]
    raise ValueError(system)


def wait_health(port: int, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=3) as r:
                if r.status == 200:
                    return
        except Exception:
            pass
        time.sleep(1)
    raise TimeoutError(f"server on {port} not healthy after {timeout_s} s")


def start_server(system: str, model: str, port: int, peer_venv: str, log: Path) -> subprocess.Popen:
    out = open(log, "w")
    if system == "vllm-cpu":
        env = {**os.environ, "VLLM_ARGS": os.environ.get("VLLM_ARGS", "")}
        subprocess.run(["bash", str(PEER), "serve", peer_venv, model, str(port)], check=True, env=env, stdout=out, stderr=subprocess.STDOUT)
        return None  # vllm-cpu.sh backgrounds the server; stopped by port below
    proc = subprocess.Popen(splitserve_cmd(system, model, port), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_health(port, proc)
    return proc


def stop_server(system: str, proc: subprocess.Popen | None, port: int) -> None:
    if proc is not None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)
    else:
        subprocess.run(["bash", "-c", f"kill $(lsof -t -i :{port} -sTCP:LISTEN) 2>/dev/null || fuser -k {port}/tcp"], capture_output=True)
    time.sleep(3)


def run_bench(peer_venv: str, port: int, model: str, args: list[str], result: Path) -> dict:
    cmd = ["bash", str(PEER), "bench", peer_venv, f"http://127.0.0.1:{port}", model, *args,
           "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name]
    print("  $", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if not os.environ.get("BENCH_VERBOSE") else None)
    return json.loads(result.read_text())


def row(system: str, r: dict) -> dict:
    return {
        "system": system,
        "ttft_p50_ms": r.get("p50_ttft_ms", r.get("median_ttft_ms")),
        "ttft_p99_ms": r.get("p99_ttft_ms"),
        "itl_p50_ms": r.get("p50_itl_ms", r.get("median_itl_ms")),
        "itl_p99_ms": r.get("p99_itl_ms"),
        "req_per_s": r.get("request_throughput"),
        "out_tok_per_s": r.get("output_throughput"),
        "goodput_req_per_s": r.get("request_goodput"),
        "completed": r.get("completed"),
    }


def print_table(rows: list[dict], baseline: str) -> None:
    cols = ["system", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "req_per_s", "out_tok_per_s", "goodput_req_per_s", "completed"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    base = next((r for r in rows if r["system"] == baseline), None)
    if base:
        for r in rows:
            if r is base:
                continue
            ratios = {k: (r[k] / base[k]) if r[k] and base[k] else float("nan") for k in ("ttft_p99_ms", "itl_p99_ms", "itl_p50_ms", "req_per_s")}
            print(f"{r['system']} / {baseline}: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratios.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-venv", required=True, help="venv made by vllm-cpu.sh setup (holds vLLM's bench client)")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded small model)")
    ap.add_argument("--systems", default="splitserve-disagg,splitserve-agg")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="rag")
    ap.add_argument("--request-rate", type=float, default=0.25)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--goodput", default="ttft:5000 tpot:200", help="SLOs in ms for vLLM's --goodput")
    ap.add_argument("--seed", type=int, default=None, help="default: a new seed per run, so no run hits another's prefix cache")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--warmup-prompts", type=int, default=4)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT))
        from splitserve.engine.default_model import default_model_path

        model = str(default_model_path())
    systems = args.systems.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="splitserve-bench-"))
    rows = []
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    common = [*WORKLOADS[args.workload], "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
              "--goodput", *args.goodput.split()]
    for i, system in enumerate(systems):
        print(f"== {system}: starting", flush=True)
        proc = start_server(system, model, args.port, args.peer_venv, tmp / f"{system}.log")
        try:
            run_bench(args.peer_venv, args.port, model, [*common, "--num-prompts", str(args.warmup_prompts), "--request-rate", "inf",
                                                         "--seed", str(seed + 1000 + i)], tmp / f"{system}-warmup.json")
            res = run_bench(args.peer_venv, args.port, model, [*common, "--num-prompts", str(args.num_prompts),
                                                               "--request-rate", str(args.request_rate), "--seed", str(seed)], tmp / f"{system}.json")
            rows.append(row(system, res))
        finally:
            stop_server(system, proc, args.port)
    print(f"\nworkload={args.workload} rate={args.request_rate} req/s prompts={args.num_prompts} goodput SLO: {args.goodput} (ms) model={model}")
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}\n")
    print_table(rows, "splitserve-agg")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

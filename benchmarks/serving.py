"""Serving benchmark: splitserve (disaggregated, aggregated) and optionally vLLM-CPU, one after the other.

Each server is started on the same checkpoint, driven by vLLM's own serving
benchmark client (``../shared/peer/vllm-cpu.sh bench``) with the same workload at
each request rate, then stopped before the next one starts (two servers would share
two cores). Prints one table per rate (TTFT and inter-token latency p50/p99,
throughput, goodput at the stated SLOs) with ratios against a baseline measured in
the same run (vLLM-CPU when it is among the systems, else aggregated splitserve).

vLLM-CPU is served in its best dtype for the CPU (``--peer-dtype auto``: bfloat16
only where the CPU has AMX or avx512_bf16; bfloat16 is emulated, and several times
slower, elsewhere); prefix caching is off on every server unless the workload is
``prefix`` (reuse is then what is measured).

    python benchmarks/serving.py --peer-venv /tmp/peer/vllm --workload rag --request-rates 0.25,0.5,1,2 --num-prompts 16
    python benchmarks/serving.py --peer-venv /tmp/peer/vllm --systems splitserve-disagg,splitserve-agg,vllm-cpu --workload chat
    python benchmarks/serving.py --peer-venv /tmp/peer/vllm --systems splitserve-agg@256   # chunked prefill: 256 tokens per step

The vLLM venv comes from ``vllm-cpu.sh setup VENV`` (it is never imported here).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
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


FIXED_SPLIT_CONFIG = ROOT / "benchmarks" / "fixed_split.yaml"  # routing.slo_local_prefill off: the split never bends


def splitserve_cmd(system: str, model: str, port: int, prefix_caching: bool = True) -> list[str]:
    """``splitserve-default`` (what ``splitserve serve`` does with no mode: ``mode: auto``, aggregated on CPU workers),
    ``splitserve-disagg`` (fixed 1P1D) / ``splitserve-agg``, optionally ``@N``: a prefill token budget of N per step, then
    ``~M``: at most M prompt tokens in a step that also decodes (``splitserve-agg@1024~256``); a ``-fcfs`` suffix turns the
    workers' scheduling to the SLO off (``splitserve-agg-fcfs``)."""
    base = [sys.executable, "-m", "splitserve.cli", "serve", "--model", model, "--port", str(port)]
    if not prefix_caching:
        base.append("--no-prefix-caching")
    if system.endswith("-fcfs"):  # first come, first served: no scheduling to the SLO
        base.append("--no-slo-scheduling")
        system = system.removesuffix("-fcfs")
    system, _, beside = system.partition("~")
    if beside:
        base += ["--max-prefill-tokens-beside-decodes", beside]
    system, _, budget = system.partition("@")
    if budget:
        base += ["--max-num-batched-tokens", budget]
    if system == "splitserve-default":
        return base
    if system == "splitserve-disagg":
        return base + ["--config", str(FIXED_SPLIT_CONFIG), "--mode", "disaggregated", "--prefill", "1", "--decode", "1", "--worker-cpus", "1"]
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


def best_peer_dtype() -> str:
    """bfloat16 where the CPU computes it natively (AMX or avx512_bf16), else float32."""
    from common import cpu_flags

    flags = cpu_flags()
    return "bfloat16" if {"amx_bf16", "avx512_bf16"} & flags else "float32"


def wait_port_free(port: int, timeout_s: float = 120) -> None:
    """A server stopped just before (this run's or another's) may hold the port a while yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"port {port} is still taken after {timeout_s:.0f} s: stop what listens there or pass --port")
        time.sleep(1)


def start_server(system: str, model: str, port: int, peer_venv: str, log: Path, *, peer_dtype: str = "float32",
                 prefix_caching: bool = False) -> subprocess.Popen:
    wait_port_free(port)
    out = open(log, "w")
    if system == "vllm-cpu":
        vllm_args = f"--dtype {peer_dtype}" + ("" if prefix_caching else " --no-enable-prefix-caching")
        env = {**os.environ, "VLLM_ARGS": f"{vllm_args} {os.environ.get('VLLM_ARGS', '')}".strip()}
        subprocess.run(["bash", str(PEER), "serve", peer_venv, model, str(port)], check=True, env=env, stdout=out, stderr=subprocess.STDOUT)
        return None  # vllm-cpu.sh backgrounds the server; stopped by port below
    proc = subprocess.Popen(splitserve_cmd(system, model, port, prefix_caching), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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
        "itl_p999_ms": r.get("p99.9_itl_ms"),  # 32 prompts of 64 tokens: ~2,000 gaps, so p99 can miss a stall that p99.9 shows
        "req_per_s": r.get("request_throughput"),
        "out_tok_per_s": r.get("output_throughput"),
        "goodput_req_per_s": r.get("request_goodput"),
        "completed": r.get("completed"),
    }


def print_table(rows: list[dict], baseline: str) -> None:
    cols = ["system", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "itl_p999_ms", "req_per_s", "out_tok_per_s", "goodput_req_per_s", "completed"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    base = next((r for r in rows if r["system"] == baseline), None)
    if base:
        for r in rows:
            if r is base:
                continue
            keys = ("goodput_req_per_s", "ttft_p99_ms", "itl_p99_ms", "itl_p999_ms", "req_per_s")
            ratios = {k: (r[k] / base[k]) if r[k] and base[k] else float("nan") for k in keys}
            print(f"{r['system']} / {baseline}: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratios.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-venv", required=True, help="venv made by vllm-cpu.sh setup (holds vLLM's bench client)")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the embedded small model)")
    ap.add_argument("--systems", default="splitserve-disagg,splitserve-agg")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="rag")
    ap.add_argument("--request-rates", "--request-rate", default="0.25", help="comma-separated request rates (req/s), each measured")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--goodput", default="ttft:3000 tpot:150", help="SLOs in ms for vLLM's --goodput")
    ap.add_argument("--peer-dtype", default="auto", help="vLLM-CPU's dtype; auto: its best on this CPU (see best_peer_dtype)")
    ap.add_argument("--seed", type=int, default=None, help="default: a new seed per run, so no run hits another's prefix cache")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--warmup-prompts", type=int, default=4)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import cpu_flags, cpu_model

    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT))
        from splitserve.engine.default_model import default_model_path

        model = str(default_model_path())
    systems = args.systems.split(",")
    rates = [float(r) for r in args.request_rates.split(",")]
    peer_dtype = best_peer_dtype() if args.peer_dtype == "auto" else args.peer_dtype
    prefix_caching = args.workload == "prefix"
    tmp = Path(tempfile.mkdtemp(prefix="splitserve-bench-"))
    rows: dict[float, list[dict]] = {rate: [] for rate in rates}
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    common = [*WORKLOADS[args.workload], "--ignore-eos", "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99,99.9",
              "--goodput", *args.goodput.split()]
    for i, system in enumerate(systems):
        print(f"== {system}: starting", flush=True)
        proc = start_server(system, model, args.port, args.peer_venv, tmp / f"{system}.log", peer_dtype=peer_dtype, prefix_caching=prefix_caching)
        try:
            run_bench(args.peer_venv, args.port, model, [*common, "--num-prompts", str(args.warmup_prompts), "--request-rate", "inf",
                                                         "--seed", str(seed + 1000 + i)], tmp / f"{system}-warmup.json")
            for j, rate in enumerate(rates):  # a new seed per rate: no rate's prompts are another's
                res = run_bench(args.peer_venv, args.port, model, [*common, "--num-prompts", str(args.num_prompts),
                                                                   "--request-rate", str(rate), "--seed", str(seed + j)], tmp / f"{system}-{rate}.json")
                rows[rate].append(row(system, res))
        finally:
            stop_server(system, proc, args.port)
    flags = " ".join(sorted(f for f in cpu_flags() if f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")))
    print(f"\nworkload={args.workload} prompts={args.num_prompts} goodput SLO: {args.goodput} (ms) model={model}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, flags: {flags or 'none of amx/avx512'}; vLLM-CPU dtype {peer_dtype}; "
          f"prefix caching {'on' if prefix_caching else 'off'} everywhere")
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    baseline = "vllm-cpu" if "vllm-cpu" in systems else "splitserve-agg"
    for rate in rates:
        print(f"\n### {rate} req/s")
        print_table(rows[rate], baseline)
    if args.out:
        Path(args.out).write_text(json.dumps({str(k): v for k, v in rows.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

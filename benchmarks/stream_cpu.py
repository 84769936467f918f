"""CPU the serving stack spends per streamed token, per process role, from the processes' own counters.

Starts ``splitserve serve`` as a subprocess (as ``serving.py`` does; default disaggregated 1P1D on the
tiny random checkpoint, so the decode engine is cheap and the serving overhead shows), finds each Ray
actor's pid in the server's GCS actor table (class name -> role), then for each level keeps N greedy
streaming ``/v1/completions`` requests in flight (16-token prompts, ``ignore_eos``, ``max_tokens`` each)
for ``--seconds`` and reads ``psutil`` user+system CPU of every process of the server's tree before and
after. Tokens are the ``usage.completion_tokens`` of the streams (``stream_options.include_usage``).
Prints CPU-seconds per 1,000 streamed tokens per role, the sum outside the decode replica(s) and the
microseconds per token outside decode (also net of what the same wall time costs idle), then each role's
% of a core over an idle period. With two or more ``--max-tokens`` values it also splits each role's CPU
into a fixed cost per request and a cost per streamed token (a least-squares line through CPU per
request against tokens per request, at each number of streams): the per-token column is what one more
token costs, whatever the request's length (what a role spends per second whatever the traffic, e.g. idle
polling, lands in both, most at one stream). Other load on the machine changes the numbers: check the load averages.
The client (this process) is not counted; its own CPU is shown for reference.

    python benchmarks/stream_cpu.py --streams 1,16,64
    python benchmarks/stream_cpu.py --mode aggregated --streams 1,16,64 --json /tmp/stream_cpu_agg.json
    python benchmarks/stream_cpu.py --model /path/to/checkpoint --max-tokens 128 --seconds 30 --idle-s 20
    python benchmarks/stream_cpu.py --streams 64 --stream-interval 8
    python benchmarks/stream_cpu.py --streams 16,64 --max-tokens 64,256   # + per request vs per token
    python benchmarks/stream_cpu.py --local-prefill-budget-s 0   # every prompt through the prefill worker
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import psutil
from common import free_port, load_average, machine_lines, markdown_table
from serving import splitserve_cmd, wait_health

from splitserve.config import RoutingConfig

ROLES = ["proxy", "controller", "ingress", "prefill", "decode", "ray core", "ray other", "driver"]
# The GCS actor table of the server's cluster (the state API needs the dashboard's StateHead,
# which a splitserve server does not load): {pid: class name}. Run in a child so this process
# never joins the cluster.
LOOKUP = """import json, sys, ray
from splitserve.serve_cli import use_loopback_only
use_loopback_only()
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
from ray._private.state import actors
print(json.dumps({a["Pid"]: a["ActorClassName"] for a in actors().values() if a["State"] == "ALIVE"}))
"""


def actor_role(class_name: str) -> str | None:
    """``ProxyActor`` / ``ServeController`` / ``ServeReplica:<app>:<deployment>`` (or a process title holding one) -> role."""
    if "ProxyActor" in class_name:
        return "proxy"
    if "ServeController" in class_name:
        return "controller"
    if "ServeReplica:" in class_name:
        deployment = class_name.split("ServeReplica:", 1)[1].split(":")[1].split(".")[0]
        return {"Ingress": "ingress", "prefill": "prefill", "decode": "decode", "worker": "decode"}.get(deployment)
    return None


def _sid(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:
        return -1


def server_tree(server: subprocess.Popen) -> list[psutil.Process]:
    """The server and every process of its session: its local Ray (GCS, raylet, workers) inherits it."""
    return [p for p in psutil.process_iter() if _sid(p.pid) == server.pid]


def gcs_address(procs: list[psutil.Process]) -> str:
    return next(a.split("=", 1)[1] for p in procs for a in p.cmdline() if a.startswith("--gcs-address="))


def classify(server: subprocess.Popen) -> dict[int, str]:
    """pid -> role for every live process of the server's tree."""
    procs = server_tree(server)
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}  # a new local cluster turns token auth on
    try:
        out = subprocess.run([sys.executable, "-c", LOOKUP, gcs_address(procs)], env=env, capture_output=True, text=True, timeout=120, check=True)
        actors = {int(pid): name for pid, name in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    except Exception as e:  # fall back to Ray's process titles: "ray::ServeReplica:app:decode"
        print(f"(GCS actor lookup failed: {type(e).__name__}; using process titles)", flush=True)
        actors = {p.pid: p.cmdline()[0] for p in procs if p.cmdline() and p.cmdline()[0].startswith("ray::")}
    roles: dict[int, str] = {}
    for p in procs:
        if p.pid == server.pid:
            roles[p.pid] = "driver"  # `splitserve serve`: Ray's driver, which also prints every worker's log lines
        elif (role := actor_role(actors.get(p.pid, ""))) is not None:
            roles[p.pid] = role
        elif Path(p.cmdline()[0] if p.cmdline() else "").name in ("gcs_server", "raylet"):
            roles[p.pid] = "ray core"
        else:
            roles[p.pid] = "ray other"  # dashboard, agents, log monitor, autoscaler monitor, idle workers
    missing = {"proxy", "controller", "ingress", "decode"} - set(roles.values())
    if missing:
        raise RuntimeError(f"roles not found in the server's process tree: {sorted(missing)}")
    return roles


def snapshot(server: subprocess.Popen) -> dict[int, float]:
    """pid -> user+system CPU seconds (all threads) of every live process of the server's tree."""
    cpu: dict[int, float] = {}
    for p in server_tree(server):
        try:
            t = p.cpu_times()
            cpu[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return cpu


def role_cpu(before: dict[int, float], after: dict[int, float], roles: dict[int, str]) -> dict[str, float]:
    out = dict.fromkeys(ROLES, 0.0)
    for pid, t in after.items():
        out[roles.get(pid, "ray other")] += t - before.get(pid, 0.0)
    return out


async def one_stream(session: aiohttp.ClientSession, url: str, prompt: list[int], max_tokens: int) -> tuple[int, int]:
    """One streaming completion: (completion tokens from usage, content events received)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    tokens = events = 0
    async with session.post(url, json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("choices"):
                events += 1
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return tokens, events


async def drive(url: str, streams: int, seconds: float, max_tokens: int, vocab: int, seed: int) -> dict[str, int]:
    """Keep ``streams`` requests in flight for ``seconds`` (then let them finish); random 16-token prompts (no prefix hits)."""
    rng = random.Random(seed)
    totals = {"requests": 0, "tokens": 0, "events": 0, "short": 0}
    deadline = time.monotonic() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            tokens, events = await one_stream(session, url, [rng.randrange(10, vocab) for _ in range(16)], max_tokens)
            totals["requests"] += 1
            totals["tokens"] += tokens
            totals["events"] += events
            totals["short"] += tokens != max_tokens

    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=streams + 4), timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(streams)))
    return totals


def split_costs(rows: list[dict]) -> list[dict]:
    """Per number of streams with >= 2 output lengths: each role's CPU as ``per_request_s + per_token_s * tokens``
    (least squares over the levels' CPU per request against their tokens per request)."""
    out = []
    for n in sorted({r["streams"] for r in rows}):
        levels = [r for r in rows if r["streams"] == n and r["requests"]]
        if len({r["max_tokens"] for r in levels}) < 2:
            continue
        x = np.array([r["tokens"] / r["requests"] for r in levels])
        fit = {}
        for role in [*ROLES, "outside decode"]:
            y = np.array([(r["outside_cpu_s"] if role == "outside decode" else r["cpu_s"][role]) / r["requests"] for r in levels])
            per_token, per_request = np.polyfit(x, y, 1)
            fit[role] = (float(per_request), float(per_token))
        out.append({"streams": n, "max_tokens": sorted({r["max_tokens"] for r in levels}), "fit": fit})
    return out


def prefill_routes(port: int) -> dict[str, float]:
    """Requests routed so far by how they were prefilled: ``remote`` (a prefill worker, then a KV transfer) and
    ``local`` (on the worker that decodes them), from the server's ``splitserve_requests_routed_total``."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    counts = {"remote": 0.0, "local": 0.0}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "splitserve_requests_routed_total" and s.labels.get("role") in ("prefill", "local"):
                counts["remote" if s.labels["role"] == "prefill" else "local"] += s.value
    return counts


def stop(server: subprocess.Popen) -> None:
    """SIGTERM `splitserve serve` (it shuts Serve and its own local Ray down), then SIGKILL by pid what is left
    of its tree. Never `ray stop`: it would stop every Ray cluster on the machine."""
    procs = server_tree(server)
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=90)
    for p in psutil.wait_procs(procs, timeout=10)[1]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the cached tiny random checkpoint)")
    ap.add_argument("--mode", choices=["disaggregated", "aggregated"], default="disaggregated")
    ap.add_argument("--streams", default="1,16,64", help="concurrent streams per level, comma-separated")
    ap.add_argument("--max-tokens", default="64", help="output tokens per request, comma-separated (each with each --streams)")
    ap.add_argument("--seconds", type=float, default=20.0, help="load duration per level (in-flight streams then finish)")
    ap.add_argument("--idle-s", type=float, default=10.0, help="idle period measured after warm-up")
    ap.add_argument("--port", type=int, default=0, help="default: a free port")
    ap.add_argument("--json", default=None, help="write the numbers here")
    ap.add_argument("--stream-interval", type=int, default=None, help="the server's --stream-interval (default: its own, 1)")
    ap.add_argument("--local-prefill-budget-s", type=float, default=None,
                    help="the server's --local-prefill-budget-s (default: splitserve's default, although the fixed split's "
                    "config turns it off for serving.py; 0: every prompt through the prefill worker)")
    args = ap.parse_args()
    machine = machine_lines(1 if args.mode == "disaggregated" else 2)
    if args.model is None:
        from splitserve.engine.random_models import random_model_path

        args.model = str(random_model_path("tiny"))
    vocab = min(json.loads((Path(args.model) / "config.json").read_text()).get("vocab_size", 1000), 30000)
    port = args.port or free_port()
    levels = [(int(n), int(t)) for n in args.streams.split(",") for t in args.max_tokens.split(",")]
    url = f"http://127.0.0.1:{port}/v1/completions"
    log = Path(tempfile.mkdtemp(prefix="stream-cpu-")) / "server.log"
    system = "splitserve-disagg" if args.mode == "disaggregated" else "splitserve-agg"
    budget = RoutingConfig().local_prefill_budget_s if args.local_prefill_budget_s is None else args.local_prefill_budget_s
    print(f"starting {system} on port {port} (log {log})", flush=True)
    with open(log, "w") as out:
        cmd = splitserve_cmd(system, args.model, port) + ([] if args.stream_interval is None else ["--stream-interval", str(args.stream_interval)])
        if args.mode == "disaggregated":
            cmd += ["--local-prefill-budget-s", str(budget)]
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    me = psutil.Process()
    rows: list[dict] = []
    try:
        wait_health(port, server)
        roles = classify(server)
        print("roles: " + ", ".join(f"{r}={sorted(p for p, q in roles.items() if q == r)}" for r in ROLES if r in roles.values()), flush=True)
        asyncio.run(drive(url, min(4, max(n for n, _ in levels)), 3.0, levels[0][1], vocab, seed=0))  # warm-up
        time.sleep(2)
        before, t0 = snapshot(server), time.monotonic()
        time.sleep(args.idle_s)
        idle_wall = time.monotonic() - t0
        idle = {r: 100 * c / idle_wall for r, c in role_cpu(before, snapshot(server), roles).items()}
        for i, (n, max_tokens) in enumerate(levels):
            routes_before = prefill_routes(port)
            me_before, before, t0 = sum(me.cpu_times()[:2]), snapshot(server), time.monotonic()
            totals = asyncio.run(drive(url, n, args.seconds, max_tokens, vocab, seed=i + 1))
            after, wall, client = snapshot(server), time.monotonic() - t0, sum(me.cpu_times()[:2]) - me_before
            routes = {k: int(v - routes_before[k]) for k, v in prefill_routes(port).items()}
            cpu = role_cpu(before, after, roles)
            tok = max(totals["tokens"], 1)
            outside = sum(c for r, c in cpu.items() if r != "decode")
            net = outside - wall * sum(p for r, p in idle.items() if r != "decode") / 100  # less what idle costs over the same wall time
            rows.append({"streams": n, "max_tokens": max_tokens, **totals, "prefills": routes, "wall_s": wall, "outside_cpu_s": outside, "tok_per_s": totals["tokens"] / wall, "cpu_s": cpu,
                         "cpu_s_per_1k_tok": {r: 1000 * c / tok for r, c in cpu.items()}, "outside_decode_cpu_s_per_1k_tok": 1000 * outside / tok,
                         "outside_decode_us_per_tok": 1e6 * outside / tok, "outside_decode_net_of_idle_us_per_tok": 1e6 * net / tok,
                         "client_cpu_s_per_1k_tok": 1000 * client / tok, "total_cores_busy": sum(cpu.values()) / wall})
            print(f"level {n} x {max_tokens}: {totals['requests']} requests, {totals['tokens']} tokens ({totals['events']} events, "
                  f"{totals['short']} short streams) in {wall:.1f} s; prefilled {routes['remote']} remote, {routes['local']} local", flush=True)
    finally:
        stop(server)
    print("\n" + "\n".join(machine))
    print(f"- splitserve {args.mode} ({'1 prefill + 1 decode, --worker-cpus 1' if args.mode == 'disaggregated' else '1 aggregated, --worker-cpus 2'}), "
          f"model {args.model}; 16-token prompts, greedy, ignore_eos, max_tokens {args.max_tokens}, {args.seconds:.0f} s per level; "
          f"stream interval {args.stream_interval or 1}; "
          f"{f'local-prefill budget {budget:g} s; ' if args.mode == 'disaggregated' else ''}load average at end {load_average()}")
    print("\nCPU-seconds per 1,000 streamed tokens (user+system of each role's processes; 'outside' = all but decode):\n")
    header = ["streams", "max tokens", *ROLES, "outside decode", "µs/tok outside", "net of idle", "tok/s", "cores busy", "prefilled local / remote", "client (not counted)"]
    print(markdown_table(header, [[str(r["streams"]), str(r["max_tokens"]), *(f"{r['cpu_s_per_1k_tok'][k]:.3f}" for k in ROLES),
                                   f"{r['outside_decode_cpu_s_per_1k_tok']:.3f}", f"{r['outside_decode_us_per_tok']:.0f}", f"{r['outside_decode_net_of_idle_us_per_tok']:.0f}",
                                   f"{r['tok_per_s']:.0f}", f"{r['total_cores_busy']:.2f}",
                                   f"{r['prefills']['local']} / {r['prefills']['remote']}", f"{r['client_cpu_s_per_1k_tok']:.3f}"] for r in rows]))
    splits = split_costs(rows)
    if splits:
        print("\nEach role's CPU split into a fixed cost per request (ms) and a cost per streamed token (µs), fitted over "
              "the output lengths at each number of streams:\n")
        print(markdown_table(["streams", "fitted over", *(f"{r} ms/req, µs/tok" for r in [*ROLES, "outside decode"])],
                             [[str(f["streams"]), ",".join(map(str, f["max_tokens"])),
                               *(f"{1e3 * f['fit'][r][0]:.2f}, {1e6 * f['fit'][r][1]:.0f}" for r in [*ROLES, "outside decode"])] for f in splits]))
    print(f"\nidle ({idle_wall:.0f} s, no traffic), % of one core:\n")
    print(markdown_table(ROLES + ["total"], [[f"{idle[r]:.1f}" for r in ROLES] + [f"{sum(idle.values()):.1f}"]]))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "mode": args.mode, "model": args.model, "max_tokens": args.max_tokens,
                                               "stream_interval": args.stream_interval or 1, "split": splits,
                                               "seconds": args.seconds, "levels": rows, "idle_pct_core": idle, "idle_s": idle_wall}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

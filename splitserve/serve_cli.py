"""``splitserve serve``: start (or join) Ray, deploy the application, wait until it answers, serve until Ctrl-C.

A local server (no ``RAY_ADDRESS``) keeps its internals on the loopback interface:
Ray's GCS, raylet, object manager and workers bind 127.0.0.1 (``LOCAL_ENV``:
Ray's single-machine mode, which it uses on macOS and Windows), and UCX, which
carries the KV cache between workers, uses only the ``lo`` device, so NIXL
listens on 127.0.0.1 too. Only the HTTP port is meant to be reached (and only
on ``--host``). Joining a cluster changes nothing: its nodes must reach each other.

A local server also answers HTTP from the ingress replica itself (Serve's direct
ingress, ``direct_ingress_env``): the replica listens on the port, so a streamed
token skips the hop through Serve's HTTP proxy (which still runs, idle, on a free
port of its own). On a cluster the proxy serves the port as before.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import socket
import sys
import time
import urllib.request

logger = logging.getLogger(__name__)


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible server (the mode chosen from the hardware unless given)")
    p.add_argument("--config", default=None, help="splitserve YAML config (flags below override it)")
    p.add_argument("--model", default=None, help="HF checkpoint directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--mode", choices=["disaggregated", "aggregated", "auto"], default=None,
                   help="default: the config file's mode, else disaggregated when --prefill is given, else auto "
                   "(disaggregated on GPU workers, aggregated on CPU workers; see splitserve.config.choose_mode)")
    p.add_argument("--prefill", default=None, help="prefill replicas: a count (default 1) or a range to autoscale, e.g. 1:4")
    p.add_argument("--decode", default=None, help="decode (or aggregated) replicas: a count (default 1) or a range, e.g. 1:4")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("SPLITSERVE_API_KEY"),
                   help="require this bearer token (env SPLITSERVE_API_KEY; a flag shows in `ps`: prefer the env or --api-key-file)")
    p.add_argument("--api-key-file", default=None, help="read the bearer token from the first line of this file")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--worker-cpus", type=float, default=None, help="Ray CPU share per worker (default 1)")
    p.add_argument("--worker-gpus", type=float, default=None, help="GPUs per worker (GPU clusters)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-prefill-tokens-beside-decodes", type=int, default=None,
                   help="most prompt tokens in a step that also decodes: a new prompt stalls running streams by at most this chunk")
    p.add_argument("--no-slo-scheduling", dest="slo_scheduling", action="store_false", default=None,
                   help="first come, first served on every worker (default: schedule to slo.ttft_s and slo.tpot_s)")
    p.add_argument("--local-prefill-budget-s", type=float, default=None,
                   help="prompts the decode worker would prefill within this many seconds (measured) are prefilled there, "
                   "skipping the prefill worker and the KV transfer (default 0.02; 0: every prompt through a prefill worker)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false", default=None,
                   help="turn the workers' prefix caches off (for measurements that must not reuse prompts)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="batch-invariant numerics: a request's output does not depend on what runs beside it (slower)")
    p.add_argument("--stream-interval", type=int, default=None,
                   help="send streamed tokens every N tokens (the first at once); default 1: every token")
    p.add_argument("--response-cache", type=int, default=None, metavar="N",
                   help="keep the answers to N greedy or seeded requests and replay them for repeats (default 0: off)")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for the workers")
    p.set_defaults(func=run_serve)


def config_from_args(args: argparse.Namespace):
    from splitserve.config import ServeConfig, apply_overrides, read_yaml

    from_file = read_yaml(args.config) if args.config else {}
    mode = args.mode
    if mode is None and "mode" not in from_file:
        mode = "disaggregated" if args.prefill is not None else "auto"
    overrides = {
        "engine.model": args.model, "mode": mode, "num_prefill": _replicas(args.prefill), "num_decode": _replicas(args.decode),
        "http.host": args.host, "http.port": args.port, "http.served_model_name": args.served_model_name,
        "http.api_key": None if args.api_key_file else args.api_key, "http.api_key_file": args.api_key_file,
        "http.stream_interval": args.stream_interval, "response_cache.max_entries": getattr(args, "response_cache", None),
        "engine.dtype": args.dtype, "engine.max_num_batched_tokens": args.max_num_batched_tokens,
        "engine.max_prefill_tokens_beside_decodes": args.max_prefill_tokens_beside_decodes,
        "slo.schedule": getattr(args, "slo_scheduling", None), "routing.local_prefill_budget_s": getattr(args, "local_prefill_budget_s", None),
        "engine.kv_cache_memory_bytes": args.kv_cache_memory_bytes, "engine.deterministic": args.deterministic,
        "engine.enable_prefix_caching": getattr(args, "prefix_caching", None),
        "prefill_resources.num_cpus": args.worker_cpus, "decode_resources.num_cpus": args.worker_cpus,
        "prefill_resources.num_gpus": args.worker_gpus, "decode_resources.num_gpus": args.worker_gpus,
    }
    if args.mode == "aggregated" and args.prefill is None:
        overrides["num_prefill"] = 0
    return ServeConfig.model_validate(apply_overrides(from_file, overrides))


LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's node address becomes 127.0.0.1, and its servers bind there
    "UCX_NET_DEVICES": "lo",  # UCX (NIXL's transport) listens and connects on loopback only
}


# How Serve's own processes run, read by each from the environment Ray starts with (`use_loopback_only` sets these
# for a local Ray; ray_cluster.yaml's start commands for a cluster). Measured per streamed token
# (benchmarks/stream_cpu.py, docs/benchmarks.md): gRPC between replicas instead of one Ray object per streamed item (the proxy's calls to the ingress; the ingress
# asks for it per handle anyway, scheduler/directory.py) halved the CPU outside the engine; user code and the
# handles' router on the replica's own event loop instead of threads of their own took another quarter. The
# controller's loop every 0.25 s instead of 0.1 s (it still fetches the workers' load reports every
# routing.load_report_interval_s, rounded up to a loop) and Serve's cached metrics flushed every 1 s instead of 0.1 s
# (Prometheus scrapes them far less often): an idle 1P1D server's processes 16-17% -> 14-16% of a core, the controller
# 4.5% -> 2.8-3.3% (benchmarks/stream_cpu.py's idle table, docs/benchmarks.md).
SERVE_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.25",
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
}


def direct_ingress_env(port: int) -> dict[str, str]:
    """Serve's direct ingress for a local server's one ingress replica: its own HTTP server on ``port`` (the range
    Serve allocates replica ports from is that one port), no port quarantine and no drain period after it (they
    give an external load balancer time to notice a replica left; a restarted ingress takes the port back at once).
    Per streamed token at 64 streams this took the CPU outside the decode engine from 0.82-0.96 to ~0.36 ms and
    the tokens per second up ~1.8x (benchmarks/stream_cpu.py, docs/benchmarks.md)."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    }


def serves_directly() -> bool:
    """Whether this Ray's Serve answers HTTP from the ingress replica (``direct_ingress_env`` was set before Ray)."""
    return os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1" and "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT" in os.environ


def use_loopback_only() -> None:
    """Keep a local Ray and NIXL off the network (see the module docstring); an operator's own setting wins.

    The variables reach every process of the local Ray (raylet, workers), which
    inherit this one's environment; this process has imported Ray already, so
    its copy of the flag is set too.
    """
    for key, value in {**LOCAL_ENV, **SERVE_ENV}.items():  # SERVE_ENV: how the Serve processes this Ray starts run
        os.environ.setdefault(key, value)
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() in ("1", "true")


def _replicas(text: str | None):
    from splitserve.config import ReplicaRange

    if text is None:
        return None
    value = ReplicaRange.parse(text)
    return value.model_dump() if isinstance(value, ReplicaRange) else value


def start_ray(cfg) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    use_loopback_only()
    for key, value in direct_ingress_env(cfg.http.port).items():  # before Ray starts: every Serve process reads them
        os.environ.setdefault(key, value)
    need = cfg.max_replicas("prefill") * cfg.prefill_resources.num_cpus + cfg.max_replicas("decode") * cfg.decode_resources.num_cpus
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need + 0.999) + 1), include_dashboard=False, log_to_driver=True)


def deploy(cfg, ready_timeout_s: float = 600.0) -> str:
    """Deploy ``cfg`` on the connected Ray cluster; returns the base URL once /health reports every role healthy
    ("ok": a 200 alone could come from a proxy of an earlier deployment still answering on the port)."""
    from ray import serve

    from splitserve.app import build_app

    check_model(cfg)  # fail fast on a bad checkpoint; build the default one here before the workers race for it
    direct = serves_directly() and os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == str(cfg.http.port)
    serve.start(http_options={"host": cfg.http.host, "port": _free_port(cfg.http.host) if direct else cfg.http.port})
    serve.run(build_app(cfg), name=cfg.app_name, route_prefix="/", blocking=False)
    host = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "::") else cfg.http.host
    url = f"http://{host}:{cfg.http.port}"
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200 and json.loads(r.read() or b"{}").get("status") == "ok":
                    return url
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"splitserve did not become healthy within {ready_timeout_s:.0f} s (see the Ray logs)")


# Serve's ingress replica binds its port without SO_REUSEADDR, so the connections a server that just stopped
# closed (TIME_WAIT: 60 s on Linux) keep the port from it as surely as a live server does
PORT_WAIT_S = 70.0


def wait_for_port(host: str, port: int, wait_s: float = PORT_WAIT_S) -> None:
    """Return once ``host:port`` can be bound as Serve's ingress replica binds it (no SO_REUSEADDR). A port in use
    gets ``wait_s`` to come free (a server stopped a moment ago), then a ValueError naming it: otherwise Serve
    starts, its ingress replica fails to bind several times over, and the error is a page of tracebacks."""
    bind_host = "127.0.0.1" if host == "0.0.0.0" else host
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    deadline, said = time.monotonic() + wait_s, False
    while True:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((bind_host, port))
            return
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from e
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"port {port} on {host} is in use (by another server, or by the closed connections of one that "
                    f"stopped, which Linux keeps for 60 s); stop it, wait, or pass --port",
                ) from e
            if not said:
                print(f"port {port} on {host} is in use (a server that just stopped?); waiting up to {wait_s:.0f} s for it",
                      file=sys.stderr, flush=True)
                said = True
            time.sleep(0.5)


def _free_port(host: str) -> int:
    """A port nothing listens on now (for Serve's HTTP proxy, which the ingress replica's own server makes idle)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1" if host in ("0.0.0.0", "::") else host, 0))
        return s.getsockname()[1]


def check_model(cfg) -> None:
    """Refuse, with a ValueError naming the field, a checkpoint or context length the engine cannot run
    exactly (config and tensor shapes; no weights read). Builds the default model if it is missing."""
    from splitserve.engine.config import resolve_max_model_len
    from splitserve.engine.llm_engine import resolve_model_path
    from splitserve.engine.weights import inspect_checkpoint

    resolve_max_model_len(cfg.engine.max_model_len, inspect_checkpoint(resolve_model_path(cfg.engine.model)))


def _shown(replicas) -> str:
    return str(replicas) if isinstance(replicas, int) else f"{replicas.min}-{replicas.max} (autoscaled)"


def run_serve(args: argparse.Namespace) -> int:
    from ray import serve

    cfg = config_from_args(args)
    check_model(cfg)  # a clear error before Ray starts
    cfg.http.resolved_api_key()  # an unreadable or empty key file, too
    if not os.environ.get("RAY_ADDRESS"):  # a local server: its ingress replica will listen here
        wait_for_port(cfg.http.host, cfg.http.port)
    start_ray(cfg)
    url = deploy(cfg, args.ready_timeout)
    workers = f"{_shown(cfg.num_prefill)} prefill + {_shown(cfg.num_decode)} decode" if cfg.mode == "disaggregated" else f"{_shown(cfg.num_decode)} aggregated"
    why = f"; mode auto: {cfg.mode_reason}" if cfg.mode_reason else ""
    print(f"splitserve ready at {url}/v1 ({cfg.mode}: {workers} workers{why}); Ctrl-C to stop", flush=True)
    stop = {"flag": False}

    def _stop(*_: object) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop["flag"]:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    print("shutting down", file=sys.stderr, flush=True)
    serve.shutdown()
    import ray

    ray.shutdown()
    return 0

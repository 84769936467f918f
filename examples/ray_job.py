"""Deploy splitserve on a Ray cluster, run a workload against it over HTTP, report, clean up.

Meant for Ray job submission (the job's driver runs on the head node and ``ray.init()``
joins the cluster the job was submitted to):

    ray job submit --address http://HEAD:8265 --working-dir . \\
        --runtime-env-json '{"excludes": ["/.git/", "/splitserve/", "/engine/", "/kernels/", "/transfer/", "/prefill/", "/decode/", "/scheduler/"]}' \\
        -- python examples/ray_job.py --model /path/to/checkpoint --num-requests 32

The excludes keep the checkout's package folders out of the upload: Ray puts the working
directory first on PYTHONPATH (for the driver and for every Serve replica), and there the
source folder ``splitserve/`` would shadow the installed package, which is laid out
differently (``engine/`` installs as ``splitserve.engine``, ...). splitserve itself must be
installed on every node (ray_cluster.yaml does it).

On the cluster of ray_cluster.yaml, ``--config examples/cluster_serve_config.yaml`` places
the workers on the prefill and decode nodes (the file's ``args`` and HTTP port; Serve's
per-deployment overrides in it apply only to ``serve deploy``).

Outside a job it runs too: ``python examples/ray_job.py`` joins the cluster in RAY_ADDRESS
(or the one ``ray start`` made on this machine), else starts a local Ray.

Output: one line per request, then ``RESULTS ok=N failed=M ...``; exit status 0 when every
request succeeded. The application is deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import time

PROMPTS = [
    "The history of the printing press begins",
    "Tides are caused by",
    "A short guide to sourdough bread:",
    "Honeybees communicate by",
    "Volcanoes form where",
    "The Silk Road connected",
    "Photosynthesis converts",
    "Jazz music started in",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="splitserve YAML or Serve config file such as examples/cluster_serve_config.yaml "
                   "(relative to the job's working dir); the flags below override it")
    p.add_argument("--model", default=None, help="HF checkpoint directory, present on every node (default: the embedded model)")
    p.add_argument("--mode", choices=["disaggregated", "aggregated"], default=None)
    p.add_argument("--num-prefill", type=int, default=None)
    p.add_argument("--num-decode", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV blocks per worker (default: a fraction of free memory)")
    p.add_argument("--worker-cpus", type=float, default=None, help="Ray CPU share per worker")
    p.add_argument("--worker-gpus", type=float, default=None, help="GPUs per worker (1 on GPU clusters)")
    p.add_argument("--host", default=None, help="HTTP bind address of the Serve proxies (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port of the Serve proxies (default 8000)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--app-name", default=None, help="Serve application name (default splitserve)")
    p.add_argument("--num-requests", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for every worker")
    p.add_argument("--keep", action="store_true", help="leave the application running")
    return p.parse_args(argv)


def load_base_config(path: str | None):
    """A splitserve YAML, or a Ray Serve config file (its first application's ``args`` and
    ``http_options``), as a ServeConfig."""
    import yaml

    from splitserve.config import ServeConfig

    if not path:
        return ServeConfig()
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not (isinstance(data, dict) and "applications" in data):
        return ServeConfig.from_yaml(path)
    args = dict(data["applications"][0].get("args") or {})
    http = {k: v for k, v in (data.get("http_options") or {}).items() if k in ("host", "port")}
    args["http"] = {**http, **(args.get("http") or {})}
    args.pop("config_file", None)
    return ServeConfig.model_validate(args)


def build_config(args: argparse.Namespace):
    base = load_base_config(args.config)
    overrides = {
        "engine.model": args.model, "mode": args.mode, "num_prefill": args.num_prefill, "num_decode": args.num_decode,
        "engine.dtype": args.dtype, "engine.num_kv_blocks": args.num_kv_blocks,
        "prefill_resources.num_cpus": args.worker_cpus, "decode_resources.num_cpus": args.worker_cpus,
        "prefill_resources.num_gpus": args.worker_gpus, "decode_resources.num_gpus": args.worker_gpus,
        "http.host": args.host, "http.port": args.port, "http.api_key": args.api_key, "app_name": args.app_name,
    }
    if args.mode == "aggregated" and args.num_prefill is None:
        overrides["num_prefill"] = 0
    return base.with_overrides(overrides)


async def run_workload(url: str, args: argparse.Namespace) -> list[dict]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=args.request_timeout) as client:
        r = await client.get("/v1/models")
        r.raise_for_status()
        model = r.json()["data"][0]["id"]
        sem = asyncio.Semaphore(max(1, args.concurrency))

        async def one(i: int) -> dict:
            body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens, "temperature": 0}
            async with sem:
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/completions", json=body)
                    latency = time.perf_counter() - t0
                    if r.status_code != 200:
                        return {"i": i, "ok": False, "status": r.status_code, "latency": latency, "error": r.text[:200]}
                    data = r.json()
                    choice = data["choices"][0]
                    usage = data.get("usage") or {}
                    return {
                        "i": i, "ok": bool(choice.get("text")), "status": 200, "latency": latency, "text": choice.get("text", ""),
                        "finish": choice.get("finish_reason"), "prompt_tokens": usage.get("prompt_tokens", 0),
                        "completion_tokens": usage.get("completion_tokens", 0), "error": None if choice.get("text") else "empty text",
                    }
                except Exception as e:  # noqa: BLE001 - every failure is reported, the workload goes on
                    return {"i": i, "ok": False, "status": None, "latency": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}"}

        return await asyncio.gather(*(one(i) for i in range(args.num_requests)))


def report(results: list[dict], elapsed: float, args: argparse.Namespace) -> bool:
    for r in sorted(results, key=lambda r: r["i"]):
        if r["ok"]:
            print(f"request {r['i']}: ok status=200 latency_s={r['latency']:.3f} prompt_tokens={r['prompt_tokens']} "
                  f"completion_tokens={r['completion_tokens']} finish={r['finish']} text={r['text'][:60]!r}", flush=True)
        else:
            print(f"request {r['i']}: FAILED status={r['status']} latency_s={r['latency']:.3f} error={r['error']!r}", flush=True)
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["completion_tokens"] for r in ok)
    mean_lat = sum(r["latency"] for r in ok) / len(ok) if ok else float("nan")
    print(f"RESULTS ok={len(ok)} failed={len(results) - len(ok)} requests={len(results)} concurrency={args.concurrency} "
          f"completion_tokens={tokens} elapsed_s={elapsed:.2f} req_per_s={len(ok) / elapsed if elapsed > 0 else 0:.2f} "
          f"mean_latency_s={mean_lat:.3f}", flush=True)
    return len(ok) == len(results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("splitserve") is None or importlib.util.find_spec("splitserve.engine") is None:
        print("splitserve is not importable as an installed package here: install it on every node, and keep the "
              "checkout's package folders out of the job's working dir (see this file's docstring)", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from splitserve.serve_cli import deploy

    cfg = build_config(args)
    ray.init()  # inside a Ray job: the job's cluster (RAY_ADDRESS is set for the driver)
    workers = f"{cfg.num_prefill_workers} prefill + {cfg.num_decode} decode" if cfg.mode == "disaggregated" else f"{cfg.num_decode} aggregated"
    print(f"deploying {cfg.app_name!r} ({cfg.mode}: {workers} workers, model={cfg.engine.model or 'default'})", flush=True)
    t0 = time.perf_counter()
    ok = False
    try:
        url = deploy(cfg, ready_timeout_s=args.ready_timeout)
        print(f"ready at {url}/v1 after {time.perf_counter() - t0:.1f} s", flush=True)
        t1 = time.perf_counter()
        results = asyncio.run(run_workload(url, args))
        ok = report(results, time.perf_counter() - t1, args)
    finally:
        if not args.keep:
            try:
                serve.delete(cfg.app_name)
                print(f"deleted application {cfg.app_name!r}", flush=True)
            except Exception as e:  # noqa: BLE001 - report, keep the original error
                print(f"could not delete application {cfg.app_name!r}: {e}", file=sys.stderr, flush=True)
        ray.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

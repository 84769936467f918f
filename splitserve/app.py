"""The Ray Serve application: P prefill + D decode deployments (or D aggregated ones) and the ingress.

    from splitserve.app import build_app
    serve.run(build_app(ServeConfig(num_prefill=2, num_decode=1)), route_prefix="/")

or from a Serve config file / the Serve CLI (``args`` are a ``ServeConfig``):

    serve run splitserve.app:app_builder num_prefill=1 num_decode=1
    applications: [{name: splitserve, route_prefix: /, import_path: "splitserve.app:app_builder", args: {...}}]

Each worker is its own single-replica deployment (``prefill-0``, ``decode-0``,
...) so the scheduler can pick exactly which worker serves which request.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from splitserve.config import ServeConfig, WorkerResources
from splitserve.decode.deployment import DecodeDeployment
from splitserve.engine.llm_engine import resolve_model_path
from splitserve.ingress import IngressCore, build_http_app
from splitserve.prefill.deployment import PrefillDeployment


@serve.ingress()
class Ingress:
    """HTTP ingress replica: builds the FastAPI app around the worker handles it was bound with."""

    def __init__(self, config: dict[str, Any], prefill: dict[str, Any], decode: dict[str, Any]):
        cfg = ServeConfig.model_validate(config)
        self.core = IngressCore(cfg, resolve_model_path(cfg.engine.model), prefill, decode)

    def __serve_build_asgi_app__(self):
        return build_http_app(self.core)


IngressDeployment = serve.deployment(Ingress, name="Ingress", max_ongoing_requests=8192)


def _actor_options(res: WorkerResources, num_threads: int | None) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.resources:
        opts["resources"] = dict(res.resources)
    env = dict(res.runtime_env)
    threads = num_threads or max(1, int(res.num_cpus))
    env.setdefault("env_vars", {}).setdefault("OMP_NUM_THREADS", str(threads))
    opts["runtime_env"] = env
    return opts


def worker_ids(cfg: ServeConfig) -> tuple[list[str], list[str]]:
    prefix = "worker" if cfg.mode == "aggregated" else "decode"
    return [f"prefill-{i}" for i in range(cfg.num_prefill_workers)], [f"{prefix}-{i}" for i in range(cfg.num_decode)]


def worker_options(cfg: ServeConfig) -> dict[str, Any]:
    """The ``WorkerOptions`` fields every worker gets from the config."""
    return {
        "transfer_timeout_s": cfg.transfer_timeout_s,
        "kv_wait_timeout_s": cfg.kv_wait_timeout_s,
        "reservation_ttl_s": cfg.reservation_ttl_seconds,
        "prefix_report_max_blocks": cfg.routing.prefix_report_max_blocks,
        "fail_fraction": cfg.faults.fail_fraction,
        "delay_fraction": cfg.faults.delay_fraction,
        "delay_s": cfg.faults.delay_s,
        "fault_seed": cfg.faults.seed,
    }


def build_app(cfg: ServeConfig) -> Application:
    engine = cfg.engine.model_dump()
    options = worker_options(cfg)
    prefill_ids, decode_ids = worker_ids(cfg)
    p_opts = _actor_options(cfg.prefill_resources, cfg.engine.num_threads)
    d_opts = _actor_options(cfg.decode_resources, cfg.engine.num_threads)
    if engine.get("num_threads") is None:
        engine_p = {**engine, "num_threads": int(p_opts["runtime_env"]["env_vars"]["OMP_NUM_THREADS"])}
        engine_d = {**engine, "num_threads": int(d_opts["runtime_env"]["env_vars"]["OMP_NUM_THREADS"])}
    else:
        engine_p = engine_d = engine
    role = "both" if cfg.mode == "aggregated" else "decode"
    prefill = {
        wid: PrefillDeployment.options(name=wid, ray_actor_options=p_opts).bind(wid, engine_p, options) for wid in prefill_ids
    }
    decode = {
        wid: DecodeDeployment.options(name=wid, ray_actor_options=d_opts).bind(wid, engine_d, options, role=role) for wid in decode_ids
    }
    return IngressDeployment.options(ray_actor_options={"num_cpus": 0}).bind(cfg.model_dump(), prefill, decode)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for ``serve run`` / Serve config files: ``args`` is a ServeConfig mapping,
    optionally with ``config_file`` (a splitserve YAML) whose values the other args override."""
    args = dict(args or {})
    config_file = args.pop("config_file", None)
    base = ServeConfig.from_yaml(config_file) if config_file else ServeConfig()
    flat = {k: v for k, v in args.items() if not isinstance(v, dict)}
    nested = {f"{k}.{kk}": vv for k, v in args.items() if isinstance(v, dict) for kk, vv in v.items()}
    coerced = {k: _coerce(v) for k, v in {**flat, **nested}.items()}
    return build_app(base.with_overrides(coerced))


def _coerce(value: Any) -> Any:
    """``serve run`` passes key=value args as strings: let pydantic parse numbers and bools."""
    if isinstance(value, str):
        low = value.lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
    return value

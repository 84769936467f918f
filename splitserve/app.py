"""The Ray Serve application: a ``prefill`` and a ``decode`` deployment of N replicas each (or one
``worker`` deployment of aggregated replicas), and the ingress.

    from splitserve.app import build_app
    serve.run(build_app(ServeConfig(num_prefill=2, num_decode=1)), route_prefix="/")

or from a Serve config file / the Serve CLI (``args`` are a ``ServeConfig``):

    serve run splitserve.app:app_builder num_prefill=1 num_decode=1
    applications: [{name: splitserve, route_prefix: /, import_path: "splitserve.app:app_builder", args: {...}}]

A role's replicas are a fixed count or an autoscaling range: Serve's own policy on
in-flight requests, or the SLA planner (``planner:``) when configured. Each worker
deployment carries ``PinnedReplicaRouter``: the pairing policy in the ingress picks
the replicas, the router sends each call to the one named, and publishes the live
replicas with their load to the ingress (``ServeDirectory``). A replica being
removed gets no new requests and drains its streams for ``drain_timeout_s``.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from splitserve.config import ServeConfig, WorkerResources, apply_overrides, read_yaml
from splitserve.decode.deployment import DecodeDeployment
from splitserve.engine.llm_engine import resolve_model_path
from splitserve.engine.openmp import llvm_openmp_library, openmp_env
from splitserve.ingress import IngressCore, build_http_app
from splitserve.prefill.deployment import PrefillDeployment
from splitserve.scheduler.directory import ServeDirectory

# Ray starts its worker processes at nice 15 (below Ray's own daemons); the processes on the token's path (the
# engines, the ingress) run at the normal priority instead, or any process at nice 0 on the host (a client, a
# log shipper) takes their cores first: every step's fork/join then waits for a thread that is not running.
ON_TOKEN_PATH_ENV = {"RAY_worker_niceness": "0"}


def engine_openmp_env(env_vars: dict[str, str]) -> dict[str, str]:
    """The engines' OpenMP runtime (``engine.openmp``): LLVM's where one is installed, looked up where the app is
    built (a cluster's nodes share that image and path); an operator's ``LD_PRELOAD`` in the worker env follows it."""
    return openmp_env(llvm_openmp_library(), env_vars.get("LD_PRELOAD", ""))


# Serve's own autoscaling target per replica when a role has a range and no planner: a decode replica
# batches its streams (each is one in-flight request), a prefill replica works through few prompts at once.
TARGET_ONGOING = {"prefill": 2, "decode": 32}


@serve.ingress()
class Ingress:
    """HTTP ingress replica: builds the FastAPI app around the worker deployments' handles."""

    def __init__(self, config: dict[str, Any], workers: dict[str, Any]):
        cfg = ServeConfig.model_validate(config)
        directory = ServeDirectory(workers, serve.get_replica_context().app_name)
        self.core = IngressCore(cfg, resolve_model_path(cfg.engine.model), directory)

    def __serve_build_asgi_app__(self):
        return build_http_app(self.core)


IngressDeployment = serve.deployment(Ingress, name="Ingress", max_ongoing_requests=8192)


def _actor_options(res: WorkerResources, num_threads: int | None) -> dict[str, Any]:
    opts: dict[str, Any] = {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus}
    if res.resources:
        opts["resources"] = dict(res.resources)
    env = dict(res.runtime_env)
    threads = num_threads or max(1, int(res.num_cpus))
    env_vars = env["env_vars"] = dict(env.get("env_vars") or {})  # a copy: the config's own dict stays as it was
    env_vars.setdefault("OMP_NUM_THREADS", str(threads))
    for key, value in ON_TOKEN_PATH_ENV.items():
        env_vars.setdefault(key, value)
    for key, value in engine_openmp_env(env_vars).items():
        if key == "LD_PRELOAD" or key not in env_vars:  # the runtime goes first in an operator's own preload list
            env_vars[key] = value
    opts["runtime_env"] = env
    return opts


def worker_options(cfg: ServeConfig) -> dict[str, Any]:
    """The ``WorkerOptions`` fields every worker gets from the config."""
    return {
        "transfer_timeout_s": cfg.transfer_timeout_s,
        "warm_up_prompt_tokens": cfg.warm_up_prompt_tokens,
        "kv_wait_timeout_s": cfg.kv_wait_timeout_seconds,
        "reservation_ttl_s": cfg.reservation_ttl_seconds,
        "prefix_report_max_blocks": cfg.routing.prefix_report_max_blocks,
        "fail_fraction": cfg.faults.fail_fraction,
        "delay_fraction": cfg.faults.delay_fraction,
        "delay_s": cfg.faults.delay_s,
        "fault_seed": cfg.faults.seed,
        # three planner intervals: long enough for a steady rate, short enough to see a step within seconds
        "meter_window_s": min(30.0, max(3.0, 3 * cfg.planner.interval_s)) if cfg.planner is not None else 30.0,
    }


def scaling_options(cfg: ServeConfig, role: str) -> dict[str, Any]:
    """``num_replicas``, or an ``autoscaling_config`` (Serve's policy, or the SLA planner's) for ``role``."""
    replicas = cfg.replicas(role)
    if isinstance(replicas, int):
        return {"num_replicas": replicas}
    autoscaling: dict[str, Any] = {
        "min_replicas": replicas.min, "max_replicas": replicas.max, "initial_replicas": replicas.start,
        "target_ongoing_requests": TARGET_ONGOING[role],
    }
    if cfg.planner is not None:
        from splitserve.planner_policy import planner_autoscaling

        autoscaling.update(planner_autoscaling(cfg, role))
    return {"autoscaling_config": autoscaling}


def _role(cls: Any, name: str, cfg: ServeConfig, scaled_as: str, res: WorkerResources, engine: dict[str, Any], **kwargs: Any) -> Any:
    """The deployment ``name`` of ``cls``; ``scaled_as``: the role whose replica count and policy it takes."""
    opts = _actor_options(res, cfg.engine.num_threads)
    if cfg.planner is not None:  # replicas push their measurements often enough for the planner's interval
        from splitserve.planner_policy import METRIC_PUSH_ENV, metric_push_interval_s

        opts["runtime_env"]["env_vars"][METRIC_PUSH_ENV] = str(metric_push_interval_s(cfg.planner.interval_s))
    if engine.get("num_threads") is None:
        engine = {**engine, "num_threads": int(opts["runtime_env"]["env_vars"]["OMP_NUM_THREADS"])}
    router = RequestRouterConfig(
        request_router_class="splitserve.serve_router:PinnedReplicaRouter", request_routing_stats_period_s=cfg.routing.load_report_interval_s,
    )
    return cls.options(
        name=name, ray_actor_options=opts, request_router_config=router, graceful_shutdown_timeout_s=cfg.drain_timeout_s,
        **scaling_options(cfg, scaled_as),
    ).bind(engine, worker_options(cfg), **kwargs)


def build_app(cfg: ServeConfig) -> Application:
    engine = cfg.engine.model_dump()
    if cfg.mode == "aggregated":
        workers = {"worker": _role(DecodeDeployment, "worker", cfg, "decode", cfg.decode_resources, engine, role="both")}
    else:
        workers = {
            "prefill": _role(PrefillDeployment, "prefill", cfg, "prefill", cfg.prefill_resources, engine),
            "decode": _role(DecodeDeployment, "decode", cfg, "decode", cfg.decode_resources, engine),
        }
    ingress_options = {"num_cpus": 0, "runtime_env": {"env_vars": dict(ON_TOKEN_PATH_ENV)}}
    return IngressDeployment.options(ray_actor_options=ingress_options).bind(cfg.model_dump(), workers)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for ``serve run`` / Serve config files: ``args`` is a ServeConfig mapping,
    optionally with ``config_file`` (a splitserve YAML) whose values the other args override."""
    args = dict(args or {})
    config_file = args.pop("config_file", None)
    base = read_yaml(config_file) if config_file else {}
    flat = {k: v for k, v in args.items() if not isinstance(v, dict)}
    nested = {f"{k}.{kk}": vv for k, v in args.items() if isinstance(v, dict) for kk, vv in v.items()}
    coerced = {k: _coerce(v) for k, v in {**flat, **nested}.items()}
    return build_app(ServeConfig.model_validate(apply_overrides(base, coerced)))  # validated once: mode auto sees the overrides


def _coerce(value: Any) -> Any:
    """``serve run`` passes key=value args as strings: let pydantic parse numbers and bools."""
    if isinstance(value, str):
        low = value.lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
    return value

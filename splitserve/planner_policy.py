"""The SLA planner as the worker deployments' Serve autoscaling policy (the thin glue; the decision is
``splitserve.tune.sla_planner.plan_role``, pure).

Each role's deployment gets ``RolePlanner`` as its policy, built once in Serve's
controller with the planner settings, the role's replica range and the profile's
contents (the controller may run on another node than the one holding the file).
Serve calls it every control-loop tick with the replicas' own measurements
(``record_autoscaling_stats``: ``splitserve.worker_metrics``, averaged by Serve
over the look-back window). Every ``interval_s`` it turns them into an
``Observation`` (arrival rate summed over replicas, mean lengths, the worst
replica's p90 latency), keeps a short history for the load predictor, asks
``plan_role`` and returns the count. Until every running replica has reported,
it holds the current target: a fresh replica's empty window would read as no load.

Each decision is also written to Ray's internal key-value store, so the ingress
can show it (``/admin/workers``, ``splitserve_planner_desired_replicas{role}``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from typing import Any

from splitserve.config import ReplicaRange, ServeConfig
from splitserve.tune.curves import Profiles
from splitserve.tune.sla_planner import Observation, PlannerConfig, plan_role

logger = logging.getLogger(__name__)

HISTORY = 30  # intervals kept for the load predictor
METRIC_PUSH_ENV = "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"


def planner_autoscaling(cfg: ServeConfig, role: str) -> dict[str, Any]:
    """The ``autoscaling_config`` entries that make the planner ``role``'s policy (no Serve delays: it has its own)."""
    import pathlib

    assert cfg.planner is not None
    replicas = cfg.replicas(role)
    assert isinstance(replicas, ReplicaRange)
    profile = json.loads(pathlib.Path(cfg.planner.profile).read_text())
    kwargs = {"role": role, "planner": cfg.planner.model_dump(), "profile": profile, "min_replicas": replicas.min,
              "max_replicas": replicas.max, "app_name": cfg.app_name}
    push_s = metric_push_interval_s(cfg.planner.interval_s)
    return {
        "policy": {"policy_function": "splitserve.planner_policy:RolePlanner", "policy_kwargs": kwargs},
        "upscale_delay_s": 0.0, "downscale_delay_s": 0.0,
        "metrics_interval_s": push_s, "look_back_period_s": max(cfg.planner.interval_s, 2 * push_s),
    }


def metric_push_interval_s(interval_s: float) -> float:
    """How often replicas push their measurements: four times per planner interval, at most twice a second."""
    return max(0.5, interval_s / 4)


def observation(role: str, metrics: dict[str, dict[Any, float]], num_prefill: int, num_decode: int) -> Observation | None:
    """One interval's ``Observation`` from Serve's per-replica averages; None while a replica has not reported."""
    rates = metrics.get("arrivals_per_s", {})
    if not rates:
        return None
    replicas = list(rates)

    def mean_of(name: str) -> float:
        values = [(metrics.get(name, {}).get(r, -1.0), rates[r]) for r in replicas]
        weighted = [(v, w) for v, w in values if v >= 0]
        total = sum(w for _, w in weighted)
        return sum(v * w for v, w in weighted) / total if total > 0 else 0.0

    def worst(name: str) -> float | None:
        values = [metrics.get(name, {}).get(r, -1.0) for r in replicas]
        values = [v for v in values if v >= 0]
        return max(values) if values else None

    return Observation(
        request_rate=sum(rates.values()), mean_prompt_tokens=mean_of("mean_prompt_tokens"), mean_output_tokens=mean_of("mean_output_tokens"),
        num_prefill=num_prefill, num_decode=num_decode,
        ttft_p90_s=worst("ttft_p90_s") if role == "prefill" else None, itl_p90_s=worst("itl_p90_s") if role == "decode" else None,
    )


class RolePlanner:
    """Serve autoscaling policy for one role (``policy_function`` in its ``autoscaling_config``)."""

    def __init__(self, role: str, planner: dict[str, Any], profile: dict[str, Any], min_replicas: int, max_replicas: int, app_name: str):
        self.role, self.app_name = role, app_name
        self.interval_s = float(planner["interval_s"])
        bounds = {f"min_{role}": min_replicas, f"max_{role}": max_replicas}
        self.cfg = PlannerConfig(planner["ttft_slo_s"], planner["itl_slo_s"], interval_s=self.interval_s, predictor=planner["predictor"],
                                 scale_down_headroom=planner["scale_down_headroom"], **bounds)
        self.profile = Profiles.from_dict(profile)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        state = dict(ctx.policy_state or {})
        now = time.time()
        current = int(ctx.target_num_replicas)
        if now - state.get("last_s", 0.0) < self.interval_s:
            return current, state
        metrics = dict(ctx.aggregated_metrics or {})
        reported = set(metrics.get("arrivals_per_s", {}))
        if not ctx.running_replicas or any(r not in reported for r in ctx.running_replicas):
            return current, state  # a replica without a window yet: its zeros would read as no load
        n = int(ctx.current_num_replicas)
        obs = observation(self.role, metrics, n if self.role == "prefill" else 0, n if self.role == "decode" else 0)
        if obs is None:
            return current, state
        history = [Observation(**o) for o in state.get("history", [])][-(HISTORY - 1):] + [obs]
        decision = plan_role(self.role, history, self.profile, self.cfg)
        state.update(last_s=now, history=[asdict(o) for o in history])
        publish_decision(self.app_name, self.role, decision.num_replicas, decision.reason, n)
        if decision.reason:
            logger.info("planner %s: %d -> %d replicas: %s", self.role, n, decision.num_replicas, decision.reason)
        return decision.num_replicas, state


def _kv_key(app_name: str, role: str) -> str:
    return f"splitserve:planner:{app_name}:{role}"


def publish_decision(app_name: str, role: str, desired: int, reason: str, current: int) -> None:
    try:
        from ray.experimental.internal_kv import _internal_kv_put

        record = {"desired": desired, "current": current, "reason": reason or "hold", "time": time.time()}
        _internal_kv_put(_kv_key(app_name, role), json.dumps(record).encode(), overwrite=True)
    except Exception as e:  # observability only: never fail the policy
        logger.debug("could not publish the planner decision: %r", e)


def read_decisions(app_name: str) -> dict[str, dict[str, Any]]:
    """The last decision per role ({} without a planner or outside Ray)."""
    try:
        from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

        if not _internal_kv_initialized():
            return {}
        out = {}
        for role in ("prefill", "decode"):
            raw = _internal_kv_get(_kv_key(app_name, role))
            if raw:
                out[role] = json.loads(raw)
        return out
    except Exception:
        return {}

"""The SLA planner's decision: how many prefill and decode replicas the next interval needs. Pure: no I/O.

NVIDIA Dynamo's SLA planner is the anchor: predict the load, then size each role
from profiled curves so that it meets its latency target at that load.

* **Load.** Each interval the glue reports an ``Observation`` (arrival rate, mean
  uncached prompt and output lengths, observed TTFT/ITL, current replicas). A
  ``predict_load`` over the recent history (last value, an EMA, or a linear trend)
  gives the next interval's rate and lengths.
* **Prefill** replicas: one prompt of ``isl`` tokens takes ``S = prefill.latency(isl)``
  alone. With Poisson arrivals (M/D/1), TTFT is about ``S * (1 + rho / (2 (1 - rho)))``
  at utilisation ``rho``; the highest ``rho`` that keeps it under ``ttft_slo_s`` sets
  a replica's capacity ``rho / S`` requests per second. (The KV hand-off is added to
  ``S``; ``transfer.seconds(isl)``.)
* **Decode** replicas: the largest batch ``n`` whose step, ``decode.step(n, n * ctx)``
  with ``ctx = isl + osl / 2`` tokens per sequence, stays under ``itl_slo_s`` (and fits
  the KV pool and ``max_num_seqs``) sets a replica's token rate ``n / step``; the
  predicted ``rate * osl`` tokens per second divided by it is the count.
* **Feedback.** Curves drift from the live system; when a role's observed p90
  latency exceeds its target while the model says the current count suffices, one
  replica is added (the reason says so). Scaling down waits until the smaller count
  still meets the targets at ``1 + scale_down_headroom`` times the predicted load, so
  the split does not flap around a boundary.

Out of scope here (the limits, stated in docs/tuning.md): prefix-cache hits are
assumed to be in the reported uncached prompt lengths; local prefill on decode
workers is not modelled; both roles are assumed to have the profiled hardware.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from splitserve.tune.curves import Profiles

PREDICTORS = ("constant", "ema", "linear")


@dataclass(frozen=True)
class PlannerConfig:
    ttft_slo_s: float
    itl_slo_s: float
    min_prefill: int = 1
    max_prefill: int = 8
    min_decode: int = 1
    max_decode: int = 8
    interval_s: float = 10.0
    predictor: str = "ema"
    ema_alpha: float = 0.5
    trend_window: int = 6
    scale_down_headroom: float = 0.2

    def __post_init__(self) -> None:
        if self.ttft_slo_s <= 0 or self.itl_slo_s <= 0:
            raise ValueError(f"ttft_slo_s and itl_slo_s must be > 0, got {self.ttft_slo_s}, {self.itl_slo_s}")
        if not 0 <= self.min_prefill <= self.max_prefill or not 1 <= self.min_decode <= self.max_decode:
            raise ValueError("need 0 <= min_prefill <= max_prefill and 1 <= min_decode <= max_decode")
        if self.predictor not in PREDICTORS:
            raise ValueError(f"predictor must be one of {PREDICTORS}, got {self.predictor!r}")


@dataclass(frozen=True)
class Observation:
    """What one interval showed. Latencies are None when no request finished that stage."""

    request_rate: float  # requests per second that arrived
    mean_prompt_tokens: float  # uncached prompt tokens per request (what prefill computes)
    mean_output_tokens: float
    num_prefill: int  # replicas running during the interval
    num_decode: int
    ttft_p90_s: float | None = None
    itl_p90_s: float | None = None


@dataclass(frozen=True)
class Load:
    request_rate: float
    mean_prompt_tokens: float
    mean_output_tokens: float

    def scaled(self, factor: float) -> "Load":
        return Load(self.request_rate * factor, self.mean_prompt_tokens, self.mean_output_tokens)


@dataclass(frozen=True)
class Decision:
    num_prefill: int
    num_decode: int
    reason: str
    load: Load
    prefill_capacity_rps: float = field(default=math.inf)  # per replica, from the profile
    decode_capacity_tps: float = field(default=math.inf)  # output tokens/s per replica


def predict_load(history: list[Observation], cfg: PlannerConfig) -> Load:
    """The next interval's load from the recent intervals (oldest first)."""
    if not history:
        return Load(0.0, 0.0, 0.0)
    last = history[-1]
    isl = _ema([o.mean_prompt_tokens for o in history if o.request_rate > 0], cfg.ema_alpha) or last.mean_prompt_tokens
    osl = _ema([o.mean_output_tokens for o in history if o.request_rate > 0], cfg.ema_alpha) or last.mean_output_tokens
    rates = [o.request_rate for o in history]
    if cfg.predictor == "constant":
        rate = rates[-1]
    elif cfg.predictor == "ema":
        rate = _ema(rates, cfg.ema_alpha) or 0.0
    else:
        rate = _trend(rates[-cfg.trend_window :])
    return Load(max(rate, 0.0), isl, osl)


def _ema(values: list[float], alpha: float) -> float | None:
    if not values:
        return None
    acc = values[0]
    for v in values[1:]:
        acc = alpha * v + (1 - alpha) * acc
    return acc


def _trend(values: list[float]) -> float:
    """Least-squares line through the values, one step past the last; the last value when too few points."""
    n = len(values)
    if n < 3:
        return values[-1]
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    sxx = sum((i - mean_x) ** 2 for i in range(n))
    slope = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values)) / sxx
    return mean_y + slope * (n - mean_x)


def prefill_capacity(profile: Profiles, isl: float, ttft_slo_s: float) -> float:
    """Requests per second one prefill replica serves with TTFT under the SLO (0: not even one alone)."""
    service = profile.prefill.latency(max(1, round(isl))) + profile.transfer.seconds(max(1, round(isl)))
    ratio = ttft_slo_s / service
    if ratio <= 1:
        return 0.0
    rho = 2 * (ratio - 1) / (1 + 2 * (ratio - 1))  # M/D/1: service * (1 + rho / (2 (1 - rho))) <= slo
    return rho / service


def decode_capacity(profile: Profiles, isl: float, osl: float, itl_slo_s: float) -> float:
    """Output tokens per second one decode replica produces with every step under the ITL SLO (0: not even batch 1)."""
    d = profile.decode
    ctx = max(1.0, isl + osl / 2)
    if d.step(1, int(ctx)) > itl_slo_s:
        return 0.0
    lo, hi = 1, min(d.max_num_seqs, max(1, int(d.kv_capacity_tokens // ctx)))
    while lo < hi:  # the step grows with n: the largest n under the SLO, by bisection
        mid = (lo + hi + 1) // 2
        if d.step(mid, int(mid * ctx)) <= itl_slo_s:
            lo = mid
        else:
            hi = mid - 1
    return lo / d.step(lo, int(lo * ctx))


def _needed(demand: float, capacity: float, lo: int, hi: int) -> int:
    if demand <= 0:
        return lo
    if capacity <= 0:
        return hi
    return min(hi, max(lo, math.ceil(demand / capacity - 1e-9)))


@dataclass(frozen=True)
class RoleDecision:
    num_replicas: int
    reason: str  # "" when holding
    capacity: float  # per replica: requests/s (prefill) or output tokens/s (decode), from the profile


def plan_role(role: str, history: list[Observation], profile: Profiles, cfg: PlannerConfig) -> RoleDecision:
    """Desired replicas of one role ("prefill" or "decode") for the next interval, and why (pure)."""
    load = predict_load(history, cfg)
    now = history[-1]
    if role == "prefill":
        capacity = prefill_capacity(profile, load.mean_prompt_tokens, cfg.ttft_slo_s)
        demand, current, lo, hi = load.request_rate, now.num_prefill, cfg.min_prefill, cfg.max_prefill
        observed, slo, unit = now.ttft_p90_s, cfg.ttft_slo_s, "req/s"
    else:
        capacity = decode_capacity(profile, load.mean_prompt_tokens, load.mean_output_tokens, cfg.itl_slo_s)
        demand, current, lo, hi = load.request_rate * load.mean_output_tokens, now.num_decode, cfg.min_decode, cfg.max_decode
        observed, slo, unit = now.itl_p90_s, cfg.itl_slo_s, "tok/s"
    want = _needed(demand, capacity, lo, hi)
    reasons = []
    if capacity <= 0 and demand > 0:
        reasons.append(f"{role}: the SLO ({slo:g} s) is below one request's latency on the profile: at most replicas")
    if want < current:  # scale down only with headroom, so the split does not flap at a boundary
        held = _needed(demand * (1 + cfg.scale_down_headroom), capacity, lo, hi)
        if held >= current or (observed is not None and observed > slo):
            want = current
    if observed is not None and observed > 1.1 * slo and want <= current < hi:
        reasons.append(f"{role}: observed p90 {observed:.3g} s over the {slo:g} s SLO, one more than the profile asks")
        want = current + 1
    elif want != current:
        reasons.append(f"{role}: {demand:.3g} {unit} needs {want} at {capacity:.3g} {unit} per replica (was {current})")
    return RoleDecision(want, "; ".join(reasons), capacity)


def plan(history: list[Observation], profile: Profiles, cfg: PlannerConfig) -> Decision:
    """Desired replicas per role for the next interval, and why."""
    load = predict_load(history, cfg)
    if not history:
        return Decision(cfg.min_prefill, cfg.min_decode, "no observations yet: minimum replicas", load)
    p, d = plan_role("prefill", history, profile, cfg), plan_role("decode", history, profile, cfg)
    reason = "; ".join(r for r in (p.reason, d.reason) if r) or "hold: the current split meets the predicted load"
    return Decision(p.num_replicas, d.num_replicas, reason, load, p.capacity, d.capacity)

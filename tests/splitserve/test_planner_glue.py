"""The SLA planner's glue, without Ray: what a worker measures and how the Serve policy turns it into replicas.

``WorkerMeters`` is driven with an explicit clock; ``RolePlanner`` with a fake
autoscaling context (a ``SimpleNamespace`` carrying the attributes Serve's
``AutoscalingContext`` gives it), a patched ``time.time`` and a profile whose
numbers make the capacities easy by hand: a prefill takes 0.1 s whatever the
prompt (no transfer cost), so with a 0.3 s TTFT target M/D/1 allows
``rho = 2*(3-1) / (1 + 2*(3-1)) = 0.8`` and one replica serves 0.8 / 0.1 = 8 req/s;
a decode step is ``0.02 + 0.001*n`` s, so under a 0.0605 s ITL target the batch
is at most 40 (a 0.06 s step) and one replica makes 40 / 0.06 = 666.7 tok/s.
"""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import pytest

from splitserve import planner_policy
from splitserve.config import PlannerSettings, ReplicaRange, ServeConfig
from splitserve.planner_policy import RolePlanner, observation, planner_autoscaling, read_decisions
from splitserve.tune.curves import DecodeProfile, PrefillProfile, Profiles, TransferProfile
from splitserve.worker_metrics import BusyMeter, WorkerMeters

pytestmark = pytest.mark.unit

PROFILE = Profiles(PrefillProfile(0.1, 0.0), DecodeProfile(0.02, 0.001, 0.0), TransferProfile(0.0, 1.0)).to_dict()
TTFT_SLO, ITL_SLO = 0.3, 0.0605


# ---- BusyMeter ---------------------------------------------------------------------------------------


def test_busy_fraction_spans_the_window_from_cumulative_busy_seconds():
    m = BusyMeter(window_s=10.0)
    assert m.sample(0.0, 0.0) == 0.0
    assert m.sample(2.0, 1.0) == pytest.approx(0.5)  # younger than the window: over its whole age
    assert m.sample(10.0, 1.0) == pytest.approx(0.1)
    # from 12 s on, the base is the newest sample at least a window old: the one at 2 s
    assert m.sample(12.0, 3.0) == pytest.approx(2.0 / 10.0)
    assert m.sample(13.0, 4.0) == pytest.approx(3.0 / 11.0)
    assert m.sample(13.0, 4.0) == pytest.approx(3.0 / 11.0)  # a second read at the same instant changes nothing
    assert m.sample(100.0, 4.0) == pytest.approx(0.0)  # idle since
    assert BusyMeter(5.0).sample(1.0, 7.0) == 0.0  # a lone sample: no span yet


# ---- WorkerMeters ------------------------------------------------------------------------------------


def test_meters_rates_means_and_p90_over_the_window():
    m = WorkerMeters(window_s=10.0)
    for t, prompt in [(1.0, 100), (2.0, 200), (3.0, 300), (4.0, 400)]:
        m.on_arrival(t, prompt)
    for i in range(20):  # TTFTs 0.05 .. 1.00: p90 of 20 is the 19th smallest (index int(0.9*20) = 18)
        m.on_first_token(5.0, (i + 1) * 0.05)
    m.on_tokens(5.0, 0.5, 5)  # 0.1 s per token
    m.on_tokens(5.0, 0.2, 1)  # 0.2 s per token
    m.on_tokens(5.0, 9.9, 0)  # no tokens: ignored
    m.on_finish(6.0, 10)
    m.on_finish(7.0, 30)
    s = m.snapshot(10.0)
    assert s["arrivals_per_s"] == pytest.approx(4 / 10)
    assert s["mean_prompt_tokens"] == pytest.approx(250.0)
    assert s["mean_output_tokens"] == pytest.approx(20.0)
    assert s["output_tokens_per_s"] == pytest.approx(40 / 10)
    assert s["ttft_p90_s"] == pytest.approx(0.95)
    assert s["itl_p90_s"] == pytest.approx(0.2)  # 2 values: index int(1.8) = 1, the larger


def test_meters_drop_entries_older_than_the_window():
    m = WorkerMeters(window_s=10.0)
    for t, prompt in [(1.0, 100), (2.0, 200), (3.0, 300), (4.0, 400)]:
        m.on_arrival(t, prompt)
    m.on_first_token(2.0, 0.7)
    m.on_first_token(4.0, 0.3)
    m.on_finish(2.0, 50)
    s = m.snapshot(14.0)  # horizon 4.0: the entry at exactly 4.0 stays, earlier ones go
    assert s["arrivals_per_s"] == pytest.approx(1 / 10)
    assert s["mean_prompt_tokens"] == pytest.approx(400.0)
    assert s["ttft_p90_s"] == pytest.approx(0.3)
    assert s["mean_output_tokens"] == -1.0 and s["output_tokens_per_s"] == 0.0
    s = m.snapshot(14.5)
    assert s["arrivals_per_s"] == 0.0 and s["mean_prompt_tokens"] == -1.0 and s["ttft_p90_s"] == -1.0


def test_meters_report_minus_one_when_the_window_saw_nothing():
    s = WorkerMeters(window_s=30.0).snapshot(1000.0)
    assert s == {"arrivals_per_s": 0.0, "mean_prompt_tokens": -1.0, "mean_output_tokens": -1.0,
                 "output_tokens_per_s": 0.0, "ttft_p90_s": -1.0, "itl_p90_s": -1.0}


def test_young_replica_divides_by_its_age_at_least_one_second():
    m = WorkerMeters(window_s=30.0, started_s=100.0)
    m.on_arrival(100.1, 10)
    assert m.snapshot(100.2)["arrivals_per_s"] == pytest.approx(1.0)  # age 0.2 s -> 1 s floor
    m.on_arrival(101.0, 10)
    m.on_arrival(102.0, 10)
    m.on_finish(104.0, 20)
    s = m.snapshot(105.0)  # age 5 s
    assert s["arrivals_per_s"] == pytest.approx(3 / 5)
    assert s["output_tokens_per_s"] == pytest.approx(20 / 5)
    m.on_arrival(190.0, 10)
    assert m.snapshot(200.0)["arrivals_per_s"] == pytest.approx(1 / 30)  # older than the window: the window


# ---- observation -------------------------------------------------------------------------------------

METRICS = {
    "arrivals_per_s": {"r1": 3.0, "r2": 1.0},
    "mean_prompt_tokens": {"r1": 100.0, "r2": 500.0},
    "mean_output_tokens": {"r1": -1.0, "r2": 40.0},
    "ttft_p90_s": {"r1": 0.2, "r2": 0.5},
    "itl_p90_s": {"r1": 0.03, "r2": -1.0},
}


def test_observation_weights_means_by_rate_and_takes_the_worst_p90():
    obs = observation("prefill", METRICS, num_prefill=2, num_decode=0)
    assert obs.request_rate == pytest.approx(4.0)
    assert obs.mean_prompt_tokens == pytest.approx((3 * 100 + 1 * 500) / 4)  # 200
    assert obs.mean_output_tokens == pytest.approx(40.0)  # r1's -1 is ignored, not averaged in
    assert obs.ttft_p90_s == pytest.approx(0.5) and obs.itl_p90_s is None
    assert (obs.num_prefill, obs.num_decode) == (2, 0)
    obs = observation("decode", METRICS, num_prefill=0, num_decode=2)
    assert obs.itl_p90_s == pytest.approx(0.03) and obs.ttft_p90_s is None


def test_observation_without_values():
    assert observation("prefill", {}, 1, 0) is None
    assert observation("prefill", {"arrivals_per_s": {}}, 1, 0) is None
    obs = observation("decode", {"arrivals_per_s": {"r1": 0.0}, "mean_prompt_tokens": {"r1": 80.0}}, 0, 1)
    assert obs.request_rate == 0.0
    assert obs.mean_prompt_tokens == 0.0 and obs.mean_output_tokens == 0.0  # no weight at all
    assert obs.itl_p90_s is None  # never reported


# ---- RolePlanner -------------------------------------------------------------------------------------


def make_planner(role: str, lo: int = 1, hi: int = 4, predictor: str = "constant", interval_s: float = 10.0) -> RolePlanner:
    settings = {"ttft_slo_s": TTFT_SLO, "itl_slo_s": ITL_SLO, "profile": "unused.json", "interval_s": interval_s,
                "predictor": predictor, "scale_down_headroom": 0.2}
    return RolePlanner(role, settings, PROFILE, lo, hi, "app")


def ctx(state, target, replicas: dict[str, tuple], running=None):
    """``replicas``: id -> (arrivals/s, prompt, output, ttft p90, itl p90); ``running`` defaults to them all."""
    names = ("arrivals_per_s", "mean_prompt_tokens", "mean_output_tokens", "ttft_p90_s", "itl_p90_s")
    metrics = {name: {r: v[i] for r, v in replicas.items()} for i, name in enumerate(names)}
    running = list(replicas) if running is None else running
    return SimpleNamespace(policy_state=state, target_num_replicas=target, current_num_replicas=len(running),
                           running_replicas=running, aggregated_metrics=metrics)


@pytest.fixture
def clock(monkeypatch):
    now = SimpleNamespace(t=1000.0)
    monkeypatch.setattr(planner_policy, "time", SimpleNamespace(time=lambda: now.t))
    published = []
    monkeypatch.setattr(planner_policy, "publish_decision", lambda *a: published.append(a))
    now.published = published
    return now


def test_prefill_scales_up_holds_with_headroom_then_down(clock):
    p = make_planner("prefill")
    n, state = p(ctx({}, 2, {"a": (10.0, 100, 50, 0.1, -1), "b": (10.0, 100, 50, 0.1, -1)}))
    assert n == 3  # 20 req/s at 8 per replica
    assert state["last_s"] == 1000.0 and len(state["history"]) == 1
    app, role, desired, reason, current = clock.published[-1]
    assert (app, role, desired, current) == ("app", "prefill", 3, 2) and "needs 3" in reason
    clock.t = 1010.0
    load = {r: (5.0, 100, 50, 0.1, -1) for r in "abc"}  # 15 req/s: 2 would do, but not 18 (+20 %): hold 3
    n, state = p(ctx(state, 3, load))
    assert n == 3 and len(state["history"]) == 2
    clock.t = 1020.0
    n, state = p(ctx(state, 3, {r: (0.3, 100, 50, 0.1, -1) for r in "abc"}))  # 0.9 req/s
    assert n == 1 and len(state["history"]) == 3


def test_prefill_clamps_to_the_range_and_adds_one_when_observed_over_slo(clock):
    p = make_planner("prefill")
    assert p(ctx({}, 1, {"a": (100.0, 100, 50, 0.1, -1)}))[0] == 4  # 12.5 replicas' worth, max 4
    # 4 req/s needs 1, but the observed p90 (0.5 s) is over 1.1 * 0.3 s: keep 2 and add one
    assert p(ctx({}, 2, {"a": (2.0, 100, 50, 0.5, -1), "b": (2.0, 100, 50, 0.2, -1)}))[0] == 3


def test_ema_history_carries_through_policy_state(clock):
    p = make_planner("prefill", predictor="ema")
    n, state = p(ctx({}, 2, {"a": (10.0, 100, 50, 0.1, -1), "b": (10.0, 100, 50, 0.1, -1)}))
    assert n == 3
    clock.t += 10
    n, state = p(ctx(state, 3, {r: (4 / 3, 100, 50, 0.1, -1) for r in "abc"}))
    assert n == 2  # predicted 0.5*4 + 0.5*20 = 12 req/s -> 2; with headroom 14.4 -> 2 < 3: down
    assert [h["request_rate"] for h in state["history"]] == pytest.approx([20.0, 4.0])


def test_decode_scales_on_output_tokens(clock):
    p = make_planner("decode")
    n, state = p(ctx({}, 1, {"a": (2.0, 100, 500, -1, 0.05)}))
    assert n == 2  # 2 req/s * 500 tokens = 1000 tok/s at 666.7 per replica
    clock.t += 10
    n, state = p(ctx(state, 2, {"a": (0.1, 100, 500, -1, 0.03), "b": (0.1, 100, 500, -1, 0.03)}))
    assert n == 1  # 100 tok/s (120 with headroom) fits one
    _, role, desired, reason, current = clock.published[-1]
    assert (role, desired, current) == ("decode", 1, 2) and "needs 1" in reason


def test_holds_until_the_interval_has_passed(clock):
    p = make_planner("prefill", interval_s=10.0)
    busy = {"a": (20.0, 100, 50, 0.1, -1)}
    n, state = p(ctx({}, 1, busy))
    assert n == 3
    clock.t = 1009.9
    assert p(ctx(state, 3, {"a": (100.0, 100, 50, 0.1, -1)})) == (3, state)  # Serve's target, untouched
    assert len(clock.published) == 1
    clock.t = 1010.0
    assert p(ctx(state, 3, {"a": (100.0, 100, 50, 0.1, -1)}))[0] == 4


def test_holds_until_every_running_replica_has_reported(clock):
    p = make_planner("prefill")
    quiet = {"a": (0.1, 100, 50, 0.1, -1)}
    assert p(ctx({"x": 1}, 3, quiet, running=["a", "b"])) == (3, {"x": 1})  # b has no window yet
    assert p(ctx({}, 2, {}, running=[])) == (2, {})
    assert clock.published == []
    assert p(ctx({}, 3, {**quiet, "b": (0.1, 100, 50, 0.1, -1)}))[0] == 1  # both reported: scale down


# ---- Serve wiring ------------------------------------------------------------------------------------


def test_read_decisions_outside_ray_is_empty():
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray session is up in this process")
    assert read_decisions("splitserve") == {}


def test_planner_autoscaling_wires_the_policy(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(PROFILE))
    planner = PlannerSettings(ttft_slo_s=TTFT_SLO, itl_slo_s=ITL_SLO, profile=str(path), interval_s=5.0)
    cfg = ServeConfig(num_prefill=ReplicaRange.parse("1:4"), num_decode=2, planner=planner, app_name="myapp")
    out = planner_autoscaling(cfg, "prefill")
    assert out["policy"]["policy_function"] == "splitserve.planner_policy:RolePlanner"
    kwargs = out["policy"]["policy_kwargs"]
    assert kwargs == {"role": "prefill", "planner": planner.model_dump(), "profile": PROFILE, "min_replicas": 1,
                      "max_replicas": 4, "app_name": "myapp"}
    # no Serve delays (the interval is the planner's own); pushes 4 per interval, averaged over 2 pushes at least
    assert (out["upscale_delay_s"], out["downscale_delay_s"], out["metrics_interval_s"], out["look_back_period_s"]) == (0.0, 0.0, 1.25, 5.0)
    short = planner_autoscaling(cfg.model_copy(update={"planner": planner.model_copy(update={"interval_s": 1.0})}), "prefill")
    assert (short["metrics_interval_s"], short["look_back_period_s"]) == (0.5, 1.0)
    json.dumps(out)  # plain data: travels to Serve's controller
    module, _, name = out["policy"]["policy_function"].partition(":")
    policy = getattr(importlib.import_module(module), name)(**kwargs)
    assert (policy.cfg.min_prefill, policy.cfg.max_prefill, policy.interval_s) == (1, 4, 5.0)
    assert policy.profile == Profiles.from_dict(PROFILE)


@pytest.mark.parametrize("role", ["num_prefill", "num_decode"])
def test_a_range_down_to_zero_is_refused_up_front(tmp_path, role):
    """A role at zero replicas is served around (degraded mode), so nothing would ever scale it back."""
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(PROFILE))
    planner = PlannerSettings(ttft_slo_s=TTFT_SLO, itl_slo_s=ITL_SLO, profile=str(path))
    with pytest.raises(ValueError, match=f"{role}: a replica range needs min >= 1"):
        ServeConfig(**{role: ReplicaRange.parse("0:2")}, planner=planner)

"""The SLA planner's pure decision, against numbers computed by hand from a round-number profile.

Profile (tests/tune/factories.py defaults): prefill 0.01 + 1e-4 t s, transfer 0.005 + 1e-6 t s,
decode step 0.02 + 1e-3 n + 1e-6 k s. For 1,000-token prompts and 100-token answers:
one prompt's service time S = 0.116 s; with a 0.5 s TTFT target, M/D/1 allows
rho = 2 (r - 1) / (1 + 2 (r - 1)) with r = 0.5 / 0.116, i.e. 7.49 req/s per prefill replica.
Decode at 1,050 context tokens per sequence: step(n) = 0.02 + 2.05e-3 n <= 0.1 s for n <= 39,
so 39 / 0.09995 = 390.2 output tokens/s per decode replica.
"""

from __future__ import annotations

import pytest

from splitserve.tune.sla_planner import Observation, PlannerConfig, decode_capacity, plan, predict_load, prefill_capacity
from tests.tune.factories import make_profiles

pytestmark = pytest.mark.unit

PROFILE = make_profiles()
CFG = PlannerConfig(ttft_slo_s=0.5, itl_slo_s=0.1, max_prefill=8, max_decode=8, predictor="constant")


def obs(rate: float, p: int = 1, d: int = 1, ttft: float | None = None, itl: float | None = None) -> Observation:
    return Observation(rate, 1000.0, 100.0, p, d, ttft, itl)


def test_capacities_by_hand():
    s = 0.01 + 0.1 + 0.005 + 0.001
    r = 0.5 / s
    assert prefill_capacity(PROFILE, 1000, 0.5) == pytest.approx((2 * (r - 1) / (1 + 2 * (r - 1))) / s)
    assert prefill_capacity(PROFILE, 1000, 0.5) == pytest.approx(7.49, abs=0.01)
    assert decode_capacity(PROFILE, 1000, 100, 0.1) == pytest.approx(39 / (0.02 + 39 * 1e-3 + 39 * 1050 * 1e-6))
    assert prefill_capacity(PROFILE, 1000, 0.1) == 0.0  # the target is below one prompt's own latency
    assert decode_capacity(PROFILE, 1000, 100, 0.02) == 0.0


def test_sizes_each_role_for_the_predicted_load():
    d = plan([obs(20.0)], PROFILE, CFG)
    assert (d.num_prefill, d.num_decode) == (3, 6)  # ceil(20 / 7.49), ceil(2000 / 390.2)
    assert "prefill: 20 req/s needs 3" in d.reason and "decode: 2e+03 tok/s needs 6" in d.reason


def test_scales_down_only_with_headroom():
    hold = plan([obs(14.0, p=3, d=6)], PROFILE, CFG)  # 14 needs 2, but 14 * 1.2 = 16.8 needs 3: hold
    assert hold.num_prefill == 3
    down = plan([obs(10.0, p=3, d=6)], PROFILE, CFG)  # 12 still fits in 2
    assert down.num_prefill == 2 and "was 3" in down.reason
    busy = plan([obs(10.0, p=3, d=6, ttft=0.6)], PROFILE, CFG)  # missing the target: never scale that role down
    assert busy.num_prefill >= 3


def test_observed_latency_over_target_adds_a_replica():
    d = plan([obs(5.0, p=1, d=2, ttft=0.9, itl=0.05)], PROFILE, CFG)  # the profile says 1 prefill suffices
    assert d.num_prefill == 2 and "observed p90 0.9 s over the 0.5 s SLO" in d.reason
    assert d.num_decode == 2


def test_bounds_and_an_idle_system():
    capped = plan([obs(500.0)], PROFILE, CFG)
    assert (capped.num_prefill, capped.num_decode) == (8, 8)
    idle = plan([obs(0.0, p=4, d=4)], PROFILE, PlannerConfig(0.5, 0.1, min_prefill=1, min_decode=1, predictor="constant"))
    assert (idle.num_prefill, idle.num_decode) == (1, 1)
    impossible = plan([obs(1.0)], PROFILE, PlannerConfig(0.05, 0.1, max_prefill=5, predictor="constant"))
    assert impossible.num_prefill == 5 and "below one request's latency" in impossible.reason
    assert plan([], PROFILE, CFG).reason.startswith("no observations")


def test_predictors():
    rising = [obs(r) for r in (1.0, 2.0, 3.0, 4.0)]
    assert predict_load(rising, PlannerConfig(0.5, 0.1, predictor="constant")).request_rate == 4.0
    assert predict_load(rising, PlannerConfig(0.5, 0.1, predictor="linear")).request_rate == pytest.approx(5.0)
    ema = predict_load(rising, PlannerConfig(0.5, 0.1, predictor="ema", ema_alpha=0.5)).request_rate
    assert ema == pytest.approx(((1 * 0.5 + 2 * 0.5) * 0.5 + 3 * 0.5) * 0.5 + 4 * 0.5)
    falling = [obs(r) for r in (9.0, 5.0, 1.0)]
    assert predict_load(falling, PlannerConfig(0.5, 0.1, predictor="linear")).request_rate == 0.0  # floored


def test_config_validation():
    with pytest.raises(ValueError, match="ttft_slo_s"):
        PlannerConfig(0, 0.1)
    with pytest.raises(ValueError, match="predictor"):
        PlannerConfig(1, 0.1, predictor="prophet")
    with pytest.raises(ValueError, match="min_decode"):
        PlannerConfig(1, 0.1, min_decode=3, max_decode=2)

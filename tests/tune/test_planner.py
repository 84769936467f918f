"""Split search: capacities, the throughput bound, and which way the best ratio leans for each workload shape."""

from __future__ import annotations

import pytest

from splitserve.tune.planner import capacity, evaluate, search_best_split, throughput_bound
from splitserve.tune.simulator import Split
from splitserve.tune.workload import SLO
from tests.tune.factories import fixed_workload, make_profiles

pytestmark = pytest.mark.unit

LOOSE = SLO(2.0, 0.1)


def test_throughput_bound_by_hand():
    prof = make_profiles()  # prefill 0.01 + 1e-4 t, budget 2048 -> 2048 / 0.2148 tokens/s
    wl = fixed_workload(1000, 10)
    tokens_per_s = 2048 / (0.01 + 1e-4 * 2048)
    assert throughput_bound(Split(0, 2, "aggregated"), wl, prof) == pytest.approx(2 * tokens_per_s / 1010)
    decode = 3 * 64 / (prof.decode.step(64, 64 * 1005) * 9)
    assert throughput_bound(Split(2, 3), wl, prof) == pytest.approx(min(2 * tokens_per_s / 1000, decode))


def test_capacity_is_zero_when_the_slo_is_impossible_and_below_the_bound_otherwise():
    prof = make_profiles()
    wl = fixed_workload(1000, 16)
    cap, rows = capacity(Split(1, 1), wl, SLO(0.05, 0.1), prof, num_requests=100)  # prefill alone takes 0.11 s
    assert cap == 0.0 and len(rows) == 1
    cap, rows = capacity(Split(1, 1), wl, LOOSE, prof, num_requests=200)
    assert 0 < cap <= throughput_bound(Split(1, 1), wl, prof)
    assert evaluate(Split(1, 1), wl, LOOSE, prof, cap, 200).summary.attainment >= 0.9


def test_prefill_bound_workload_prefers_more_prefill_units():
    res = search_best_split(4, fixed_workload(2000, 4), LOOSE, make_profiles(), num_requests=200)
    best = Split.parse(res.best)
    assert best.mode == "disaggregated" and best.num_prefill > best.num_decode, res.ranking()


def test_decode_bound_workload_prefers_more_decode_units():
    prof = make_profiles(decode_b=5e-3)
    res = search_best_split(4, fixed_workload(32, 100), SLO(2.0, 0.08), prof, num_requests=120)
    best = Split.parse(res.best)
    assert best.num_decode > best.num_prefill, res.ranking()
    assert res.score[res.best] >= res.score["3P1D"]


def test_fixed_rates_score_the_best_goodput_and_tie_break_stably():
    res = search_best_split(2, fixed_workload(100, 8), LOOSE, make_profiles(), rates=[0.5, 1.0], num_requests=40)
    assert {r.split for r in res.rows} == {"1P1D", "agg2"} and {r.rate for r in res.rows} == {0.5, 1.0}
    assert res.best in res.score and "max goodput" in res.score_kind


def test_large_clusters_are_searched_coarse_to_fine():
    seen = []
    res = search_best_split(30, fixed_workload(2000, 8), LOOSE, make_profiles(), num_requests=150, progress=seen.append)
    assert len(seen) < 29 and "agg30" in seen and res.best in seen
    best = Split.parse(res.best)
    if best.mode == "disaggregated":  # the neighbours of the winner were all tried
        assert {f"{p}P{30 - p}D" for p in (best.num_prefill - 1, best.num_prefill + 1) if 0 < p < 30} <= set(seen)
    with pytest.raises(ValueError, match="needs 5 units"):
        search_best_split(4, fixed_workload(10, 2), LOOSE, make_profiles(), splits=[Split(2, 3)])

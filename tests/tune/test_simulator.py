"""The discrete-event simulator: hand-computed single requests, conservation, determinism, monotonicity, stalls."""

from __future__ import annotations

import pytest

from splitserve.tune.simulator import Split, candidate_splits, simulate
from splitserve.tune.workload import SLO, LengthDist, Workload, summarize
from tests.tune.factories import fixed_workload, make_profiles

pytestmark = pytest.mark.unit

P1D1 = Split(1, 1)
AGG1 = Split(0, 1, "aggregated")


def mixed_workload(seed: int = 0) -> Workload:
    # prompts longer than the 2048-token budget (chunked), single-token outputs, a long tail
    return Workload("mixed", LengthDist("lognormal", 400, 1.0, 1, 5000), LengthDist("lognormal", 20, 1.0, 1, 300), seed=seed)


def test_split_labels_parse_and_candidates():
    assert Split.parse("3p5d") == Split(3, 5) and Split.parse("agg2") == Split(0, 2, "aggregated")
    assert Split(3, 5).label == "3P5D" and Split(0, 4, "aggregated").label == "agg4" and Split(3, 5).num_units == 8
    assert [s.label for s in candidate_splits(3)] == ["1P2D", "2P1D", "agg3"]
    for bad in ("1p", "p1d1", "agg"):
        with pytest.raises(ValueError):
            Split.parse(bad)
    with pytest.raises(ValueError):
        Split(0, 1)


def test_lone_disaggregated_request_matches_the_curves():
    prof = make_profiles()
    (rec,) = simulate(P1D1, fixed_workload(100, 5).requests(1.0, 1), prof, keep_gaps=True)
    ttft = prof.prefill.latency(100) + prof.transfer.seconds(100)
    assert rec.ttft_s == pytest.approx(ttft)
    steps = [prof.decode.step(1, 101 + i) for i in range(4)]  # context grows by one token per step
    assert rec.itl_gaps_s == pytest.approx(steps)
    assert rec.itl_mean_s == pytest.approx(sum(steps) / 4) and rec.finish_s == pytest.approx(ttft + sum(steps))
    assert rec.completed and rec.num_output_tokens == 5


def test_lone_aggregated_request_has_no_transfer():
    prof = make_profiles()
    (rec,) = simulate(AGG1, fixed_workload(100, 3).requests(1.0, 1), prof, keep_gaps=True)
    assert rec.ttft_s == pytest.approx(prof.prefill.latency(100))
    assert rec.itl_gaps_s == pytest.approx([prof.decode.step(1, 101), prof.decode.step(1, 102)])


@pytest.mark.parametrize("split", [P1D1, Split(2, 3), AGG1, Split(0, 3, "aggregated")])
@pytest.mark.parametrize("rate", [1.0, 50.0])
def test_every_request_finishes_with_all_its_tokens(split, rate):
    reqs = mixed_workload().requests(rate, 300)
    recs = simulate(split, reqs, make_profiles(max_num_seqs=8, kv_capacity_tokens=20000))
    assert [r.index for r in recs] == [s.index for s in reqs]
    for spec, rec in zip(reqs, recs):
        assert rec.completed and rec.num_output_tokens == spec.output_len
        assert rec.ttft_s > 0 and rec.finish_s >= spec.arrival_s + rec.ttft_s - 1e-12
        assert (rec.itl_mean_s is None) == (spec.output_len == 1)


def test_deterministic_for_a_seed():
    prof = make_profiles()
    a = simulate(Split(2, 2), mixed_workload(seed=1).requests(20.0, 200), prof)
    b = simulate(Split(2, 2), mixed_workload(seed=1).requests(20.0, 200), prof)
    c = simulate(Split(2, 2), mixed_workload(seed=2).requests(20.0, 200), prof)
    assert a == b and a != c


def test_more_decode_workers_never_hurt_itl_at_fixed_load():
    prof = make_profiles(decode_b=4e-3)
    reqs = fixed_workload(200, 100).requests(20.0, 400)
    itl = []
    for d in (1, 2, 3, 4, 6):
        s = summarize(simulate(Split(2, d), reqs, prof), SLO(10, 10))
        itl.append((s.itl_p50, max(r.itl_mean_s for r in simulate(Split(2, d), reqs, prof))))
    for (p50_a, worst_a), (p50_b, worst_b) in zip(itl, itl[1:]):
        assert p50_b <= p50_a + 1e-12 and worst_b <= worst_a + 1e-12
    assert itl[-1][0] < itl[0][0]


def test_more_prefill_workers_never_hurt_ttft_at_fixed_load():
    prof = make_profiles()
    reqs = fixed_workload(2000, 4).requests(20.0, 300)
    p90 = [summarize(simulate(Split(p, 2), reqs, prof), SLO(10, 10)).ttft_p90 for p in (1, 2, 3, 5)]
    assert p90 == sorted(p90, reverse=True) and p90[-1] < p90[0]


def test_aggregated_decodes_stall_behind_long_prefills():
    """The same two units: prefill chunks in the decode batch stretch the inter-token gaps; disaggregation does not."""
    prof = make_profiles()
    reqs = fixed_workload(2000, 64).requests(2.0, 200)
    agg = summarize(simulate(Split(0, 2, "aggregated"), reqs, prof, keep_gaps=True), SLO(10, 10))
    dis = summarize(simulate(P1D1, reqs, prof, keep_gaps=True), SLO(10, 10))
    assert agg.itl_p99 > 3 * dis.itl_p99
    assert dis.itl_p99 < prof.prefill.latency(2000) / 2 < agg.itl_p99  # disaggregated: never a prefill between tokens


def test_decode_capacity_makes_sequences_wait_not_fail():
    prof = make_profiles(kv_capacity_tokens=1000, max_num_seqs=2)
    recs = simulate(P1D1, fixed_workload(400, 10).requests(100.0, 20), prof)
    assert all(r.completed for r in recs)
    waited = summarize(recs, SLO(10, 10)).ttft_p99
    assert waited > prof.prefill.latency(400) * 2


def test_stops_early_once_the_slo_is_lost():
    prof = make_profiles()
    reqs = fixed_workload(2000, 16).requests(500.0, 400)
    slo = SLO(0.5, 0.1)
    full = simulate(P1D1, reqs, prof)
    short = simulate(P1D1, reqs, prof, slo=slo, max_misses=10)
    assert sum(not r.meets(slo) for r in short) > 10
    assert any(r.error for r in short) and not any(r.error for r in full)
    with pytest.raises(ValueError, match="slo"):
        simulate(P1D1, reqs, prof, max_misses=3)

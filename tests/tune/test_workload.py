"""Workloads, SLOs and goodput: deterministic request lists, length distributions, the SLO rule, summaries."""

from __future__ import annotations

import random

import pytest

from splitserve.tune.workload import (
    PRESETS,
    SLO,
    LengthDist,
    RequestRecord,
    RequestSpec,
    Workload,
    percentile,
    preset,
    record_from_token_times,
    summarize,
)

pytestmark = pytest.mark.unit


def test_requests_are_deterministic_and_lengths_do_not_depend_on_rate():
    wl = preset("rag", seed=3)
    a, b = wl.requests(1.0, 50), wl.requests(1.0, 50)
    assert a == b
    fast = wl.requests(4.0, 50)
    assert [(r.prompt_len, r.output_len) for r in a] == [(r.prompt_len, r.output_len) for r in fast]
    assert fast[-1].arrival_s < a[-1].arrival_s
    assert wl.requests(1.0, 50, seed=4) != a


def test_poisson_mean_gap_and_constant_gaps():
    wl = preset("chat")
    reqs = wl.requests(2.0, 4000)
    mean_gap = reqs[-1].arrival_s / (len(reqs) - 1)
    assert mean_gap == pytest.approx(0.5, rel=0.05)
    const = Workload("c", LengthDist("fixed", 10), LengthDist("fixed", 5), "constant").requests(4.0, 5)
    assert [r.arrival_s for r in const] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert const[0].arrival_s == 0.0 and [r.index for r in const] == list(range(5))


@pytest.mark.parametrize("dist", [
    LengthDist("fixed", 64), LengthDist("uniform", 100, 20), LengthDist("normal", 1024, 128, 768, 1280),
    LengthDist("lognormal", 256, 0.5, 16, 2048),
])
def test_length_distributions_stay_in_range(dist):
    rng = random.Random(0)
    xs = [dist.sample(rng) for _ in range(2000)]
    assert min(xs) >= dist.low and max(xs) <= dist.max_value
    center = sorted(xs)[len(xs) // 2] if dist.kind == "lognormal" else sum(xs) / len(xs)  # lognormal: mean is the median
    assert center == pytest.approx(dist.mean, rel=0.1)


def test_presets_have_the_advertised_shapes():
    rag = PRESETS["rag"].requests(1.0, 500)
    chat = PRESETS["chat"].requests(1.0, 500)
    assert sum(r.prompt_len for r in rag) / 500 == pytest.approx(1024, rel=0.05)
    assert sum(r.output_len for r in rag) / 500 == pytest.approx(64, rel=0.05)
    assert sum(r.prompt_len for r in chat) / 500 == pytest.approx(256, rel=0.05)
    assert sum(r.output_len for r in chat) / 500 == pytest.approx(256, rel=0.05)
    with pytest.raises(ValueError, match="unknown workload"):
        preset("nope")


def test_parse_length_distribution():
    assert LengthDist.parse("64") == LengthDist("fixed", 64)
    assert LengthDist.parse("normal:1024,128,512,1536") == LengthDist("normal", 1024, 128, 512, 1536)
    assert LengthDist.parse("lognormal:256,0.5") == LengthDist("lognormal", 256, 0.5)
    for bad in ("gauss:3", "normal:a,b", "normal:1,2,3,4,5", "uniform:0"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="rate"):
        preset("rag").requests(0, 5)
    with pytest.raises(ValueError, match="num_requests"):
        preset("rag").requests(1, 0)
    with pytest.raises(ValueError, match="positive"):
        SLO(0, 1)


def test_record_from_token_times_and_the_slo_rule():
    spec = RequestSpec(0, 1.0, 100, 4)
    rec = record_from_token_times(spec, [1.5, 1.6, 1.7, 2.1])  # gaps 0.1, 0.1, 0.4
    assert rec.completed and rec.ttft_s == pytest.approx(0.5)
    assert rec.itl_mean_s == pytest.approx(0.2) and rec.itl_p90_s == pytest.approx(0.34)
    assert rec.meets(SLO(0.5, 0.21)) and not rec.meets(SLO(0.4, 0.21)) and not rec.meets(SLO(0.5, 0.19))
    assert not rec.meets(SLO(0.5, 0.2, itl_stat="p90")) and rec.meets(SLO(0.5, 0.35, itl_stat="p90"))
    short = record_from_token_times(spec, [1.5, 1.6])
    assert not short.completed and not short.meets(SLO(10, 10))
    failed = record_from_token_times(spec, [1.5, 1.6, 1.7, 1.8], error="boom")
    assert not failed.completed


def test_summarize_goodput_is_good_requests_per_second_of_run():
    slo = SLO(1.0, 0.1)
    recs = [
        record_from_token_times(RequestSpec(0, 0.0, 10, 3), [0.5, 0.55, 0.6]),  # good
        record_from_token_times(RequestSpec(1, 1.0, 10, 3), [2.5, 2.55, 2.6]),  # TTFT 1.5: miss
        record_from_token_times(RequestSpec(2, 2.0, 10, 3), [2.2, 2.5, 4.0]),  # ITL 0.9: miss
        RequestRecord(3, 3.0, 10, 3, error="HTTP 503"),
    ]
    s = summarize(recs, slo)
    assert (s.num_requests, s.num_completed, s.num_good) == (4, 3, 1)
    assert s.duration_s == pytest.approx(4.0)
    assert s.goodput == pytest.approx(0.25) and s.attainment == pytest.approx(0.25) and s.throughput == pytest.approx(0.75)
    assert s.ttft_p50 == pytest.approx(0.5)
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 50) is None

"""Calibrating the simulator's hand-off latency to a measured sweep (here: a sweep simulated with a known latency)."""

from __future__ import annotations

import csv
from dataclasses import replace

import pytest

from splitserve.tune.calibrate import calibrate, calibrate_handoff, scale_speed
from splitserve.tune.commands import compare_with_measured
from splitserve.tune.planner import evaluate
from splitserve.tune.profile import load_profile
from splitserve.tune.report import write_results_csv
from splitserve.tune.simulator import Split
from splitserve.tune.workload import SLO
from tests.tune.factories import fixed_workload, make_profiles

pytestmark = pytest.mark.unit

WL = fixed_workload(512, 16)
SLO_ = SLO(ttft_s=1.0, itl_s=0.05)
RATES = (1.0, 4.0, 8.0)


def measured_rows(tmp_path, true_latency: float):
    """A results.csv as 'splitserve tune' writes it, from a 'machine' whose hand-off costs ``true_latency``."""
    truth = make_profiles(transfer_latency=true_latency)
    rows = [evaluate(Split.parse(s), WL, SLO_, truth, r, 40, seed=3) for s in ("1P1D", "2P1D", "agg2") for r in RATES]
    path = write_results_csv(rows, tmp_path / "results.csv")
    return path, list(csv.DictReader(open(path)))


def test_recovers_the_hand_off_latency_from_the_lowest_rates(tmp_path):
    _, rows = measured_rows(tmp_path, true_latency=0.25)
    assumed = make_profiles(transfer_latency=0.005)
    cal = calibrate_handoff(rows, WL, SLO_, assumed, seed=3)
    assert cal.latency_s == pytest.approx(0.25, abs=0.01)
    assert cal.profiles.transfer.latency_s == cal.latency_s
    assert {(s, r) for s, r, _ in cal.points} == {("1P1D", 1.0), ("2P1D", 1.0)}  # lowest rate of each disaggregated split
    assert cal.used("1P1D", 1.0) and not cal.used("1P1D", 4.0) and not cal.used("agg2", 1.0)
    assert cal.profiles.meta["assumed_handoff_latency_s"] == 0.005
    assert "KV hand-off latency 250 ms, was an assumed 5 ms" in cal.describe()
    # the calibrated simulator now predicts the held-out rates of the 'machine' (it is the same model)
    truth = make_profiles(transfer_latency=0.25)
    for rate in RATES[1:]:
        want = evaluate(Split(1, 1), WL, SLO_, truth, rate, 40, seed=3).summary
        got = evaluate(Split(1, 1), WL, SLO_, cal.profiles, rate, 40, seed=3).summary
        assert got.ttft_p50 == pytest.approx(want.ttft_p50, rel=0.05)


def test_a_faster_machine_than_assumed_never_gives_a_negative_latency(tmp_path):
    _, rows = measured_rows(tmp_path, true_latency=0.0)
    slower = replace(make_profiles(), prefill=replace(make_profiles().prefill, a_s=0.2))  # the profile overestimates prefill
    assert calibrate_handoff(rows, WL, SLO_, slower, seed=3).latency_s == 0.0


def test_needs_a_disaggregated_split_to_fit(tmp_path):
    _, rows = measured_rows(tmp_path, true_latency=0.1)
    with pytest.raises(ValueError, match="no disaggregated split"):
        calibrate_handoff([r for r in rows if r["split"].startswith("agg")], WL, SLO_, make_profiles(), seed=3)


def test_compare_prints_fitted_points_and_held_out_error(tmp_path, capsys):
    path, _ = measured_rows(tmp_path, true_latency=0.25)
    assert compare_with_measured(path, WL, SLO_, make_profiles(transfer_latency=0.005), 3, calibrate=True, out=tmp_path) == 0
    out = capsys.readouterr().out
    saved = load_profile(tmp_path / "calibrated-profile.json")  # ready for 'simulate --profile'
    assert saved.transfer.latency_s == pytest.approx(0.25, abs=0.01) and saved.meta["calibrated_slowdown"] == pytest.approx(1.0, rel=0.01)
    assert "workers x1.00 slower than profiled" in out and "KV hand-off latency 250 ms" in out
    assert "| 1P1D * | 1 |" in out and "| 1P1D | 4 |" in out
    assert "held out (not used to calibrate" in out


def test_fits_a_live_slowdown_first_then_the_hand_off(tmp_path):
    # the 'machine': every worker 1.5x slower than its profile, and a 0.2 s hand-off
    profile = make_profiles(transfer_latency=0.005)
    truth = replace(scale_speed(profile, 1.5), transfer=replace(profile.transfer, latency_s=0.2))
    rows = [evaluate(Split.parse(s), WL, SLO_, truth, r, 40, seed=3) for s in ("1P1D", "agg2") for r in RATES]
    path = write_results_csv(rows, tmp_path / "results.csv")
    cal = calibrate(list(csv.DictReader(open(path))), WL, SLO_, profile, seed=3)
    assert cal.slowdown == pytest.approx(1.5, rel=0.05)
    assert cal.latency_s == pytest.approx(0.2, abs=0.02)
    assert {(s, r) for s, r, _ in cal.itl_points} == {("1P1D", 1.0), ("agg2", 1.0)}
    assert cal.profiles.decode.a_s == pytest.approx(profile.decode.a_s * cal.slowdown)
    assert cal.profiles.meta["calibrated_slowdown"] == cal.slowdown
    # an aggregated-only sweep still fits the slowdown and keeps the assumed latency
    agg_only = [r for r in csv.DictReader(open(path)) if r["split"] == "agg2"]
    cal = calibrate(agg_only, WL, SLO_, profile, seed=3)
    assert cal.slowdown == pytest.approx(1.5, rel=0.05) and cal.latency_s == 0.005 and cal.points == ()
    with pytest.raises(ValueError, match="speed factor"):
        scale_speed(profile, 0.0)

"""Profiling the real engine in-process (tiny model), and comparing a profile with a measured results.csv."""

from __future__ import annotations

import pytest

from splitserve.cli import main
from splitserve.tune.planner import Row
from splitserve.tune.profile import load_profile, measure_profile, save_profile
from splitserve.tune.report import write_results_csv
from splitserve.tune.workload import SLO, RequestSpec, record_from_token_times, summarize
from tests.tune.factories import make_profiles


@pytest.mark.engine
def test_measure_profile_on_the_tiny_model(tiny_model, tmp_path):
    seen = []
    prof = measure_profile(tiny_model, dtype="float32", token_budget=128, prefill_tokens=(8, 32, 64, 128, 256), batch_sizes=(1, 2, 4),
                           contexts=(16, 48), repeats=1, decode_steps=2, kv_capacity_blocks=100, progress=seen.append)
    meta = prof.meta
    assert [t for t, _ in meta["prefill_points"]] == [8, 32, 64, 128]  # 256 is past the token budget
    assert sorted({n for n, _, _ in meta["decode_points"]}) == [1, 2, 4] and len(meta["decode_points"]) == 6
    assert all(t > 0 for *_, t in meta["prefill_points"] + meta["decode_points"])
    assert prof.prefill.token_budget == 128 and prof.decode.kv_capacity_tokens == 100 * 16
    assert prof.prefill.latency(128) > 0 and prof.decode.step(4, 200) > 0
    assert prof.transfer.bytes_per_token == 2 * 2 * 2 * 16 * 4  # layers x K,V x kv heads x head dim x float32
    assert any("decode" in s for s in seen) and "measured" in meta["source"]
    back = load_profile(save_profile(prof, tmp_path / "p.json"))
    assert (back.prefill, back.decode, back.transfer) == (prof.prefill, prof.decode, prof.transfer)
    assert back.meta["decode_points"] == [list(p) for p in meta["decode_points"]]


@pytest.mark.unit
def test_simulate_against_a_measured_results_csv(tmp_path, capsys):
    slo = SLO(5.0, 1.0)
    recs = [record_from_token_times(RequestSpec(i, i * 1.0, 100, 4), [i + 0.1, i + 0.2, i + 0.3, i + 0.4]) for i in range(6)]
    rows = [Row("1P1D", 1.0, summarize(recs, slo)), Row("agg2", 1.0, summarize(recs, slo))]
    results = write_results_csv(rows, tmp_path / "results.csv")
    prof = save_profile(make_profiles(), tmp_path / "p.json")
    rc = main(["simulate", "--profile", str(prof), "--against", str(results), "--prompt-len", "100", "--output-len", "4",
               "--ttft-slo", "5", "--itl-slo", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "| 1P1D | 1 |" in out and "| agg2 | 1 |" in out and "mean |error|" in out
    assert main(["simulate", "--profile", str(prof), "--against", str(tmp_path / "nope.csv")]) == 2

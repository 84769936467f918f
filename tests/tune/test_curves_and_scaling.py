"""Curve fits, profile JSON round trips, and the projection to H200-class devices from stated assumptions."""

from __future__ import annotations

import pytest

from splitserve.tune.curves import Profiles, fit_decode, fit_error, fit_prefill
from splitserve.tune.profile import load_profile, save_profile
from splitserve.tune.scaling import DEVICES, MODELS, Assumptions, ModelShape, describe, project
from tests.tune.factories import make_profiles

pytestmark = pytest.mark.unit


def test_fits_recover_known_coefficients():
    pts = [(t, 0.01 + 2e-4 * t + 3e-8 * t * t) for t in (16, 64, 256, 1024, 2048)]
    p = fit_prefill(pts, token_budget=2048)
    assert (p.a_s, p.b_s_per_token, p.c_s_per_token2) == pytest.approx((0.01, 2e-4, 3e-8), rel=1e-6)
    assert fit_error(pts, p.latency) < 1e-9
    dpts = [(n, k, 0.05 + 1e-3 * n + 2e-6 * k) for n in (1, 4, 16) for k in (100 * n, 900 * n)]
    d = fit_decode(dpts, max_num_seqs=64, kv_capacity_tokens=1000)
    assert (d.a_s, d.b_s_per_seq, d.c_s_per_ctx_token) == pytest.approx((0.05, 1e-3, 2e-6), rel=1e-6)
    assert (d.max_num_seqs, d.kv_capacity_tokens) == (64, 1000)


def test_fits_never_return_negative_costs():
    noisy = [(16, 0.30), (64, 0.20), (256, 0.5), (1024, 2.0)]  # a small prompt measured slow
    p = fit_prefill(noisy, token_budget=1024)
    assert min(p.a_s, p.b_s_per_token, p.c_s_per_token2) >= 0
    assert p.latency(1024) == pytest.approx(2.0, rel=0.2)
    with pytest.raises(ValueError, match="at least"):
        fit_prefill(noisy[:2], 1024)


def test_profile_round_trips_through_json(tmp_path):
    prof = make_profiles()
    path = save_profile(prof, tmp_path / "p" / "profile.json")
    assert load_profile(path) == prof
    assert Profiles.from_dict(prof.to_dict()) == prof
    with pytest.raises(ValueError, match="does not exist"):
        load_profile(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"prefill": {}}')
    with pytest.raises(ValueError, match="not a splitserve tuning profile"):
        load_profile(tmp_path / "bad.json")


def test_mixed_step_is_a_prefill_step_plus_the_decodes_kv_reads():
    prof = make_profiles()
    assert prof.mixed_step(0, 4, 1000) == prof.decode.step(4, 1000)
    assert prof.mixed_step(500, 4, 1000) == pytest.approx(prof.prefill.latency(504) + prof.decode.c_s_per_ctx_token * 1000)


def test_h200_llama3_8b_projection_follows_the_stated_numbers():
    a = Assumptions()
    prof = project(DEVICES["h200"], MODELS["llama-3-8b"], 1, a)
    m = MODELS["llama-3-8b"]
    assert m.kv_bytes_per_token == 131072  # 2 * 32 layers * 8 KV heads * 128 * 2 bytes
    assert prof.prefill.b_s_per_token == pytest.approx(2 * 8.03e9 / (989e12 * 0.5))
    assert prof.decode.a_s == pytest.approx(a.step_overhead_s + 16.06e9 / (4.8e12 * 0.7))
    assert prof.decode.c_s_per_ctx_token == pytest.approx(131072 / (4.8e12 * 0.7))
    assert prof.prefill.latency(1024) == pytest.approx(0.037, abs=0.002)  # ~37 ms for a 1k-token prompt
    assert prof.decode.kv_capacity_tokens == int((141e9 * 0.9 - 16.06e9) / 131072)
    assert prof.transfer.seconds(1024) == pytest.approx(50e-6 + 1024 * 131072 / 40e9)
    assert "not a measurement" in describe(prof) and "989" in describe(prof)


def test_tensor_parallel_workers_and_models_that_do_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        project(DEVICES["h100"], MODELS["llama-3-70b"], 1)
    tp4 = project(DEVICES["h200"], MODELS["llama-3-70b"], 4)
    tp8 = project(DEVICES["h200"], MODELS["llama-3-70b"], 8)
    assert tp8.prefill.latency(4096) < tp4.prefill.latency(4096)
    assert tp8.decode.kv_capacity_tokens > tp4.decode.kv_capacity_tokens
    tiny = ModelShape("t", 1e6, 2, 4, 2, 16)
    assert tiny.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2

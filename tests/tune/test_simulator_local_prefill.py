"""Conditional disaggregation in the simulator (``LocalPrefill``): short prompts prefilled on their decode worker,
as ``scheduler.policy`` rules 3 and 4 do; hand-computed from the test curves."""

from __future__ import annotations

import pytest

from splitserve.tune.planner import throughput_bound
from splitserve.tune.simulator import NO_LOCAL_PREFILL, LocalPrefill, Split, simulate
from splitserve.tune.sweep import SweepConfig, serve_config
from splitserve.tune.workload import SLO, RequestSpec
from tests.tune.factories import fixed_workload, make_profiles

pytestmark = pytest.mark.unit

P1D1 = Split(1, 1)


def test_a_prompt_within_the_budget_skips_the_prefill_worker_and_the_transfer():
    prof = make_profiles()  # prefill 10 ms + 0.1 ms per token: 50 tokens take 15 ms, 0.3 ms per token
    reqs = fixed_workload(50, 3).requests(1.0, 1)
    (local,) = simulate(P1D1, reqs, prof, keep_gaps=True, local_prefill=LocalPrefill(budget_s=0.015))
    (remote,) = simulate(P1D1, reqs, prof, keep_gaps=True)
    assert local.ttft_s == pytest.approx(prof.prefill.latency(50))  # one step of the decode worker's engine
    assert remote.ttft_s == pytest.approx(prof.prefill.latency(50) + prof.transfer.seconds(50))
    # then it decodes there as any stream: the same steps either way
    assert local.itl_gaps_s == pytest.approx(remote.itl_gaps_s)
    (over,) = simulate(P1D1, reqs, prof, local_prefill=LocalPrefill(budget_s=0.0149))
    assert over.ttft_s == pytest.approx(remote.ttft_s)


def test_the_token_threshold_alone():
    prof = make_profiles()
    threshold = LocalPrefill(threshold_tokens=100)
    (at,) = simulate(P1D1, fixed_workload(100, 2).requests(1.0, 1), prof, local_prefill=threshold)
    (above,) = simulate(P1D1, fixed_workload(101, 2).requests(1.0, 1), prof, local_prefill=threshold)
    assert at.ttft_s == pytest.approx(prof.prefill.latency(100))
    assert above.ttft_s == pytest.approx(prof.prefill.latency(101) + prof.transfer.seconds(101))


def test_the_budget_counts_the_prompts_already_queued_on_the_decode_worker():
    prof = make_profiles()
    both = [RequestSpec(0, 0.0, 50, 2), RequestSpec(1, 0.0, 50, 2)]  # 15 ms each alone; 30 ms behind the first
    first, second = simulate(P1D1, both, prof, local_prefill=LocalPrefill(budget_s=0.02))
    assert first.ttft_s == pytest.approx(prof.prefill.latency(50))  # local: one step on the decode worker
    assert second.ttft_s == pytest.approx(prof.prefill.latency(50) + prof.transfer.seconds(50))  # remote, in parallel


def test_a_local_prompt_shares_a_step_with_the_streams_there():
    prof = make_profiles()
    reqs = [RequestSpec(0, 0.0, 2000, 50), RequestSpec(1, 0.3, 40, 5)]  # a long remote prompt, then a short local one
    long, short = simulate(P1D1, reqs, prof, keep_gaps=True, local_prefill=LocalPrefill(budget_s=0.02))
    assert long.ttft_s == pytest.approx(prof.prefill.latency(2000) + prof.transfer.seconds(2000))  # decoding before 0.3 s
    # exactly one of the stream's gaps is the mixed step that prefilled the short prompt beside it (40 + 1 tokens)
    mixed = [ctx for ctx in range(2001, 2051) for g in long.itl_gaps_s
             if g == pytest.approx(prof.prefill.latency(41) + prof.decode.c_s_per_ctx_token * ctx, abs=1e-12)]
    assert len(mixed) == 1
    mixed_s = prof.mixed_step(40, 1, mixed[0])
    # its first token ends that step, which started when the step running at its arrival ended
    assert mixed_s < short.ttft_s <= prof.decode.step(1, 2050) + mixed_s


def test_conservation_and_determinism_with_local_prefill():
    prof = make_profiles()
    reqs = fixed_workload(60, 20).requests(30.0, 200, seed=3)
    local = LocalPrefill(budget_s=0.02)
    a = simulate(Split(1, 2), reqs, prof, local_prefill=local)
    assert a == simulate(Split(1, 2), reqs, prof, local_prefill=local)
    assert len(a) == 200 and all(r.completed for r in a)
    assert all(r.num_output_tokens == 20 for r in a)


def test_throughput_bound_lets_decode_workers_prefill_too():
    prof = make_profiles()
    wl = fixed_workload(1000, 2)
    off = throughput_bound(Split(1, 3), wl, prof)
    on = throughput_bound(Split(1, 3), wl, prof, LocalPrefill(budget_s=0.02))
    assert on == pytest.approx(4 * off)  # prefill-bound: all four workers may prefill, not only the one


def test_local_prefill_checks_its_numbers_and_the_sweep_passes_them_to_the_servers():
    with pytest.raises(ValueError):
        LocalPrefill(budget_s=-1.0)
    with pytest.raises(ValueError):
        LocalPrefill(threshold_tokens=-1)
    assert not NO_LOCAL_PREFILL.is_local(1, 0, make_profiles().prefill)
    cfg = SweepConfig(model="m", workload=fixed_workload(8, 8), slo=SLO(1.0, 0.1), rates=[1.0],
                      local_prefill=LocalPrefill(threshold_tokens=7, budget_s=0.03))
    routing = serve_config(cfg, P1D1).routing
    assert (routing.local_prefill_threshold_tokens, routing.local_prefill_budget_s) == (7, 0.03)
    assert serve_config(SweepConfig(model="m", workload=fixed_workload(8, 8), slo=SLO(1.0, 0.1), rates=[1.0]), P1D1).routing.local_prefill_budget_s == 0

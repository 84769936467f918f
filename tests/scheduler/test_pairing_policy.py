"""LeastLoadedPolicy: decisions under load, tie-breaks, exclusion, back-pressure, conditional disaggregation."""

from __future__ import annotations

import pytest

from splitserve.scheduler import (
    LeastLoadedPolicy,
    NoWorkerAvailable,
    PairRequest,
    PromptTooLarge,
    WorkerLoad,
    WorkerRole,
    blocks_needed,
    cached_prefix_tokens,
)

pytestmark = pytest.mark.unit

BS = 16


def load(worker_id: str, role: WorkerRole = WorkerRole.DECODE, **kw) -> WorkerLoad:
    fields = dict(num_waiting=0, num_running=0, num_free_blocks=100, num_total_blocks=100, block_size=BS)
    fields.update(kw)
    return WorkerLoad(worker_id=worker_id, role=role, **fields)


def prefill(worker_id: str, **kw) -> WorkerLoad:
    return load(worker_id, WorkerRole.PREFILL, **kw)


def both(worker_id: str, **kw) -> WorkerLoad:
    return load(worker_id, WorkerRole.BOTH, **kw)


def req(num_prompt_tokens: int = 100, **kw) -> PairRequest:
    return PairRequest(req_id="r1", num_prompt_tokens=num_prompt_tokens, max_tokens=16, **kw)


# --- helpers ---------------------------------------------------------------


@pytest.mark.parametrize("n, expected", [(1, 1), (15, 1), (16, 2), (17, 2), (31, 2), (32, 3)])
def test_blocks_needed_covers_prompt_plus_one_token(n, expected):
    assert blocks_needed(n, BS) == expected


def test_cached_prefix_stops_at_first_miss():
    held = frozenset({1, 2, 4})
    assert cached_prefix_tokens([1, 2, 3, 4], held, BS, 100) == 2 * BS
    assert cached_prefix_tokens([9, 1, 2], held, BS, 100) == 0
    assert cached_prefix_tokens([], held, BS, 100) == 0


def test_cached_prefix_is_capped_at_prompt_length():
    assert cached_prefix_tokens([1, 2], frozenset({1, 2}), BS, 20) == 20


# --- decode choice ----------------------------------------------------------


def test_picks_decode_with_most_free_capacity_and_least_queued_prefill():
    loads = [
        load("d0", num_free_blocks=10),
        load("d1", num_free_blocks=50),
        prefill("p0", num_queued_tokens=500),
        prefill("p1", num_queued_tokens=100),
    ]
    decision = LeastLoadedPolicy().pick(req(), loads)
    assert (decision.prefill_worker_id, decision.decode_worker_id) == ("p1", "d1")
    assert decision.is_remote_prefill
    assert "remote prefill" in decision.reason


def test_free_capacity_compares_tokens_across_block_sizes():
    loads = [load("d0", num_free_blocks=40, block_size=16), load("d1", num_free_blocks=30, block_size=32)]
    assert LeastLoadedPolicy().pick(req(), loads).decode_worker_id == "d1"


def test_decode_tie_breaks_on_active_then_id():
    loads = [load("d2", num_running=3), load("d1", num_running=1, num_waiting=1), load("d0", num_running=2)]
    assert LeastLoadedPolicy().pick(req(), loads).decode_worker_id == "d0"
    loads = [load("d1"), load("d0")]
    assert LeastLoadedPolicy().pick(req(), loads).decode_worker_id == "d0"


def test_prefill_tie_breaks_on_waiting_then_id():
    decoders = [load("d0")]
    loads = decoders + [prefill("p0", num_waiting=2), prefill("p1", num_waiting=1), prefill("p2", num_waiting=1)]
    assert LeastLoadedPolicy().pick(req(), loads).prefill_worker_id == "p1"


def test_skips_decode_workers_without_room_for_prompt_plus_one_token():
    # 32-token prompt needs 3 blocks of 16 (prompt + the first output token).
    loads = [load("d0", num_free_blocks=2), load("d1", num_free_blocks=3, num_running=50)]
    assert LeastLoadedPolicy().pick(req(32), loads).decode_worker_id == "d1"


def test_ignores_unhealthy_and_excluded_workers():
    loads = [
        load("d0", num_free_blocks=90, is_healthy=False),
        load("d1", num_free_blocks=80),
        load("d2", num_free_blocks=10),
        prefill("p0", is_healthy=False),
        prefill("p1", num_queued_tokens=10),
        prefill("p2", num_queued_tokens=500),
    ]
    decision = LeastLoadedPolicy().pick(req(), loads, exclude=frozenset({"d1", "p1"}))
    assert (decision.prefill_worker_id, decision.decode_worker_id) == ("p2", "d2")


def test_all_decode_full_raises_back_pressure_with_counts():
    loads = [load("d0", num_free_blocks=1), load("d1", num_free_blocks=2), prefill("p0")]
    with pytest.raises(NoWorkerAvailable) as info:
        LeastLoadedPolicy(retry_after_s=0.5).pick(req(100), loads)
    assert not isinstance(info.value, PromptTooLarge)
    message = str(info.value)
    assert "all 2 healthy decode workers are full" in message and "needs 7 blocks" in message
    assert "most free is 2 on d1" in message
    assert info.value.retry_after_s == 0.5


def test_no_healthy_decode_worker_names_counts():
    loads = [load("d0", is_healthy=False), load("d1"), prefill("p0")]
    strict = LeastLoadedPolicy(degraded_mode=False)
    with pytest.raises(NoWorkerAvailable, match="no healthy decode worker: 2 known, 1 unhealthy, 1 excluded"):
        strict.pick(req(), loads, exclude=frozenset({"d1"}))
    with pytest.raises(NoWorkerAvailable, match="0 known"):
        strict.pick(req(), [prefill("p0")])
    with pytest.raises(NoWorkerAvailable):
        LeastLoadedPolicy().pick(req(), [])


def test_no_decode_worker_and_no_prefill_worker_names_both_roles():
    loads = [load("d0", is_healthy=False), prefill("p0", is_healthy=False)]
    with pytest.raises(NoWorkerAvailable) as info:
        LeastLoadedPolicy().pick(req(), loads)
    message = str(info.value)
    assert "no healthy decode worker: 1 known, 1 unhealthy" in message
    assert "no healthy prefill worker: 1 known, 1 unhealthy" in message


def test_prompt_larger_than_any_decode_worker_is_not_retryable():
    loads = [load("d0", num_free_blocks=4, num_total_blocks=4), load("d1", num_free_blocks=0, num_total_blocks=6)]
    with pytest.raises(PromptTooLarge, match="largest decode worker \\(d1\\) has 6") as info:
        LeastLoadedPolicy().pick(req(200), loads)
    assert info.value.retry_after_s is None


def test_pick_is_deterministic_and_does_not_mutate_loads():
    loads = [load("d1"), load("d0"), prefill("p1"), prefill("p0")]
    before = [(w.worker_id, w.num_free_blocks, w.num_waiting) for w in loads]
    first = LeastLoadedPolicy().pick(req(), loads)
    assert first == LeastLoadedPolicy().pick(req(), list(reversed(loads)))
    assert before == [(w.worker_id, w.num_free_blocks, w.num_waiting) for w in loads]


# --- conditional disaggregation ---------------------------------------------


def test_no_prefill_worker_means_local_prefill():
    decision = LeastLoadedPolicy().pick(req(), [load("d0"), prefill("p0", is_healthy=False)])
    assert decision.prefill_worker_id is None and decision.decode_worker_id == "d0"
    assert "no healthy prefill worker" in decision.reason


def test_short_prompt_prefills_locally():
    policy = LeastLoadedPolicy(local_prefill_threshold_tokens=64)
    loads = [load("d0"), prefill("p0")]
    assert policy.pick(req(64), loads).prefill_worker_id is None
    assert "64 uncached prompt tokens <= threshold 64" in policy.pick(req(64), loads).reason
    assert policy.pick(req(65), loads).prefill_worker_id == "p0"


def test_default_threshold_sends_every_uncached_prompt_remote():
    assert LeastLoadedPolicy().pick(req(1), [load("d0"), prefill("p0")]).prefill_worker_id == "p0"


def test_prompt_within_the_time_budget_prefills_locally():
    # the prefill worker measured 0.1 ms per prompt token: 20 ms of budget is 200 tokens, queue included
    policy = LeastLoadedPolicy(local_prefill_budget_s=0.02)
    loads = [load("d0"), prefill("p0", prompt_s_per_token=1e-4)]
    decision = policy.pick(req(200), loads)
    assert decision.prefill_worker_id is None and decision.fallback is None  # the normal path for a short prompt
    assert "200 uncached prompt tokens (+0 queued) take ~20.0 ms here" in decision.reason and "measured on p0" in decision.reason
    assert policy.pick(req(201), loads).prefill_worker_id == "p0"
    # what the decode worker already has queued counts against the budget
    loads[0] = load("d0", num_queued_tokens=150)
    assert policy.pick(req(50), loads).prefill_worker_id is None
    assert policy.pick(req(51), loads).prefill_worker_id == "p0"


def test_time_budget_prefers_the_decode_workers_own_measurement():
    policy = LeastLoadedPolicy(local_prefill_budget_s=0.02)
    slow_here = [load("d0", prompt_s_per_token=1e-3), prefill("p0", prompt_s_per_token=1e-5)]
    assert policy.pick(req(50), slow_here).prefill_worker_id == "p0"  # 50 ms on d0, however fast p0 is
    fast_here = [load("d0", prompt_s_per_token=1e-5), prefill("p0", prompt_s_per_token=1e-3)]
    decision = policy.pick(req(1000), fast_here)
    assert decision.prefill_worker_id is None and "measured on d0" in decision.reason


def test_time_budget_needs_a_measurement_and_a_budget():
    unmeasured = [load("d0"), prefill("p0")]
    assert LeastLoadedPolicy(local_prefill_budget_s=10.0).pick(req(1), unmeasured).prefill_worker_id == "p0"
    measured = [load("d0"), prefill("p0", prompt_s_per_token=1e-6)]
    assert LeastLoadedPolicy().pick(req(1), measured).prefill_worker_id == "p0"  # budget 0: off
    with pytest.raises(ValueError, match="local_prefill_budget_s"):
        LeastLoadedPolicy(local_prefill_budget_s=-0.01)
    with pytest.raises(ValueError, match="local_prefill_budget_s"):
        LeastLoadedPolicy(local_prefill_budget_s=float("nan"))


def test_prefix_cached_on_decode_worker_makes_prefill_local():
    # 100-token prompt, 6 full blocks; the decode worker holds the first 5 -> 20 uncached tokens.
    hashes = [11, 12, 13, 14, 15, 16]
    loads = [load("d0", prefix_hashes=frozenset(hashes[:5])), prefill("p0")]
    policy = LeastLoadedPolicy(local_prefill_threshold_tokens=32)
    decision = policy.pick(req(100, block_hashes=hashes), loads)
    assert decision.prefill_worker_id is None
    assert "20 uncached prompt tokens" in decision.reason and "80 of 100 cached on d0" in decision.reason
    # A gap in the chain: only the first block counts, so 84 tokens are uncached -> remote.
    loads = [load("d0", prefix_hashes=frozenset({11, 13, 14, 15})), prefill("p0")]
    assert policy.pick(req(100, block_hashes=hashes), loads).prefill_worker_id == "p0"


def test_prefix_cached_only_on_prefill_worker_still_goes_remote():
    hashes = [1, 2, 3, 4, 5, 6]
    loads = [load("d0"), prefill("p0", prefix_hashes=frozenset(hashes))]
    decision = LeastLoadedPolicy(local_prefill_threshold_tokens=32).pick(req(100, block_hashes=hashes), loads)
    assert decision.prefill_worker_id == "p0"


def test_prefill_worker_holding_the_prefix_wins_until_its_queue_outweighs_it():
    # 1,024-token prompt = 64 full blocks; p1 caches the first 48 (768 tokens), p0 nothing.
    hashes = list(range(100, 164))
    cached = frozenset(hashes[:48])
    loads = [load("d0", num_free_blocks=1000), prefill("p0"), prefill("p1", prefix_hashes=cached, num_queued_tokens=500)]
    decision = LeastLoadedPolicy().pick(req(1024, block_hashes=hashes), loads)
    # work ahead: p0 = 0 + 1024, p1 = 500 + 256 -> p1, and the reason says why
    assert decision.prefill_worker_id == "p1"
    assert "768 prompt tokens cached there" in decision.reason
    loads[2] = prefill("p1", prefix_hashes=cached, num_queued_tokens=800)  # 800 + 256 > 1024 -> p0
    assert LeastLoadedPolicy().pick(req(1024, block_hashes=hashes), loads).prefill_worker_id == "p0"
    # without hashes on the request the cache cannot count: plain least-queued
    loads[2] = prefill("p1", prefix_hashes=cached, num_queued_tokens=1)
    assert LeastLoadedPolicy().pick(req(1024), loads).prefill_worker_id == "p0"


def test_saturation_limit_skips_a_cache_holder_that_is_over_it():
    hashes = list(range(64))
    loads = [load("d0", num_free_blocks=1000), prefill("p0", num_queued_tokens=900),
             prefill("p1", prefix_hashes=frozenset(hashes), num_queued_tokens=1200)]
    decision = LeastLoadedPolicy(max_prefill_queue_tokens=1000).pick(req(1024, block_hashes=hashes), loads)
    assert decision.prefill_worker_id == "p0"  # p1 would be cheaper but is past the limit


def test_aggregated_prefers_the_worker_caching_the_prompt():
    hashes = list(range(10, 16))  # 100 tokens: 6 full blocks
    loads = [both("a0"), both("a1", prefix_hashes=frozenset(hashes), num_queued_tokens=50)]
    decision = LeastLoadedPolicy().pick(req(100, block_hashes=hashes), loads)
    assert decision.decode_worker_id == "a1" and "96 of 100 prompt tokens cached" in decision.reason
    assert LeastLoadedPolicy().pick(req(100), loads).decode_worker_id == "a0"


def test_saturated_prefill_workers_mean_local_prefill():
    policy = LeastLoadedPolicy(max_prefill_queue_tokens=1000)
    loads = [load("d0"), prefill("p0", num_queued_tokens=1001), prefill("p1", num_queued_tokens=5000)]
    decision = policy.pick(req(), loads)
    assert decision.prefill_worker_id is None
    assert "all 2 prefill workers saturated" in decision.reason and "p0 has 1001 tokens > limit 1000" in decision.reason
    loads[1] = prefill("p0", num_queued_tokens=1000)  # at the limit is still acceptable
    assert policy.pick(req(), loads).prefill_worker_id == "p0"


def test_invalid_policy_settings_are_refused():
    with pytest.raises(ValueError, match="local_prefill_threshold_tokens"):
        LeastLoadedPolicy(local_prefill_threshold_tokens=-1)
    with pytest.raises(ValueError, match="max_prefill_queue_tokens"):
        LeastLoadedPolicy(max_prefill_queue_tokens=-5)


# --- aggregated mode --------------------------------------------------------


def test_aggregated_picks_least_loaded_both_worker():
    loads = [
        both("a0", num_queued_tokens=300, num_free_blocks=90),
        both("a1", num_queued_tokens=0, num_running=4, num_free_blocks=20),
        both("a2", num_queued_tokens=0, num_running=2, num_free_blocks=10),
    ]
    decision = LeastLoadedPolicy().pick(req(), loads)
    assert decision.prefill_worker_id is None and decision.decode_worker_id == "a2"
    assert decision.reason.startswith("aggregated")


def test_aggregated_skips_full_workers_and_raises_when_all_full():
    loads = [both("a0", num_free_blocks=1), both("a1", num_free_blocks=50, num_queued_tokens=999)]
    assert LeastLoadedPolicy().pick(req(), loads).decode_worker_id == "a1"
    with pytest.raises(NoWorkerAvailable, match="full"):
        LeastLoadedPolicy().pick(req(), [both("a0", num_free_blocks=1)])


def test_both_workers_act_as_decoders_beside_prefill_workers():
    loads = [both("a0"), prefill("p0")]
    decision = LeastLoadedPolicy().pick(req(), loads)
    assert (decision.prefill_worker_id, decision.decode_worker_id) == ("p0", "a0")

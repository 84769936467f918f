"""The policy when a role is down (degraded mode), the fallback tag on every departure, and the serving state."""

from __future__ import annotations

import pytest

from splitserve.scheduler import (
    Fallback,
    LeastLoadedPolicy,
    NoWorkerAvailable,
    PairRequest,
    WorkerLoad,
    WorkerRole,
    serving_state,
)

pytestmark = pytest.mark.unit

BS = 16


def load(worker_id: str, role: WorkerRole = WorkerRole.DECODE, **kw) -> WorkerLoad:
    fields = dict(num_waiting=0, num_running=0, num_free_blocks=100, num_total_blocks=100, block_size=BS)
    fields.update(kw)
    return WorkerLoad(worker_id=worker_id, role=role, **fields)


def prefill(worker_id: str, **kw) -> WorkerLoad:
    return load(worker_id, WorkerRole.PREFILL, **kw)


def req(num_prompt_tokens: int = 100, **kw) -> PairRequest:
    return PairRequest(req_id="r1", num_prompt_tokens=num_prompt_tokens, max_tokens=16, **kw)


def test_normal_remote_prefill_has_no_fallback():
    decision = LeastLoadedPolicy().pick(req(), [load("d0"), prefill("p0")])
    assert decision.prefill_worker_id == "p0" and decision.fallback is None


def test_no_healthy_decode_worker_makes_a_prefill_worker_serve_the_whole_request():
    loads = [load("d0", is_healthy=False), prefill("p0", num_queued_tokens=500), prefill("p1", num_queued_tokens=10)]
    decision = LeastLoadedPolicy().pick(req(), loads)
    assert (decision.prefill_worker_id, decision.decode_worker_id) == (None, "p1")  # least prefill work ahead
    assert decision.fallback is Fallback.NO_DECODE_WORKER
    assert "degraded" in decision.reason and "no healthy decode worker" in decision.reason


def test_a_dead_excluded_decode_worker_is_down_a_busy_one_is_not():
    """A stream whose decode worker died is resumed with it excluded (and marked unhealthy): the prefill worker
    takes it. A healthy decode worker excluded because it was full is busy, not down: back-pressure."""
    dead = LeastLoadedPolicy().pick(req(local_only=True), [load("d0", is_healthy=False), prefill("p0")], exclude=frozenset({"d0"}))
    assert dead.decode_worker_id == "p0" and dead.fallback is Fallback.NO_DECODE_WORKER
    with pytest.raises(NoWorkerAvailable, match="1 excluded after failures"):
        LeastLoadedPolicy().pick(req(), [load("d0"), prefill("p0")], exclude=frozenset({"d0"}))


def test_degraded_mode_skips_full_prefill_workers_and_says_so_when_all_are():
    loads = [load("d0", is_healthy=False), prefill("p0", num_free_blocks=2), prefill("p1", num_free_blocks=50)]
    assert LeastLoadedPolicy().pick(req(100), loads).decode_worker_id == "p1"
    full = [load("d0", is_healthy=False), prefill("p0", num_free_blocks=2)]
    with pytest.raises(NoWorkerAvailable, match="prefill workers that would serve in its place are full") as info:
        LeastLoadedPolicy(retry_after_s=2.0).pick(req(100), full)
    assert info.value.retry_after_s == 2.0


def test_degraded_mode_off_is_back_pressure():
    with pytest.raises(NoWorkerAvailable, match="no healthy decode worker"):
        LeastLoadedPolicy(degraded_mode=False).pick(req(), [load("d0", is_healthy=False), prefill("p0")])


def test_full_decode_workers_are_back_pressure_not_degraded_mode():
    """Degraded mode is for a missing role, not a busy one: a full decode worker means 503, not prefill doing decode."""
    with pytest.raises(NoWorkerAvailable, match="full"):
        LeastLoadedPolicy().pick(req(100), [load("d0", num_free_blocks=1), prefill("p0")])


def test_local_prefill_fallbacks_carry_their_reason():
    no_prefill = LeastLoadedPolicy().pick(req(), [load("d0"), prefill("p0", is_healthy=False)])
    assert no_prefill.prefill_worker_id is None and no_prefill.fallback is Fallback.NO_PREFILL_WORKER
    saturated = LeastLoadedPolicy(max_prefill_queue_tokens=10).pick(req(), [load("d0"), prefill("p0", num_queued_tokens=50)])
    assert saturated.prefill_worker_id is None and saturated.fallback is Fallback.PREFILL_SATURATED
    # by design, not a fallback: the decode worker caches the prompt (conditional disaggregation)
    cached = LeastLoadedPolicy(local_prefill_threshold_tokens=200).pick(req(), [load("d0"), prefill("p0")])
    assert cached.prefill_worker_id is None and cached.fallback is None


def test_local_only_request_skips_the_prefill_worker():
    decision = LeastLoadedPolicy().pick(req(local_only=True), [load("d0"), prefill("p0")])
    assert (decision.prefill_worker_id, decision.decode_worker_id) == (None, "d0")
    assert decision.fallback is None  # the caller knows why it asked, and counts it


@pytest.mark.parametrize(
    "loads, expected, words",
    [
        ([load("d0"), prefill("p0")], "ok", "1 decode and 1 prefill"),
        ([load("d0"), prefill("p0", is_healthy=False)], "degraded", "no healthy prefill worker (of 1): 1 decode workers prefill locally"),
        ([load("d0", is_healthy=False), prefill("p0")], "degraded", "no healthy decode worker: 1 prefill workers serve whole requests"),
        ([load("d0", is_healthy=False), prefill("p0", is_healthy=False)], "unavailable", "no healthy decode or prefill worker"),
        ([], "unavailable", "no healthy decode or prefill worker"),
    ],
)
def test_serving_state_names_the_missing_role(loads, expected, words):
    state = serving_state(loads, num_prefill_expected=1)
    assert state.status == expected and words in state.detail
    assert state.is_serving == (expected != "unavailable")


def test_serving_state_aggregated_and_without_degraded_mode():
    both = load("w0", WorkerRole.BOTH)
    assert serving_state([both], num_prefill_expected=0).status == "ok"
    assert serving_state([load("w0", WorkerRole.BOTH, is_healthy=False)], num_prefill_expected=0).detail == "no healthy decode worker"
    assert serving_state([load("d0", is_healthy=False), prefill("p0")], num_prefill_expected=1, degraded_mode=False).status == "unavailable"

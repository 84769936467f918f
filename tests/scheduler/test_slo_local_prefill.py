"""Rule 5 of LeastLoadedPolicy: prefill on the decode worker when the prefill queue would miss the TTFT target,
unless decoding has no room. Hand-computed waits: (queued + prompt tokens) / tokens per second."""

from __future__ import annotations

import pytest

from splitserve.scheduler import Fallback, LeastLoadedPolicy
from tests.scheduler.test_pairing_policy import load, prefill, req

pytestmark = pytest.mark.unit

SLO = LeastLoadedPolicy(ttft_target_s=3.0, itl_target_s=0.15)


def test_a_prefill_queue_past_the_ttft_target_sends_the_prompt_to_the_decode_worker():
    # remote: (2,000 queued + 1,000) / 800 tok/s = 3.75 s > 3 s; local: 1,000 / 800 = 1.25 s (rate assumed equal)
    d = SLO.pick(req(1000), [prefill("p", num_queued_tokens=2000, prefill_tokens_per_s=800.0), load("d")])
    assert (d.prefill_worker_id, d.decode_worker_id, d.fallback) == (None, "d", Fallback.SLO_LOCAL_PREFILL)
    assert "~3.8 s > TTFT target 3 s" in d.reason and "here ~1.2 s" in d.reason


@pytest.mark.parametrize("case, p_kw, d_kw", [
    # (1,000 queued + 1,000) / 800 = 2.5 s: within the target
    ("within target", dict(num_queued_tokens=1000, prefill_tokens_per_s=800.0), {}),
    # rate not measured yet: no grounds to leave the normal path
    ("unmeasured", dict(num_queued_tokens=50_000), {}),
    # local would be later: (4,000 + 1,000) / 800 = 6.25 s >= remote 3.75 s
    ("local slower", dict(num_queued_tokens=2000, prefill_tokens_per_s=800.0), dict(num_queued_tokens=4000)),
    # decoding already at 80 ms a step > half of 150 ms: its streams have no room for a prefill
    ("no decode room", dict(num_queued_tokens=2000, prefill_tokens_per_s=800.0), dict(num_running=8, decode_step_s=0.08)),
])
def test_the_normal_path_holds_when_rule_five_has_no_case(case, p_kw, d_kw):
    d = SLO.pick(req(1000), [prefill("p", **p_kw), load("d", **d_kw)])
    assert (d.prefill_worker_id, d.fallback) == ("p", None), (case, d.reason)


def test_slow_steps_without_running_streams_do_not_block_and_the_decode_workers_own_rate_is_used():
    # decode_step_s is stale when nothing runs; the decode worker's measured 400 tok/s: 1,000 / 400 = 2.5 s < 3.75 s
    loads = [prefill("p", num_queued_tokens=2000, prefill_tokens_per_s=800.0), load("d", decode_step_s=0.5, prefill_tokens_per_s=400.0)]
    d = SLO.pick(req(1000), loads)
    assert d.prefill_worker_id is None and "here ~2.5 s" in d.reason


def test_rule_five_is_off_without_targets():
    d = LeastLoadedPolicy().pick(req(1000), [prefill("p", num_queued_tokens=90_000, prefill_tokens_per_s=800.0), load("d")])
    assert d.prefill_worker_id == "p"

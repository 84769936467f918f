"""Admission by deadline through the real ingress: a request that would queue past ``routing.max_queue_wait_s``
is refused at once with 503 + Retry-After (before any worker is called), one that would not is served.

The measured drain rate and the queue are set by hand (the estimator's arithmetic is unit-tested in
``tests/scheduler/test_admission.py``); what is checked here is the wiring: the router consults the
estimator for the worker the policy picked, the refusal is back-pressure, and dispatches are counted.
"""

from __future__ import annotations

import pytest

from tests.splitserve.conftest import Stack, make_decode, make_prefill, metric_value, stop_workers

pytestmark = pytest.mark.engine

# the queue set below stays in the view; SLO-driven local prefill off, so the prefill worker's queue is what counts
STALE_VIEW = {"load_report_interval_s": 30.0, "load_max_age_s": 120.0, "slo_local_prefill": False}
# and the workers report no prompt cost until their next report (no warm-up), so the view does not drain that queue
UNMEASURED = {"warm_up_prompt_tokens": 0}


@pytest.fixture(scope="module")
def workers(aio, tiny_model):
    made = {"p": make_prefill(tiny_model, "prefill-0", **UNMEASURED), "d": make_decode(tiny_model, "decode-0", **UNMEASURED)}
    yield made
    aio.run(stop_workers(made.values()))


def slow_drain(router, worker_id: str, tokens_per_s: float) -> None:
    """Feed the estimator six busy seconds in which ``worker_id`` drained ``tokens_per_s`` (past its ``min_busy_s``)."""
    for i in range(7):
        router.admission.on_report(worker_id, 100_000 - int(i * tokens_per_s), float(i))


def test_a_request_that_would_wait_past_the_budget_is_refused_at_once(aio, workers, tiny_model):
    p, d = workers["p"], workers["d"]
    req = {"prompt": list(range(5, 45)), "max_tokens": 4, "ignore_eos": True, "temperature": 0}

    async def body():
        async with Stack(tiny_model, [p], [d], routing={**STALE_VIEW, "max_queue_wait_s": 10.0}) as s, s.client() as c:
            router = s.core.router
            slow_drain(router, "prefill-0", tokens_per_s=100.0)
            r = await c.post("/v1/completions", json=req)  # nothing queued: served
            assert r.status_code == 200, r.text

            s.core.registry.view.reserve("prefill-0", 0, 3000)  # 3,000 tokens queued ahead: 30 s at 100 tokens/s
            before = p.num_requests, d.num_requests
            for stream in (False, True):
                r = await c.post("/v1/completions", json={**req, "stream": stream})
                assert r.status_code == 503, r.text
                assert int(r.headers["retry-after"]) == 20  # 30 s estimated - 10 s budget
                message = r.json()["error"]["message"]
                assert "would start in about 30 s on prefill-0" in message and "routing.max_queue_wait_s" in message
            assert (p.num_requests, d.num_requests) == before  # refused before any worker was called
            assert metric_value(s.metrics_text(), "splitserve_requests_total", status="rejected", tenant="default") == 2
            assert (await c.get("/admin/workers")).json()["admission"]["prefill_tokens_per_s"]["prefill-0"] == 100.0

    aio.run(body())


def test_no_budget_admits_everything_and_dispatches_are_counted(aio, workers, tiny_model):
    p, d = workers["p"], workers["d"]

    async def body():
        async with Stack(tiny_model, [p], [d], routing={**STALE_VIEW, "max_queue_wait_s": None}) as s, s.client() as c:
            slow_drain(s.core.router, "prefill-0", tokens_per_s=1.0)
            s.core.registry.view.reserve("prefill-0", 0, 3000)
            r = await c.post("/v1/completions", json={"prompt": list(range(5, 45)), "max_tokens": 4, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert s.core.router.admission._drains["prefill-0"].dispatched == 40  # the prompt sent there to prefill

    aio.run(body())


def test_a_prefill_queue_past_the_ttft_target_is_served_by_the_decode_worker(aio, workers, tiny_model):
    """With the SLO rule on (the default) the same long queue sends the request to the decode worker to prefill."""
    p, d = workers["p"], workers["d"]

    async def body():
        routing = {**STALE_VIEW, "slo_local_prefill": True, "max_queue_wait_s": 10.0}
        async with Stack(tiny_model, [p], [d], routing=routing, slo={"ttft_s": 2.0}) as s, s.client() as c:
            slow_drain(s.core.router, "prefill-0", tokens_per_s=100.0)
            s.core.registry.view.reserve("prefill-0", 0, 3000)  # 30 s at 100 tokens/s > the 2 s target
            before = p.num_requests, d.num_requests
            r = await c.post("/v1/completions", json={"prompt": list(range(5, 45)), "max_tokens": 4, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert (p.num_requests, d.num_requests) == (before[0], before[1] + 1)  # prefilled and decoded on d
            assert metric_value(s.metrics_text(), "splitserve_fallbacks_total", reason="slo_local_prefill") == 1

    aio.run(body())

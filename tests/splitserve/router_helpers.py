"""What the router failure-path tests share: prompts, the module-scoped workers, per-test workers, metric and
reference helpers (test_router.py: transfers, dead replicas, back-pressure, malformed requests;
test_router_disconnects.py: clients that go away)."""

from __future__ import annotations

import random

import pytest

from tests.splitserve.conftest import Stack, collect, greedy, make_decode, make_prefill, metric_value, stop_workers


MAX_TOKENS = 16
_rng = random.Random(99)
PROMPTS = [[_rng.randrange(5, 4000) for _ in range(n)] for n in (9, 16, 33, 40)]
# the router re-polls loads this rarely: the view it routes on stays as it was at start-up
STALE_VIEW = {"routing": {"load_report_interval_s": 30.0, "load_max_age_s": 120.0}}


@pytest.fixture(scope="module")
def shared(aio, tiny_model):
    """Healthy workers shared by tests that do not change a worker (handles are per test)."""
    made = {
        "p0": make_prefill(tiny_model, "prefill-0"),
        "p1": make_prefill(tiny_model, "prefill-1"),
        "d": make_decode(tiny_model, "decode-0"),
        "both": make_decode(tiny_model, "worker-0", role="both"),
    }
    yield made
    aio.run(stop_workers(made.values()))


@pytest.fixture(autouse=True)
def cold_caches(aio, shared):
    """Each test starts with empty prefix caches: a prompt an earlier test left fully cached on the
    decode worker would be prefilled there (prefix-aware routing), not sent through the path under test."""
    async def reset():
        for w in shared.values():
            await w.reset_prefix_cache()

    aio.run(reset())


@pytest.fixture
def own(aio):
    """Workers made for one test (faults, small pools); stopped after it."""
    made = []
    yield made
    aio.run(stop_workers(made))


def held_prefill(own: list, model: str, name: str, delay_s: float, transfer_timeout_s: float):
    """A prefill worker of this test's own whose every KV transfer is held back ``delay_s``."""
    worker = make_prefill(model, name, delay_fraction=1.0, delay_s=delay_s, transfer_timeout_s=transfer_timeout_s)
    own.append(worker)
    return worker


def retries(s: Stack, reason: str) -> float:
    return metric_value(s.metrics_text(), "splitserve_request_retries_total", reason=reason) or 0.0


def routed(s: Stack, worker: str, role: str) -> float:
    return metric_value(s.metrics_text(), "splitserve_requests_routed_total", worker=worker, role=role) or 0.0


async def expect_reference(core, reference, prompts=PROMPTS, max_tokens=MAX_TOKENS) -> None:
    for prompt in prompts:
        got, chunks = await collect(core, prompt, greedy(max_tokens))
        assert got == reference.tokens(prompt, max_tokens), prompt
        assert chunks[-1].finished and chunks[-1].finish_reason == "length"

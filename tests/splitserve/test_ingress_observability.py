"""The in-process ingress's observability: /metrics and /admin/workers after real requests, and a client that
hangs up mid-stream (its request is aborted and counted). Same set-up as test_ingress_inprocess.py."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest

from tests.splitserve.conftest import Stack, metric_value
from tests.splitserve.ingress_helpers import (  # noqa: F401 - workers is a fixture
    MAX_TOKENS, PROMPTS, blocks_of, completion_body, parse_sse, stack_for, workers,
)

pytestmark = pytest.mark.engine


# ---- observability ---------------------------------------------------------------------------


async def _wait_reports_idle(s: Stack, timeout_s: float = 5.0) -> dict:
    """/admin/workers once every report shows all blocks free and nothing queued (bounded)."""
    deadline = time.monotonic() + timeout_s
    async with s.client() as c:
        while True:
            out = (await c.get("/admin/workers")).json()
            reps = out["workers"]
            idle = all(w["num_free_blocks"] == w["num_total_blocks"] and w["num_blocks_in_flight"] == 0
                       and w["num_waiting"] == 0 and w["num_running"] == 0 for w in reps)
            if idle or time.monotonic() > deadline:
                return out
            await asyncio.sleep(0.05)


def test_metrics_and_admin_workers_after_requests(aio, workers, tiny_model):
    P = workers["prefill"]
    prompts = PROMPTS[:3]

    async def body():
        # earlier tests left these prompts in the caches; a fully cached one would now (rightly) be
        # prefilled on the decode worker and move no KV, so start cold to count every transfer
        for w in workers.values():
            await w.reset_prefix_cache()
        async with stack_for(workers, tiny_model, "disaggregated") as s, s.client() as c:
            bytes_before = P.transfer_bytes
            r = await c.post("/v1/completions", json=completion_body(prompts[0]))
            assert r.status_code == 200
            r = await c.post("/v1/completions", json=completion_body(prompts[1], stream=True))
            assert r.status_code == 200 and parse_sse(r.text)
            r = await c.post("/v1/completions", json=completion_body(prompts[2], tenant="acme"))
            assert r.status_code == 200
            r = await c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 0})
            assert r.status_code == 400

            admin = await _wait_reports_idle(s)
            reps = {w["worker_id"]: w for w in admin["workers"]}
            assert set(reps) == {"prefill-0", "decode-0"}
            for w in reps.values():
                assert w["healthy"] is True
                assert w["num_free_blocks"] == w["num_total_blocks"] == 256, w
                assert w["num_blocks_in_flight"] == 0 and w["num_running"] == 0 and w["num_waiting"] == 0, w
                assert w["share"] == {"in_flight": 1.0, "requests": 1.0}, w  # the only worker of its role
            assert admin["imbalance"] == {"prefill": {"in_flight": 1.0, "requests": 1.0}, "decode": {"in_flight": 1.0, "requests": 1.0}}

            text = (await c.get("/metrics")).text
            assert metric_value(text, "splitserve_worker_imbalance", role="decode", measure="requests") == 1.0
            for name in ("splitserve_time_to_first_token_seconds", "splitserve_inter_token_latency_seconds",
                         "splitserve_kv_transfer_bytes_total", "splitserve_requests_total", "splitserve_kv_blocks_used",
                         "splitserve_queue_depth"):
                assert name in text, name
            assert metric_value(text, "splitserve_time_to_first_token_seconds_count", mode="disaggregated") == 3
            itl = metric_value(text, "splitserve_inter_token_latency_seconds_count", mode="disaggregated")
            assert 3 <= itl <= 3 * (MAX_TOKENS - 1)
            moved = sum(blocks_of(len(p)) for p in prompts) * P.agent.layout.bytes_per_block
            assert P.transfer_bytes - bytes_before == moved
            assert metric_value(text, "splitserve_kv_transfer_bytes_total") == moved > 0
            assert metric_value(text, "splitserve_kv_transfer_seconds_count") == 3
            assert metric_value(text, "splitserve_requests_total", status="ok", tenant="default") == 2
            assert metric_value(text, "splitserve_requests_total", status="ok", tenant="acme") == 1
            assert metric_value(text, "splitserve_generation_tokens_total", tenant="default") == 2 * MAX_TOKENS
            assert metric_value(text, "splitserve_prompt_tokens_total", tenant="acme") == len(prompts[2])
            for wid, role in (("prefill-0", "prefill"), ("decode-0", "decode")):
                assert metric_value(text, "splitserve_kv_blocks_used", worker=wid) == 0
                assert metric_value(text, "splitserve_kv_blocks_total", worker=wid) == 256
                assert metric_value(text, "splitserve_queue_depth", role=role, worker=wid) == 0
                assert metric_value(text, "splitserve_worker_healthy", role=role, worker=wid) == 1
            assert metric_value(text, "splitserve_requests_routed_total", worker="prefill-0", role="prefill") == 3
            assert metric_value(text, "splitserve_requests_routed_total", worker="decode-0", role="decode") == 3

    aio.run(body())


# ---- compute time per tenant ------------------------------------------------------------------

COMPUTE_TOLERANCE = 0.01  # relative: charged seconds vs the workers' busy seconds (only float rounding separates them)


@pytest.mark.parametrize("mode", ["disaggregated", "aggregated"])
def test_compute_seconds_per_tenant_add_up_to_the_workers_busy_time(aio, workers, tiny_model, mode):
    """Two tenants with different prompt lengths, concurrent and batched together: each worker's busy time is
    charged to the tenants' requests in full, and the long-prompt tenant pays more for prefill."""
    rng = random.Random(7)
    long_prompts = [[rng.randrange(5, 4000) for _ in range(120)] for _ in range(4)]
    short_prompts = [[rng.randrange(5, 4000) for _ in range(8)] for _ in range(4)]

    async def body():
        for w in workers.values():
            await w.reset_prefix_cache()  # a fully cached prompt would be prefilled on the decode worker
        async with stack_for(workers, tiny_model, mode, price_per_accelerator_hour=3.6) as s, s.client() as c:
            busy_before = {w.worker_id: w.engine.busy_s for w in s.workers}
            bodies = [completion_body(p, tenant="team-long", stream=i % 2 == 0) for i, p in enumerate(long_prompts)]
            bodies += [completion_body(p, max_tokens=40, tenant="team-short") for p in short_prompts]
            replies = await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))
            assert [r.status_code for r in replies] == [200] * len(bodies)
            text = s.metrics_text()
            busy = {w.worker_id: w.engine.busy_s - busy_before[w.worker_id] for w in s.workers}

        roles = {w.worker_id: w.role for w in s.workers}
        for role in set(roles.values()):
            worker_busy = sum(b for wid, b in busy.items() if roles[wid] == role)
            charged = {t: metric_value(text, "splitserve_compute_seconds_total", tenant=t, role=role) or 0.0 for t in ("team-long", "team-short")}
            assert worker_busy > 0 and all(v > 0 for v in charged.values()), (role, charged)
            assert sum(charged.values()) == pytest.approx(worker_busy, rel=COMPUTE_TOLERANCE), (role, charged, worker_busy)
            for t, seconds in charged.items():  # 3.6 per accelerator-hour = 0.001 per second
                assert metric_value(text, "splitserve_compute_cost_total", tenant=t, role=role) == pytest.approx(seconds / 1000)
        if mode == "disaggregated":
            prefill = {t: metric_value(text, "splitserve_compute_seconds_total", tenant=t, role="prefill") for t in ("team-long", "team-short")}
            assert prefill["team-long"] > prefill["team-short"], prefill  # 120-token prompts against 8-token ones

    aio.run(body())


# ---- a client that hangs up mid-stream ---------------------------------------------------------


async def _post_then_hang_up(app, path: str, body: dict, spec_version: str, after_events: int) -> list[bytes]:
    """Drive the ASGI app like a server would, and drop the connection after ``after_events`` SSE bodies.

    ASGI spec >= 2.4: the server's ``send`` raises ``OSError`` once the client is gone;
    before 2.4 the server's ``receive`` answers ``http.disconnect``. Starlette handles both.
    """
    raw = json.dumps(body).encode()
    gone = asyncio.Event()
    sent: list[bytes] = []
    received_request = False

    async def receive():
        nonlocal received_request
        if not received_request:
            received_request = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if gone.is_set():
            raise OSError("connection reset by peer")
        if message["type"] == "http.response.body" and message.get("body"):
            sent.append(message["body"])
            if len(sent) >= after_events:
                gone.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 50000), "server": ("test", 80),
        "headers": [(b"host", b"test"), (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
    }
    try:
        await app(scope, receive, send)
    except Exception:  # ClientDisconnect / OSError surface here, as they would to the server
        pass
    return sent


@pytest.mark.parametrize("spec_version", ["2.4", "2.3"])
def test_http_client_hanging_up_mid_stream_aborts_the_request(aio, workers, tiny_model, spec_version):
    D = workers["decode"]

    async def body():
        async with stack_for(workers, tiny_model, "disaggregated") as s:
            steps = D.aengine.num_steps
            req = completion_body(PROMPTS[3], max_tokens=2000, stream=True)
            sent = await _post_then_hang_up(s.app, "/v1/completions", req, spec_version, after_events=3)
            assert len(sent) >= 3 and all(b.startswith(b"data: {") for b in sent[:3])
            deadline = time.monotonic() + 5
            while D.engine.has_unfinished_requests() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert not D.engine.has_unfinished_requests(), "the request kept decoding after the client left"
            assert D.aengine.num_steps - steps < 500  # far from its 2000 tokens
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not metric_value(s.metrics_text(), "splitserve_requests_total", status="cancelled", tenant="default"):
                await asyncio.sleep(0.02)
            assert metric_value(s.metrics_text(), "splitserve_requests_total", status="cancelled", tenant="default") == 1

    aio.run(body())

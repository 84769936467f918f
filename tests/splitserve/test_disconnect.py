"""A client that hangs up on a non-streaming request: the request is aborted on its worker, nothing leaks.

Driven through the raw ASGI interface, as uvicorn would call the app, with a
``receive`` that reports ``http.disconnect`` a moment after the body was sent
(httpx's in-process transport cannot hang up).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.splitserve.conftest import Stack, make_decode, make_prefill, metric_value, settle, stop_workers, worker_is_idle

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def workers(aio, tiny_model):
    made = {"p": make_prefill(tiny_model, "prefill-0"), "d": make_decode(tiny_model, "decode-0")}
    yield made
    aio.run(stop_workers(made.values()))


async def post_then_hang_up(app, body: dict, hang_up_after_s: float | None) -> tuple[int | None, float]:
    """POST ``body`` to /v1/completions; the client disconnects after ``hang_up_after_s`` (None: never)."""
    raw = json.dumps(body).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
    }
    sent_body = False
    t0 = time.monotonic()
    status: list[int] = []

    async def receive() -> dict:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": raw, "more_body": False}
        # like uvicorn: a disconnect that already happened is returned at once, else wait for one
        if hang_up_after_s is None:
            await asyncio.Event().wait()  # stays connected (the app's check cancels this wait)
        left = hang_up_after_s - (time.monotonic() - t0)
        if left > 0:
            await asyncio.sleep(left)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    return (status[0] if status else None), time.monotonic() - t0


@pytest.mark.parametrize("mode", ["disaggregated", "aggregated"])
def test_hang_up_mid_generation_aborts_the_request(aio, workers, tiny_model, mode):
    p, d = workers["p"], workers["d"]
    prefill = [p] if mode == "disaggregated" else []

    async def body():
        async with Stack(tiny_model, prefill, [d], mode=mode, http={"disconnect_poll_s": 0.05}) as s:
            steps = d.aengine.num_steps
            req = {"prompt": list(range(5, 45)), "max_tokens": 3000, "ignore_eos": True, "temperature": 0}
            status, elapsed = await post_then_hang_up(s.app, req, hang_up_after_s=0.5)
            assert status == 499 and elapsed < 5, (status, elapsed)
            deadline = time.monotonic() + 5
            while not worker_is_idle(d) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert worker_is_idle(d), "the abandoned request still holds blocks"
            assert d.aengine.num_steps - steps < 1000, "it ran on towards its 3,000 tokens"
            text = s.metrics_text()
            assert metric_value(text, "splitserve_requests_total", status="cancelled", tenant="default") == 1
        await settle(s.workers)

    aio.run(body(), timeout_s=60)


def test_a_client_that_stays_gets_its_answer(aio, workers, tiny_model):
    async def body():
        async with Stack(tiny_model, [workers["p"]], [workers["d"]], http={"disconnect_poll_s": 0.05}) as s:
            req = {"prompt": list(range(5, 25)), "max_tokens": 8, "ignore_eos": True, "temperature": 0}
            task = asyncio.ensure_future(post_then_hang_up(s.app, req, hang_up_after_s=None))
            status, _ = await asyncio.wait_for(task, 30)
            assert status == 200

    aio.run(body())

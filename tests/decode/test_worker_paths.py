"""The decode worker's own safety nets, each reached on purpose: the KV-wait timeout, the reservation
reaper, the stream starting from the prefill's token, and letting go of a reservation when its stream is
cancelled (twice). (The router's own first-token check is in tests/splitserve/test_dispatch.py.)"""

from __future__ import annotations

import asyncio
import time

import pytest

from splitserve.decode.worker import KVNotArrived
from splitserve.engine.sampling_params import SamplingParams
from splitserve.worker_messages import GenerateRequest, PrefillRequest, Reservation
from tests.splitserve.conftest import make_decode, make_prefill, stop_workers, worker_is_idle

pytestmark = pytest.mark.engine

PROMPT = list(range(7, 47))  # 40 tokens: 3 blocks of 16


@pytest.fixture(scope="module")
def pair(aio, tiny_model):
    p = make_prefill(tiny_model, "prefill-0")
    d = make_decode(tiny_model, "decode-0", kv_wait_timeout_s=0.3, reservation_ttl_s=0.4)
    aio.run(p.add_peers([aio.run(d.agent_info())]))
    yield p, d
    aio.run(stop_workers([p, d]))


def request(req_id: str, prompt: list[int] = PROMPT) -> GenerateRequest:
    return GenerateRequest(req_id, list(prompt), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))


async def drain(stream) -> list:
    return [chunk async for chunk in stream]


async def wait_idle(worker, timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not worker_is_idle(worker) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return worker_is_idle(worker)


def test_kv_that_never_arrives_times_out_and_frees_the_reservation(aio, pair):
    _, d = pair

    async def run():
        stream = d.serve_prefilled(request("lost"))
        assert isinstance(await stream.__anext__(), Reservation)
        assert d.engine.num_blocks_in_flight() == 3
        failed = d.num_failed
        t0 = time.monotonic()
        with pytest.raises(KVNotArrived, match="did not arrive within 0.3 s"):
            await drain(stream)
        assert time.monotonic() - t0 < 2.0
        assert d.num_failed == failed + 1
        assert await wait_idle(d, 1.0), "the timed-out request still holds its reservation"

    aio.run(run())


def test_reaper_frees_a_reservation_nobody_claims(aio, pair):
    _, d = pair

    async def run():
        await d.reserve("orphan", len(PROMPT))  # reserved, and then nobody came
        assert "orphan" in d._reserved_at
        assert await wait_idle(d, 3.0), "the reaper never freed the unclaimed reservation"
        assert d.engine.pool.num_free_blocks == d.engine.pool.num_blocks

    aio.run(run())


def test_the_stream_starts_from_the_token_the_prefill_sampled(aio, pair):
    p, d = pair

    async def run():
        req = request("match")
        stream = d.serve_prefilled(req)
        reservation = await stream.__anext__()
        result = await p.prefill(PrefillRequest(req, "decode-0", reservation))
        chunks = await drain(stream)
        assert chunks[0].new_token_ids[0] == result.first_token and chunks[-1].finished
        assert await wait_idle(d, 1.0) and await wait_idle(p, 1.0)

    aio.run(run())


def test_a_stream_cancelled_twice_while_waiting_for_kv_still_lets_go(aio, tiny_model):
    """The worker frees the reservation itself, in a task a second cancellation cannot interrupt."""
    d = make_decode(tiny_model, "decode-cancel", kv_wait_timeout_s=30.0, reservation_ttl_s=300.0)

    async def run():
        stream = d.serve_prefilled(request("gone"))
        assert isinstance(await stream.__anext__(), Reservation)
        task = asyncio.ensure_future(drain(stream))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await wait_idle(d, 2.0), "the cancelled stream left its reservation to the 300 s reaper"

    try:
        aio.run(run())
    finally:
        aio.run(stop_workers([d]))


def test_prefix_report_is_capped_by_the_option(aio, tiny_model):
    d = make_decode(tiny_model, "decode-capped", prefix_report_max_blocks=2)

    async def run():
        await drain(d.generate(request("warm", list(range(5, 85)))))
        _, hashes = await d.prefix_summary(-1)
        assert len(hashes) == 2  # 5 full blocks cached, 2 reported

    try:
        aio.run(run())
    finally:
        aio.run(stop_workers([d]))

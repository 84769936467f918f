"""The decode worker's own safety nets, each reached on purpose: the KV-wait timeout, the reservation
reaper, the stream starting from the prefill's token, and letting go of a reservation when its stream is
cancelled (twice). (The router's own first-token check is in tests/splitserve/test_dispatch.py.)"""

from __future__ import annotations

import asyncio
import time

import pytest

from splitserve.decode.worker import KVNotArrived
from splitserve.prefill.worker import ReservationExpired
from splitserve.worker_base import WorkerBusy
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
        assert d._landings.transfer_id("orphan") is not None
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
    """The worker lets go of the reservation itself, in a task a second cancellation cannot interrupt: the blocks
    are fenced (a prefill worker may be writing into them), and the router's abort, which knows nobody was asked
    to write, frees them at once: it names the reservation by the transfer id it chose (it may never have
    received the reservation)."""
    d = make_decode(tiny_model, "decode-cancel", kv_wait_timeout_s=30.0, reservation_ttl_s=300.0)

    async def run():
        stream = d.serve_prefilled(request("gone"), None, "gone#router-chosen")
        reservation = await stream.__anext__()
        assert reservation.transfer_id == "gone#router-chosen"
        task = asyncio.ensure_future(drain(stream))
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.1)
        landing = d._landings.get(reservation.transfer_id)
        assert landing is not None and landing.fenced, "the cancelled stream neither fenced nor kept its reservation"
        assert d.engine.num_blocks_in_flight() == 3
        assert not await d.abort("gone", "gone#another-attempt")  # not this reservation: it stays fenced
        assert d.engine.num_blocks_in_flight() == 3
        assert await d.abort("gone", "gone#router-chosen")
        assert await wait_idle(d, 2.0), "the router's abort did not free the fenced reservation"

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


@pytest.fixture
def tight_pair(aio, tiny_model):
    """A decode worker with room for one 40-token prompt and one more block, and a prefill worker that knows it."""
    p = make_prefill(tiny_model, "prefill-late")
    d = make_decode(tiny_model, "decode-tight", num_kv_blocks=4, kv_wait_timeout_s=30.0, reservation_ttl_s=300.0)
    aio.run(p.add_peers([aio.run(d.agent_info())]))
    yield p, d
    aio.run(stop_workers([p, d]))


async def abandon(d, req: GenerateRequest) -> Reservation:
    """Reserve for ``req``, then leave (the client hung up) before its KV came: D lets go by itself."""
    stream = d.serve_prefilled(req)
    reservation = await stream.__anext__()
    task = asyncio.ensure_future(drain(stream))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return reservation


def test_a_write_that_lands_after_the_request_left_never_lands_in_another_requests_blocks(aio, tight_pair):
    """The request leaves while its prefill worker, which did not hear of it, still prefills: its write comes later.
    The decode worker must not have given those blocks to another request in between (they were freed at once
    before: the late write overwrote the new owner's KV)."""
    p, d = tight_pair

    async def run():
        req = request("left")
        reservation = await abandon(d, req)
        with pytest.raises(WorkerBusy):  # 1 block free: the abandoned reservation's 3 are fenced, not reusable
            await d.reserve("next", len(PROMPT))
        result = await p.prefill(PrefillRequest(req, "decode-tight", reservation))  # the late write lands
        assert result.transfer_bytes > 0
        assert await wait_idle(d, 2.0), "the write's notification did not end the fence"
        blocks = await d.reserve("next", len(PROMPT))
        assert len(blocks) == 3
        assert await d.release("next") and await wait_idle(d, 1.0)

    aio.run(run())


def test_a_prefill_worker_writes_nothing_after_write_by_and_says_so(aio, tight_pair):
    """Past the reservation's ``write_by`` the decode worker may reuse the blocks: the prefill worker refuses to
    write, and its void word ends the decode worker's fence at once."""
    p, d = tight_pair

    async def run():
        req = request("late")
        reservation = await abandon(d, req)
        expired = Reservation(reservation.num_cached_blocks, reservation.block_ids, reservation.transfer_id, time.time() - 1.0)
        sent = p.transfer_bytes
        with pytest.raises(ReservationExpired, match="expired"):
            await p.prefill(PrefillRequest(req, "decode-tight", expired))
        assert p.transfer_bytes == sent  # nothing was written
        assert await wait_idle(d, 2.0), "the void word did not end the fence"
        assert await wait_idle(p, 1.0)

    aio.run(run())

"""When a decode worker may reuse the blocks it reserved for a prefill worker's write (pure logic, no I/O)."""

from __future__ import annotations

import pytest

from splitserve.decode.kv_landings import CLOCK_MARGIN_S, Landings, LetGo
from splitserve.worker_messages import VOID_TOKEN


def test_each_reservation_of_a_request_is_its_own_transfer():
    landings = Landings()
    first = landings.open("r", now=0.0, window_s=10.0)
    with pytest.raises(ValueError, match="already has an open reservation"):
        landings.open("r", now=0.0, window_s=10.0)
    assert landings.let_go("r") == (first, LetGo.FENCE)
    second = landings.open("r", now=1.0, window_s=10.0)  # a retry on the same worker, while the first is fenced
    assert second != first and landings.transfer_id("r") == second
    # the first attempt's late notification is not the second's KV
    assert landings.notified(first, 42).fenced
    assert landings.get(second).first_token is None


def test_letting_go_before_the_kv_landed_fences_until_the_writer_reports():
    landings = Landings()
    tid = landings.open("r", now=0.0, window_s=10.0)
    assert landings.let_go("r") == (tid, LetGo.FENCE)
    assert landings.let_go("r") is None  # a second let-go (the router's abort after the stream's own) finds nothing open
    assert len(landings) == 1 and landings.expired(now=5.0) == []
    landing = landings.notified(tid, 17)  # the write completed after all: the blocks may be reused now
    assert landing.fenced and landing.first_token == 17 and len(landings) == 0


def test_a_void_word_from_the_writer_ends_a_fence_or_lets_go_at_once():
    landings = Landings()
    fenced = landings.open("a", now=0.0, window_s=10.0)
    landings.let_go("a")
    assert landings.notified(fenced, VOID_TOKEN).void and len(landings) == 0
    early = landings.open("b", now=0.0, window_s=10.0)
    landings.notified(early, VOID_TOKEN)  # P said void before anyone let go
    assert landings.let_go("b") == (early, LetGo.RELEASE)


def test_nothing_asked_or_the_write_done_releases_at_once():
    landings = Landings()
    tid = landings.open("r", now=0.0, window_s=10.0)
    assert landings.let_go("r", settled_tid=tid) == (tid, LetGo.RELEASE)
    landed = landings.open("s", now=0.0, window_s=10.0)
    landings.notified(landed, 5)
    assert landings.let_go("s") == (landed, LetGo.RELEASE)
    assert len(landings) == 0


def test_the_router_can_end_a_fence_it_knows_is_settled_but_no_other():
    landings = Landings()
    old = landings.open("r", now=0.0, window_s=10.0)
    landings.let_go("r")  # attempt 1: P was asked and has not answered
    new = landings.open("r", now=1.0, window_s=10.0)
    landings.let_go("r")  # attempt 2: fenced by the stream's own cancellation, before the router's abort came
    assert landings.unfence(new) and not landings.unfence(new)
    assert landings.get(old).fenced  # attempt 1's writer may still be writing


def test_a_fence_ends_by_itself_after_write_by_and_the_clock_margin():
    landings = Landings()
    tid = landings.open("r", now=100.0, window_s=10.0)
    landings.let_go("r")
    assert landings.expired(now=110.0 + CLOCK_MARGIN_S / 2) == []
    assert landings.expired(now=110.0 + CLOCK_MARGIN_S * 2) == [tid]
    assert landings.notified(tid, 3) is None  # a word that comes later is ignored


def test_unclaimed_reservations_are_found_by_age_fenced_ones_are_not():
    landings = Landings()
    landings.open("old", now=0.0, window_s=500.0)
    landings.open("new", now=250.0, window_s=500.0)
    landings.open("gone", now=0.0, window_s=500.0)
    landings.let_go("gone")
    assert landings.unclaimed(now=301.0, ttl_s=300.0) == ["old"]
    landings.claim("old")  # its KV landed and the sequence took the blocks
    assert landings.unclaimed(now=301.0, ttl_s=300.0) == [] and len(landings) == 2

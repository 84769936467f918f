"""KVTransferAgent and FaultInjectingAgent on real NIXL, two agents in one process:
input validation, handshake rules, empty transfers, cancellation, fault injection, close.
(The cross-process data path is covered by test_nixl_two_process.py.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import torch

from splitserve.transfer import (
    FaultInjectingAgent,
    KVLayoutMismatch,
    KVTransferAgent,
    TransferError,
    TransferStatus,
    TransferTimeout,
    make_transfer_agent,
)

pytestmark = pytest.mark.unit

SHAPE = (16, 2, 2, 4, 2, 8)  # blocks, layers, K/V, block_size, kv heads, head_dim


def wait_notifs(agent: KVTransferAgent, count: int, timeout_s: float = 5.0) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        got += agent.get_notifications()
        time.sleep(0.001)
    return got


@pytest.fixture
def pair() -> Iterator[tuple[KVTransferAgent, KVTransferAgent]]:
    """Agent ``p`` (random cache, knows ``d``) and agent ``d`` (zero cache)."""
    p = KVTransferAgent("p", torch.randn(SHAPE))
    d = KVTransferAgent("d", torch.zeros(SHAPE))
    try:
        assert p.add_peer(d.info().to_bytes()) == "d"
        yield p, d
    finally:
        p.close()
        d.close()
    assert p.num_live_handles == 0


def test_info_describes_the_registered_pool(pair: tuple[KVTransferAgent, KVTransferAgent]) -> None:
    p, _ = pair
    info = p.info()
    assert (info.worker_id, info.num_blocks, info.mem_type, info.device_id) == ("p", 16, "DRAM", 0)
    assert info.base_addr == p.kv_cache.data_ptr()
    assert info.layout == p.layout and p.layout.bytes_per_block == 2 * 2 * 4 * 2 * 8 * 4
    assert p.peers == ("d",)


@pytest.mark.parametrize(
    ("src", "dst", "peer", "match"),
    [
        ([16], [0], "d", "local block id 16 out of range \\[0, 16\\)"),
        ([-1], [0], "d", "local block id -1 out of range"),
        ([0], [16], "d", "peer 'd' block id 16 out of range \\[0, 16\\)"),
        ([0, 1], [0], "d", "2 local block ids but 1 remote"),
        ([0, 1], [3, 3], "d", "destination block ids repeat"),
        ([0.5], [0], "d", "not an int"),
        ([0], [0], "nobody", "unknown peer 'nobody'"),
    ],
)
def test_write_validates_inputs(
    pair: tuple[KVTransferAgent, KVTransferAgent], src: list, dst: list, peer: str, match: str
) -> None:
    p, _ = pair
    with pytest.raises(ValueError, match=match):
        p.write_blocks(peer, src, dst, b"")
    assert p.num_live_handles == 0


def test_read_validates_against_both_pools() -> None:
    with KVTransferAgent("small", torch.zeros(4, *SHAPE[1:])) as small, \
            KVTransferAgent("big", torch.zeros(SHAPE)) as big:
        big.add_peer(small.info())
        with pytest.raises(ValueError, match="peer 'small' block id 4 out of range \\[0, 4\\)"):
            big.read_blocks("small", [4], [0], b"")
        with pytest.raises(ValueError, match="destination block ids repeat"):
            big.read_blocks("small", [0, 1], [2, 2], b"")


def test_add_peer_is_idempotent_and_follows_restarts(pair: tuple[KVTransferAgent, KVTransferAgent]) -> None:
    p, d = pair
    assert p.add_peer(d.info()) == "d"
    # d restarts: same worker id, new NIXL metadata and pool; NIXL alone would refuse it.
    d.close()
    with KVTransferAgent("d", torch.zeros(SHAPE)) as d2:
        assert p.add_peer(d2.info()) == "d"
        handle = p.write_blocks("d", [3], [5], b"after-restart")
        p.wait(handle, 5.0)
        assert torch.equal(d2.kv_cache[5], p.kv_cache[3])
        assert wait_notifs(d2, 1) == [("p", b"after-restart")]


def test_add_peer_refuses_self_and_other_layouts(pair: tuple[KVTransferAgent, KVTransferAgent]) -> None:
    p, _ = pair
    with pytest.raises(ValueError, match="this worker itself"):
        p.add_peer(p.info())
    with KVTransferAgent("half", torch.zeros(SHAPE, dtype=torch.float16)) as other:
        with pytest.raises(KVLayoutMismatch, match="dtype: 'float32' \\(local\\) != 'float16'"):
            p.add_peer(other.info().to_bytes())
    with pytest.raises(ValueError, match="not a msgpack"):
        p.add_peer(b"\xc1")


def test_remove_peer_forgets_it(pair: tuple[KVTransferAgent, KVTransferAgent]) -> None:
    p, d = pair
    p.remove_peer("d")
    p.remove_peer("d")  # unknown peers are ignored
    assert p.peers == ()
    with pytest.raises(ValueError, match="unknown peer"):
        p.write_blocks("d", [0], [0], b"")
    assert p.add_peer(d.info()) == "d"


def test_write_then_read_back_and_async_wait(pair: tuple[KVTransferAgent, KVTransferAgent]) -> None:
    p, d = pair
    handle = p.write_blocks("d", [0, 1, 2, 9], [7, 8, 9, 1], b"w")
    assert handle.num_descs == 2 and handle.num_bytes == 4 * p.layout.bytes_per_block
    asyncio.run(p.wait_async(handle, 5.0))
    assert handle.status is TransferStatus.DONE and handle.seconds is not None
    assert torch.equal(d.kv_cache[[7, 8, 9, 1]], p.kv_cache[[0, 1, 2, 9]])
    handle = p.read_blocks("d", [7, 8], [14, 15], b"r")
    p.wait(handle, 5.0)
    assert p.poll(handle) is TransferStatus.DONE  # final status is sticky
    assert torch.equal(p.kv_cache[14:16], p.kv_cache[0:2])
    assert wait_notifs(d, 2) == [("p", b"w"), ("p", b"r")]


def test_empty_transfer_still_notifies(pair: tuple[KVTransferAgent, KVTransferAgent]) -> None:
    p, d = pair
    handle = p.write_blocks("d", [], [], b"all-cached")
    assert handle.status is TransferStatus.DONE and handle.num_bytes == 0
    assert wait_notifs(d, 1) == [("p", b"all-cached")]


def test_send_notification_needs_the_peer(pair: tuple[KVTransferAgent, KVTransferAgent]) -> None:
    p, d = pair
    with pytest.raises(ValueError, match="unknown peer 'p'"):
        d.send_notification("p", b"hello")
    d.add_peer(p.info())
    d.send_notification("p", b"hello")
    assert wait_notifs(p, 1) == [("d", b"hello")]


def test_fault_fractions_are_seeded_and_failures_move_nothing(
    pair: tuple[KVTransferAgent, KVTransferAgent],
) -> None:
    p, d = pair
    faulty = FaultInjectingAgent(p, fail_fraction=0.5, seed=7)
    outcomes = []
    for i in range(12):
        handle = faulty.write_blocks("d", [i], [i], b"%d" % i)
        outcomes.append(faulty.poll(handle) is not TransferStatus.FAILED)
        if outcomes[-1]:
            faulty.wait(handle, 5.0)
        else:
            with pytest.raises(TransferError, match="injected failure"):
                faulty.wait(handle, 5.0)
    again = FaultInjectingAgent(p, fail_fraction=0.5, seed=7)
    assert [again._rng.random() >= 0.5 for _ in range(12)] == outcomes
    assert 0 < sum(outcomes) < 12 and faulty.num_injected_failures == 12 - sum(outcomes)
    for i, ok in enumerate(outcomes):
        assert torch.equal(d.kv_cache[i], p.kv_cache[i]) is ok
    assert [m for _, m in wait_notifs(d, sum(outcomes))] == [b"%d" % i for i, ok in enumerate(outcomes) if ok]
    assert p.num_live_handles == 0


def test_delay_holds_pending_then_completes(pair: tuple[KVTransferAgent, KVTransferAgent]) -> None:
    p, d = pair
    slow = FaultInjectingAgent(p, delay_fraction=1.0, delay_s=0.3)
    handle = slow.write_blocks("d", [4], [4], b"late")
    assert slow.poll(handle) is TransferStatus.PENDING
    assert d.get_notifications() == []
    started = time.monotonic()
    slow.wait(handle, 5.0)
    assert time.monotonic() - started > 0.2
    assert torch.equal(d.kv_cache[4], p.kv_cache[4])
    handle = slow.write_blocks("d", [5], [5], b"later")
    with pytest.raises(TransferTimeout):
        asyncio.run(slow.wait_async(handle, 0.05))
    assert handle.status is TransferStatus.FAILED and p.num_live_handles == 0


def test_fault_config_is_validated(pair: tuple[KVTransferAgent, KVTransferAgent]) -> None:
    p, _ = pair
    with pytest.raises(ValueError, match="fail_fraction"):
        FaultInjectingAgent(p, fail_fraction=1.5)
    with pytest.raises(ValueError, match="<= 1"):
        FaultInjectingAgent(p, fail_fraction=0.6, delay_fraction=0.6)


def test_factory_wraps_only_when_faults_are_configured() -> None:
    plain = make_transfer_agent("plain", torch.zeros(SHAPE))
    faulty = make_transfer_agent("faulty", torch.zeros(SHAPE), fail_fraction=0.1, seed=3)
    try:
        assert type(plain) is KVTransferAgent
        assert isinstance(faulty, FaultInjectingAgent) and faulty.layout == plain.layout
    finally:
        plain.close()
        faulty.close()


def test_close_is_idempotent_and_final(pair: tuple[KVTransferAgent, KVTransferAgent]) -> None:
    p, _ = pair
    p.close()
    p.close()
    with pytest.raises(TransferError, match="closed"):
        p.write_blocks("d", [0], [0], b"")


def test_constructor_rejects_non_contiguous_pools() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        KVTransferAgent("x", torch.zeros(SHAPE).transpose(0, 1))

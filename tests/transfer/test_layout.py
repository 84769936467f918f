"""Unit tests for the pure half of the transfer layer: KVLayout, AgentInfo, coalescing."""

from __future__ import annotations

import msgpack
import pytest
import torch

from splitserve.transfer.layout import (
    PROTOCOL_VERSION,
    AgentInfo,
    KVLayout,
    KVLayoutMismatch,
    coalesce_block_runs,
)

pytestmark = pytest.mark.unit


def make_layout(**overrides: object) -> KVLayout:
    fields = dict(num_layers=12, num_kv_heads=4, head_dim=64, block_size=16, dtype="bfloat16")
    fields.update(overrides)
    return KVLayout(**fields)  # type: ignore[arg-type]


def make_info(**overrides: object) -> AgentInfo:
    fields = dict(
        worker_id="prefill-0",
        agent_metadata=b"\x00nixl-metadata\xff",
        base_addr=0x7F00_0000_1000,
        num_blocks=64,
        device_id=0,
        mem_type="DRAM",
        layout=make_layout(),
    )
    fields.update(overrides)
    return AgentInfo(**fields)  # type: ignore[arg-type]


def test_bytes_per_block() -> None:
    # 12 layers * (K, V) * 16 tokens * 4 heads * 64 dims * 2 bytes
    assert make_layout().bytes_per_block == 12 * 2 * 16 * 4 * 64 * 2 == 196608
    assert make_layout(dtype="float32").bytes_per_block == 2 * 196608


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_from_cache_matches_tensor(dtype: torch.dtype) -> None:
    kv = torch.zeros(5, 3, 2, 4, 2, 8, dtype=dtype)
    layout = KVLayout.from_cache(kv)
    assert layout == KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=str(dtype)[6:])
    assert layout.bytes_per_block * 5 == kv.numel() * kv.element_size()
    assert layout.bytes_per_block == kv[0].numel() * kv.element_size()


def test_from_cache_rejects_bad_shapes_and_dtypes() -> None:
    with pytest.raises(ValueError, match="shape"):
        KVLayout.from_cache(torch.zeros(4, 3, 4, 2, 8))
    with pytest.raises(ValueError, match="shape"):
        KVLayout.from_cache(torch.zeros(4, 3, 3, 4, 2, 8))
    with pytest.raises(ValueError, match="int8"):
        KVLayout.from_cache(torch.zeros(4, 3, 2, 4, 2, 8, dtype=torch.int8))


def test_layout_validates_fields() -> None:
    with pytest.raises(ValueError, match="num_layers"):
        make_layout(num_layers=0)
    with pytest.raises(ValueError, match="dtype"):
        make_layout(dtype="fp8")


def test_layout_dict_round_trip() -> None:
    layout = make_layout()
    assert KVLayout.from_dict(layout.to_dict()) == layout
    with pytest.raises(ValueError, match="missing"):
        KVLayout.from_dict({"num_layers": 1})


def test_compatible_layouts_pass() -> None:
    make_layout().check_compatible(make_layout())


def test_mismatch_message_names_every_differing_field() -> None:
    with pytest.raises(KVLayoutMismatch) as exc:
        make_layout().check_compatible(make_layout(num_kv_heads=8, dtype="float16"))
    message = str(exc.value)
    assert "num_kv_heads: 4 (local) != 8 (remote)" in message
    assert "dtype: 'bfloat16' (local) != 'float16' (remote)" in message
    assert "head_dim" not in message and "num_layers" not in message
    assert isinstance(exc.value, ValueError)


def test_protocol_version_mismatch_in_layout_is_refused() -> None:
    with pytest.raises(KVLayoutMismatch, match="protocol_version"):
        make_layout().check_compatible(make_layout(protocol_version=PROTOCOL_VERSION + 1))


def test_agent_info_msgpack_round_trip() -> None:
    info = make_info(mem_type="VRAM", device_id=3)
    data = info.to_bytes()
    assert isinstance(data, bytes)
    assert msgpack.unpackb(data)["protocol_version"] == PROTOCOL_VERSION
    assert AgentInfo.from_bytes(data) == info


def test_agent_info_wrong_version_is_refused() -> None:
    record = msgpack.unpackb(make_info().to_bytes())
    record["protocol_version"] = PROTOCOL_VERSION + 1
    with pytest.raises(ValueError, match="protocol version"):
        AgentInfo.from_bytes(msgpack.packb(record, use_bin_type=True))
    del record["protocol_version"]
    with pytest.raises(ValueError, match="protocol version"):
        AgentInfo.from_bytes(msgpack.packb(record, use_bin_type=True))


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1garbage", b"not msgpack at all \x00\x01", msgpack.packb([1, 2, 3]), msgpack.packb("x")],
)
def test_agent_info_garbage_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        AgentInfo.from_bytes(data)


def test_agent_info_invalid_fields_are_refused() -> None:
    record = msgpack.unpackb(make_info().to_bytes())
    record["mem_type"] = "HBM"
    with pytest.raises(ValueError, match="mem_type"):
        AgentInfo.from_bytes(msgpack.packb(record, use_bin_type=True))
    record["mem_type"] = "DRAM"
    del record["num_blocks"]
    with pytest.raises(ValueError, match="num_blocks"):
        AgentInfo.from_bytes(msgpack.packb(record, use_bin_type=True))
    with pytest.raises(ValueError, match="num_blocks"):
        make_info(num_blocks=0)


@pytest.mark.parametrize(
    ("src", "dst", "runs"),
    [
        ([], [], []),
        ([5], [9], [(5, 9, 1)]),
        ([0, 1, 2, 3], [10, 11, 12, 13], [(0, 10, 4)]),
        ([0, 1, 2, 3], [10, 11, 20, 21], [(0, 10, 2), (2, 20, 2)]),
        ([0, 2, 4], [0, 1, 2], [(0, 0, 1), (2, 1, 1), (4, 2, 1)]),
        ([3, 4, 9, 10, 11, 1], [7, 8, 0, 1, 2, 3], [(3, 7, 2), (9, 0, 3), (1, 3, 1)]),
        ([2, 1, 0], [2, 1, 0], [(2, 2, 1), (1, 1, 1), (0, 0, 1)]),  # descending never merges
    ],
)
def test_coalesce_block_runs(src: list[int], dst: list[int], runs: list[tuple[int, int, int]]) -> None:
    assert coalesce_block_runs(src, dst) == runs
    expanded = [(s + i, d + i) for s, d, n in runs for i in range(n)]
    assert expanded == list(zip(src, dst, strict=True))


def test_coalesce_rejects_length_mismatch() -> None:
    with pytest.raises(ValueError, match="3 source vs 2 destination"):
        coalesce_block_runs([1, 2, 3], [1, 2])

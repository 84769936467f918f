"""KV-cache layout, the handshake record, and block-run coalescing: pure, no NIXL.

Every worker keeps its whole KV cache in ONE contiguous tensor of shape
``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``, so block ``i`` is
the byte range ``[base + i * bytes_per_block, base + (i + 1) * bytes_per_block)``.

Lifecycle of the records here:

1. At start-up a worker derives its :class:`KVLayout` from the tensor
   (:meth:`KVLayout.from_cache`), registers the tensor with NIXL once, and publishes an
   :class:`AgentInfo` (``to_bytes``: msgpack, carrying :data:`PROTOCOL_VERSION`).
2. A peer decodes it (``AgentInfo.from_bytes`` refuses garbage and other protocol
   versions) and refuses a different layout (``KVLayout.check_compatible`` raises
   :class:`KVLayoutMismatch` naming every differing field).
3. Per request, the (source, destination) block-id lists are turned into the fewest
   byte ranges by :func:`coalesce_block_runs`; nothing is registered per request.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

if TYPE_CHECKING:
    import torch

PROTOCOL_VERSION: int = 1
"""Version of the transfer handshake and of the KV block layout it describes."""

DTYPE_ITEMSIZE: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Supported KV dtypes (torch names without the ``torch.`` prefix) and their byte size."""

MEM_TYPES: tuple[str, ...] = ("DRAM", "VRAM")

_LAYOUT_FIELDS: tuple[str, ...] = (
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "block_size",
    "dtype",
    "protocol_version",
)


class KVLayoutMismatch(ValueError):
    """Two workers' KV layouts differ, so their blocks cannot be exchanged byte for byte."""


@dataclass(frozen=True)
class KVLayout:
    """Shape of one KV block; equal layouts mean block ``i`` means the same bytes on both sides."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str
    protocol_version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "protocol_version"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if self.dtype not in DTYPE_ITEMSIZE:
            raise ValueError(
                f"KVLayout.dtype {self.dtype!r} is not supported; use one of {sorted(DTYPE_ITEMSIZE)}"
            )

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers, K and V."""
        return (
            self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim * self.itemsize
        )

    @classmethod
    def from_cache(cls, kv_cache: torch.Tensor) -> KVLayout:
        """Read the layout of a ``[num_blocks, num_layers, 2, block_size, heads, head_dim]`` tensor."""
        shape = tuple(kv_cache.shape)
        if len(shape) != 6 or shape[2] != 2:
            raise ValueError(
                "kv_cache must have shape [num_blocks, num_layers, 2, block_size, num_kv_heads, "
                f"head_dim], got {list(shape)}"
            )
        dtype = str(kv_cache.dtype).removeprefix("torch.")
        _, num_layers, _, block_size, num_kv_heads, head_dim = shape
        return cls(
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            block_size=block_size,
            dtype=dtype,
        )

    def check_compatible(self, other: KVLayout) -> None:
        """Raise :class:`KVLayoutMismatch` naming every field that differs, with both values."""
        diffs = [
            f"{name}: {getattr(self, name)!r} (local) != {getattr(other, name)!r} (remote)"
            for name in _LAYOUT_FIELDS
            if getattr(self, name) != getattr(other, name)
        ]
        if diffs:
            raise KVLayoutMismatch("KV layouts differ: " + "; ".join(diffs))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVLayout:
        if not isinstance(data, dict):
            raise ValueError(f"KVLayout.from_dict expects a dict, got {type(data).__name__}")
        missing = [name for name in _LAYOUT_FIELDS if name not in data]
        unknown = sorted(set(data) - set(_LAYOUT_FIELDS))
        if missing or unknown:
            raise ValueError(f"bad KVLayout dict: missing fields {missing}, unknown fields {unknown}")
        return cls(**data)


@dataclass
class AgentInfo:
    """What a worker publishes so that peers can reach its KV pool (the handshake record).

    ``agent_metadata`` is the opaque NIXL agent metadata (taken after the pool was
    registered); ``base_addr`` / ``device_id`` / ``mem_type`` locate the pool, and
    ``num_blocks`` bounds the block ids a peer may address.
    """

    worker_id: str
    agent_metadata: bytes
    base_addr: int
    num_blocks: int
    device_id: int
    mem_type: str
    layout: KVLayout

    def __post_init__(self) -> None:
        if not isinstance(self.worker_id, str) or not self.worker_id:
            raise ValueError(f"AgentInfo.worker_id must be a non-empty str, got {self.worker_id!r}")
        if not isinstance(self.agent_metadata, bytes) or not self.agent_metadata:
            raise ValueError("AgentInfo.agent_metadata must be non-empty bytes")
        for name in ("base_addr", "device_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"AgentInfo.{name} must be an int >= 0, got {value!r}")
        if isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or self.num_blocks <= 0:
            raise ValueError(f"AgentInfo.num_blocks must be a positive int, got {self.num_blocks!r}")
        if self.mem_type not in MEM_TYPES:
            raise ValueError(f"AgentInfo.mem_type must be one of {MEM_TYPES}, got {self.mem_type!r}")
        if not isinstance(self.layout, KVLayout):
            raise ValueError(f"AgentInfo.layout must be a KVLayout, got {type(self.layout).__name__}")

    def to_bytes(self) -> bytes:
        """msgpack encoding; the protocol version travels at the top level and in the layout."""
        return msgpack.packb(
            {
                "protocol_version": PROTOCOL_VERSION,
                "worker_id": self.worker_id,
                "agent_metadata": self.agent_metadata,
                "base_addr": self.base_addr,
                "num_blocks": self.num_blocks,
                "device_id": self.device_id,
                "mem_type": self.mem_type,
                "layout": self.layout.to_dict(),
            },
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> AgentInfo:
        """Decode :meth:`to_bytes`; ``ValueError`` on garbage or another protocol version."""
        try:
            obj = msgpack.unpackb(data, raw=False)
        except Exception as e:  # msgpack raises several unrelated exception types
            raise ValueError(f"AgentInfo.from_bytes: not a msgpack AgentInfo record: {e}") from e
        if not isinstance(obj, dict):
            raise ValueError(f"AgentInfo.from_bytes: expected a msgpack map, got {type(obj).__name__}")
        version = obj.get("protocol_version")
        if version != PROTOCOL_VERSION:
            raise ValueError(
                f"AgentInfo.from_bytes: peer speaks transfer protocol version {version!r}, this "
                f"worker speaks {PROTOCOL_VERSION}; run the same splitserve version on both sides"
            )
        fields = ("worker_id", "agent_metadata", "base_addr", "num_blocks", "device_id", "mem_type", "layout")
        missing = [name for name in fields if name not in obj]
        if missing:
            raise ValueError(f"AgentInfo.from_bytes: record lacks fields {missing}")
        try:
            layout = KVLayout.from_dict(obj["layout"])
            return cls(**{name: obj[name] for name in fields[:-1]}, layout=layout)
        except (TypeError, ValueError) as e:
            raise ValueError(f"AgentInfo.from_bytes: invalid record: {e}") from e


def coalesce_block_runs(src_ids: list[int], dst_ids: list[int]) -> list[tuple[int, int, int]]:
    """Merge pairs that advance together into ``(src_start, dst_start, length)`` runs.

    A run grows while both the next source id and the next destination id are exactly
    one more than the previous ones; order is preserved.
    """
    if len(src_ids) != len(dst_ids):
        raise ValueError(
            f"block id lists differ in length: {len(src_ids)} source vs {len(dst_ids)} destination"
        )
    runs: list[tuple[int, int, int]] = []
    for src, dst in zip(src_ids, dst_ids, strict=True):
        if runs:
            src_start, dst_start, length = runs[-1]
            if src == src_start + length and dst == dst_start + length:
                runs[-1] = (src_start, dst_start, length + 1)
                continue
        runs.append((src, dst, 1))
    return runs

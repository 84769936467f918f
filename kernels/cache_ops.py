"""KV cache writes and reads for the block-major cache layout.

The cache of a worker is one tensor ``[num_blocks, num_layers, 2, block_size,
num_kv_heads, head_dim]``: each block holds every layer's K and V for
``block_size`` consecutive tokens, so one block is one contiguous byte range
(one NIXL descriptor covers a run of blocks). A token's *slot* is
``block_id * block_size + offset``.
"""

from __future__ import annotations

import torch


def kv_cache_shape(num_blocks: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    return (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)


def write_kv(kv_cache: torch.Tensor, layer: int, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store ``key``/``value`` ([num_tokens, num_kv_heads, head_dim]) at their slots for ``layer``."""
    block_size = kv_cache.shape[3]
    block_ids = torch.div(slot_mapping, block_size, rounding_mode="floor")
    offsets = slot_mapping - block_ids * block_size
    kv_cache[block_ids, layer, 0, offsets] = key.to(kv_cache.dtype)
    kv_cache[block_ids, layer, 1, offsets] = value.to(kv_cache.dtype)


def gather_kv(
    kv_cache: torch.Tensor, layer: int, block_table: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_tokens`` cached K and V of one sequence: two [num_tokens, num_kv_heads, head_dim]."""
    blocks = kv_cache[block_table, layer]  # [n, 2, block_size, kvh, d]
    n, _, block_size, kvh, d = blocks.shape
    k = blocks[:, 0].reshape(n * block_size, kvh, d)[:num_tokens]
    v = blocks[:, 1].reshape(n * block_size, kvh, d)[:num_tokens]
    return k, v


def gather_kv_batched(
    kv_cache: torch.Tensor, layer: int, block_tables: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V for a batch of padded block tables: two [batch, max_blocks*block_size, num_kv_heads, head_dim]."""
    blocks = kv_cache[block_tables, layer]  # [b, m, 2, bs, kvh, d]
    b, m, _, block_size, kvh, d = blocks.shape
    k = blocks[:, :, 0].reshape(b, m * block_size, kvh, d)
    v = blocks[:, :, 1].reshape(b, m * block_size, kvh, d)
    return k, v

"""Slow, obviously-correct attention: the oracle the fast kernels are tested against.

Every query token attends, in float32, to the cached keys of its own sequence at
positions up to and including its own (causal), with grouped-query heads mapped
as ``kv_head = head // (num_heads // num_kv_heads)``. It reads keys and values
only from the cache, so it also checks that the KV write landed in the right slots.
"""

from __future__ import annotations

import torch

from splitserve.kernels.cache_ops import gather_kv
from splitserve.kernels.metadata import AttentionMetadata


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [H, D] against k, v [L, KVH, D] (all visible): returns [H, D] in float32."""
    num_heads, num_kv_heads = q.shape[0], k.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float32)
    for h in range(num_heads):
        kh = k[:, h // group].float()
        vh = v[:, h // group].float()
        scores = (kh @ q[h].float()) * scale
        probs = torch.softmax(scores, dim=0)
        out[h] = probs @ vh
    return out


def reference_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q [num_tokens, H, D] -> [num_tokens, H, D] (q's dtype), keys/values read from ``kv_cache``."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(meta.num_decode_tokens):
        ctx = int(meta.decode_context_lens[i])
        k, v = gather_kv(kv_cache, layer, meta.decode_block_tables[i], ctx)
        out[i] = _attend_one(q[i], k, v, scale)
    for chunk in meta.prefills:
        k, v = gather_kv(kv_cache, layer, chunk.block_table, chunk.context_len)
        first_pos = chunk.context_len - chunk.query_len
        for j in range(chunk.query_len):
            visible = first_pos + j + 1
            out[chunk.token_start + j] = _attend_one(q[chunk.token_start + j], k[:visible], v[:visible], scale)
    return out.to(q.dtype)

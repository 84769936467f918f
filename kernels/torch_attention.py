"""Attention on any torch device via ``scaled_dot_product_attention`` (the CPU path).

Prefill chunks that start at position 0 attend over their own fresh K/V with a
causal mask (no cache read). Chunks that continue after cached tokens (chunked
prefill, prefix-cache hits) gather their keys from the cache and use a shifted
causal mask. Decodes are batched: gather each sequence's blocks into a padded
tensor and mask by context length.

Grouped-query heads are never expanded: prefill passes ``enable_gqa`` to SDPA,
and a decode folds each KV head's group of query heads into the query-length
axis (a decode has one query token, so the group's heads become ``group`` query
rows that share that KV head, with no causal structure between them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.kernels.cache_ops import gather_kv, gather_kv_batched
from splitserve.kernels.metadata import AttentionMetadata


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata, scale: float, out: torch.Tensor
) -> None:
    for chunk in meta.prefills:
        s, n = chunk.token_start, chunk.query_len
        qs = q[s : s + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if chunk.context_len == n:
            ks, vs, mask = k[s : s + n], v[s : s + n], None
        else:
            ks, vs = gather_kv(kv_cache, layer, chunk.block_table, chunk.context_len)
            first = chunk.context_len - n
            q_pos = torch.arange(first, first + n, device=q.device).unsqueeze(1)
            mask = torch.arange(chunk.context_len, device=q.device).unsqueeze(0) <= q_pos
        ks = ks.to(q.dtype).transpose(0, 1).unsqueeze(0)  # [1, KVH, ctx, D]
        vs = vs.to(q.dtype).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None and n > 1, scale=scale, enable_gqa=True)
        out[s : s + n] = o[0].transpose(0, 1)


def decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata, scale: float, out: torch.Tensor
) -> None:
    nd = meta.num_decode_tokens
    if nd == 0:
        return
    max_len = meta.max_decode_context_len
    tables = meta.decode_block_tables[:, : -(-max_len // meta.block_size)]
    k, v = gather_kv_batched(kv_cache, layer, tables)  # [B, L, KVH, D], L padded to whole blocks
    if nd == 1:  # one sequence: cut at its length, no mask needed
        k, v, mask = k[:, :max_len], v[:, :max_len], None
    else:
        valid = torch.arange(k.shape[1], device=q.device).unsqueeze(0) < meta.decode_context_lens.unsqueeze(1)
        mask = valid.view(nd, 1, 1, -1)
    _, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    qd = q[:nd].reshape(nd, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, KVH, group, D]
    o = F.scaled_dot_product_attention(qd, k.to(q.dtype).transpose(1, 2), v.to(q.dtype).transpose(1, 2), attn_mask=mask, scale=scale)
    out[:nd] = o.reshape(nd, num_heads, head_dim)


def torch_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q [T, H, D], fresh k/v [T, KVH, D] (already written to the cache) -> [T, H, D]."""
    out = torch.empty_like(q)
    decode_attention(q, kv_cache, layer, meta, scale, out)
    prefill_attention(q, k, v, kv_cache, layer, meta, scale, out)
    return out

"""Attention on any torch device via ``scaled_dot_product_attention`` (the CPU path).

Prefill chunks that start at position 0 attend over their own fresh K/V with a
causal mask (no cache read). Chunks that continue after cached tokens (chunked
prefill, prefix-cache hits) gather their keys from the cache and use a shifted
causal mask. Decodes are batched: gather each sequence's blocks into a padded
tensor and mask by context length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.kernels.cache_ops import gather_kv, gather_kv_batched
from splitserve.kernels.metadata import AttentionMetadata


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, KVH, Lk, D] -> [B, H, Lq, D] with grouped-query heads."""
    if k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata, scale: float, out: torch.Tensor
) -> None:
    for chunk in meta.prefills:
        s, n = chunk.token_start, chunk.query_len
        qs = q[s : s + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        if chunk.context_len == n:
            ks = k[s : s + n].transpose(0, 1).unsqueeze(0)
            vs = v[s : s + n].transpose(0, 1).unsqueeze(0)
            o = _sdpa(qs, ks, vs, scale, mask=None, is_causal=n > 1)
        else:
            kc, vc = gather_kv(kv_cache, layer, chunk.block_table, chunk.context_len)
            ks = kc.transpose(0, 1).unsqueeze(0).to(q.dtype)
            vs = vc.transpose(0, 1).unsqueeze(0).to(q.dtype)
            first = chunk.context_len - n
            q_pos = torch.arange(first, first + n).unsqueeze(1)
            k_pos = torch.arange(chunk.context_len).unsqueeze(0)
            mask = (k_pos <= q_pos).to(q.device)
            o = _sdpa(qs, ks, vs, scale, mask=mask, is_causal=False)
        out[s : s + n] = o[0].transpose(0, 1)


def decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata, scale: float, out: torch.Tensor
) -> None:
    nd = meta.num_decode_tokens
    if nd == 0:
        return
    max_blocks = (meta.max_decode_context_len + meta.block_size - 1) // meta.block_size
    tables = meta.decode_block_tables[:, :max_blocks]
    kc, vc = gather_kv_batched(kv_cache, layer, tables)  # [B, L, KVH, D]
    length = kc.shape[1]
    positions = torch.arange(length, device=q.device).unsqueeze(0)
    mask = (positions < meta.decode_context_lens.unsqueeze(1)).view(nd, 1, 1, length)
    qd = q[:nd].unsqueeze(2)  # [B, H, 1, D]
    o = _sdpa(qd, kc.transpose(1, 2).to(q.dtype), vc.transpose(1, 2).to(q.dtype), scale, mask=mask, is_causal=False)
    out[:nd] = o.squeeze(2)


def torch_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q [T, H, D], fresh k/v [T, KVH, D] (already written to the cache) -> [T, H, D]."""
    out = torch.empty_like(q)
    decode_attention(q, kv_cache, layer, meta, scale, out)
    prefill_attention(q, k, v, kv_cache, layer, meta, scale, out)
    return out

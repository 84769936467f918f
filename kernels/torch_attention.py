"""Attention on any torch device via ``scaled_dot_product_attention`` (the CPU path).

Prefill chunks that start at position 0 attend over their own fresh K/V with a
causal mask (no cache read). Chunks that continue after cached tokens (chunked
prefill, prefix-cache hits) gather their keys from the cache and use a shifted
causal mask. Decodes on a CPU read the cache in place through the native kernels
of ``cpu_decode_attention`` where they built; otherwise they are batched: gather
each sequence's blocks into a padded tensor and mask by context length; few or
short decodes go through SDPA, many long ones through two batched GEMMs that
treat a sequence's keys as one matrix (``_decode_by_gemm``).

Grouped-query heads are never expanded: prefill passes ``enable_gqa`` to SDPA,
and a decode through SDPA folds each KV head's group of query heads into the
query-length axis (a decode has one query token, so the group's heads become
``group`` query rows that share that KV head, with no causal structure between them).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from splitserve.kernels import cpu_decode_attention
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


# Decodes run as two batched GEMMs (``_decode_by_gemm``) when a step has at least this many of them reading at least
# this many padded context tokens in all, on a CPU (measured only there); otherwise through SDPA, whose one fused
# call costs less than the GEMM path's extra ops. Engine step time, GEMMs / SDPA, in one process alternating (SmolLM2-135M, bf16, 2 CPUs;
# docs/benchmarks.md, 2026-12-02 night): 0.66-0.76x at 16-32 sequences of ~1,030 tokens, 0.83x at 16 of ~520,
# 0.90-1.03x at 32 of ~260 and 0.98-1.04x at 8 of ~1,030 (~8,192 tokens), 1.04-1.15x at 8-16 of ~260.
GEMM_DECODE_MIN_SEQS = 8
GEMM_DECODE_MIN_CONTEXT_TOKENS = 8192


@functools.cache
def gemm_decode_pays(dtype: torch.dtype) -> bool:
    """Whether the GEMM path can win for ``dtype``: not for bf16 where oneDNN has no bf16 kernel (CPUs without AVX-512),
    as torch's fallback bf16 GEMM made it 10x slower than SDPA there (8 sequences of 1,024 tokens, SmolLM2's heads)."""
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


@functools.lru_cache(maxsize=16)
def _head_slots(num_heads: int, num_kv_heads: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[H, KVH, 1]: 1 where query head h reads KV head h // group, else 0 (built once per shape, read-only)."""
    group = num_heads // num_kv_heads
    slots = torch.zeros(num_heads, num_kv_heads, 1, dtype=dtype, device=device)
    heads = torch.arange(num_heads, device=device)
    slots[heads, heads // group] = 1
    return slots


def _decode_by_gemm(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D] against padded k, v [B, L, KVH, D] (positions >= context_lens masked) -> [B, H, D].

    A sequence's gathered keys are one [L, KVH * D] matrix. Each query head is widened
    to KVH * D with zeros outside its own KV head's D columns, so its scores are
    K @ q_wide (the zero columns add exact zeros) and its output is the columns of its
    own KV head in probs @ V. That does KVH times the multiply-adds, but decode
    attention is bound by reading K and V, which two GEMMs read in place; SDPA's CPU
    kernel loops over small tiles per head. Scores leave the GEMM in q's dtype (in
    bf16 as in transformers' eager attention; measured on SmolLM2, decode logits stay
    as close to float32 transformers' as with SDPA); scaling, masking and softmax run
    in float32, and the probabilities enter the second GEMM in q's dtype.
    """
    batch, length, num_kv_heads, head_dim = k.shape
    num_heads = q.shape[1]
    width = num_kv_heads * head_dim
    k, v = k.to(q.dtype), v.to(q.dtype)  # no-ops unless a float32 step reads a bf16 cache
    wide_q = q.unsqueeze(2) * _head_slots(num_heads, num_kv_heads, q.dtype, q.device)
    # keys as the GEMM's long side, [L, W] @ [W, H]: oneDNN runs that ~1.5x faster than [H, W] @ [W, L]
    scores = torch.bmm(k.reshape(batch, length, width), wide_q.view(batch, num_heads, width).transpose(1, 2))
    scores = scores.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format).mul_(scale)
    padding = torch.arange(length, device=q.device).unsqueeze(0) >= context_lens.unsqueeze(1)
    scores.masked_fill_(padding.unsqueeze(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    wide_out = torch.bmm(probs, v.reshape(batch, length, width))
    # head h = (kv, j) keeps the columns of its own KV head: the diagonal of the two KVH axes
    wide_out = wide_out.view(batch, num_kv_heads, num_heads // num_kv_heads, num_kv_heads, head_dim)
    return wide_out.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(batch, num_heads, head_dim)


def decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata, scale: float, out: torch.Tensor
) -> None:
    nd = meta.num_decode_tokens
    if nd == 0:
        return
    if q.device.type == "cpu" and cpu_decode_attention.serves(kv_cache):
        out[:nd] = cpu_decode_attention.paged_decode_attention(q, kv_cache, layer, meta, scale)
        return
    max_len = meta.max_decode_context_len
    tables = meta.decode_block_tables[:, : -(-max_len // meta.block_size)]
    k, v = gather_kv_batched(kv_cache, layer, tables)  # [B, L, KVH, D], L padded to whole blocks
    if q.device.type == "cpu" and nd >= GEMM_DECODE_MIN_SEQS and nd * k.shape[1] >= GEMM_DECODE_MIN_CONTEXT_TOKENS and gemm_decode_pays(q.dtype):
        out[:nd] = _decode_by_gemm(q[:nd], k, v, meta.decode_context_lens, scale)
        return
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

"""FlashAttention path for CUDA (optional ``gpu`` extra).

Prefill chunks run through ``flash_attn_varlen_func`` over the paged cache (the
block table addresses the cache directly, so cached prefixes and chunk
continuations need no gather); decodes run through ``flash_attn_with_kvcache``.
flash-attn's paged kernels need the block size to be a multiple of 256, which
``EngineConfig`` checks when this backend is selected. Same inputs and outputs as
``torch_attention``; tested against ``reference_attention`` when a GPU is present.
"""

from __future__ import annotations

import torch

from splitserve.kernels.metadata import AttentionMetadata

FLASH_BLOCK_SIZE_MULTIPLE = 256


def flash_attn_available(device: torch.device | str) -> bool:
    if torch.device(device).type != "cuda":
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q [T, H, D] (fresh k/v already written into ``kv_cache``) -> [T, H, D]."""
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    k_cache = kv_cache[:, layer, 0]  # [num_blocks, block_size, KVH, D], last dim contiguous
    v_cache = kv_cache[:, layer, 1]
    out = torch.empty_like(q)
    nd = meta.num_decode_tokens
    if nd:
        o = flash_attn_with_kvcache(
            q[:nd].unsqueeze(1),
            k_cache,
            v_cache,
            cache_seqlens=meta.decode_context_lens.to(torch.int32),
            block_table=meta.decode_block_tables.to(torch.int32),
            softmax_scale=scale,
            causal=True,
        )
        out[:nd] = o.squeeze(1)
    if meta.prefills:
        device = q.device
        q_lens = [c.query_len for c in meta.prefills]
        k_lens = [c.context_len for c in meta.prefills]
        cu_q = torch.tensor([0] + q_lens, device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        cu_k = torch.tensor([0] + k_lens, device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        max_blocks = max(len(c.block_table) for c in meta.prefills)
        tables = torch.zeros((len(meta.prefills), max_blocks), dtype=torch.int32, device=device)
        for i, c in enumerate(meta.prefills):
            tables[i, : len(c.block_table)] = c.block_table.to(torch.int32)
        o = flash_attn_varlen_func(
            q[nd:],
            k_cache,
            v_cache,
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            max_seqlen_q=max(q_lens),
            max_seqlen_k=max(k_lens),
            softmax_scale=scale,
            causal=True,
            block_table=tables,
        )
        out[nd:] = o
    return out

"""Batch-invariant attention: a token's output depends only on its query and its sequence's keys.

Used in deterministic mode. Fast kernels (SDPA, flash-attn) choose their internal
blocking from the number of query rows and keys in the call, so the same token
gets slightly different numbers alone, in a batch, as a decode or inside a prefill
chunk, and a near-tie in greedy decoding can flip. Here every token, whatever path
computes it, goes through the same arithmetic:

- keys are read from the cache (the step's own K/V are already written there) in
  fixed tiles of ``TILE`` positions aligned at position 0;
- the products are float32 batched GEMMs with the tile and the head dimension as
  the fixed dimensions and the queries as columns: ``K[TILE, D] @ Q^T[D, N]`` and
  ``V^T[D, TILE] @ P^T[TILE, N]``. A column's result does not depend on how many
  columns share the call once there are at least ``min_columns()`` of them (the
  GEMM library switches to a different kernel for a few columns), so calls with
  fewer are padded with zero columns; the threshold is probed once per shape;
- the softmax runs along each row of ``[N, TILE]`` scores (a reduction of fixed
  length), and tiles combine in order with an online softmax. A tile past a token's
  position is fully masked: its update multiplies by exp(0) = 1 and adds exact
  zeros, so computing more tiles than a token needs changes nothing. A prefill
  chunk therefore skips them (rows grouped by their own tile), a decode batch
  does not.

A decode and a prefill row of the same token therefore get the same bits, so the
batch, chunking, prefix-cache hits and local or remote prefill do not matter.
The cost against SDPA (float32, transposes, a loop over tiles) is in docs/benchmarks.md.
"""

from __future__ import annotations

import functools

import torch

from splitserve.kernels.cache_ops import gather_kv, gather_kv_batched
from splitserve.kernels.metadata import AttentionMetadata

TILE = 256  # key positions per tile; fixed, so that every path tiles a sequence the same way
_CANDIDATE_MIN_COLUMNS = (16, 32, 64, 128)


@functools.lru_cache(maxsize=None)
def min_columns(head_dim: int, device: torch.device = torch.device("cpu")) -> int:
    """Fewest query columns for which both products give every column the same bits as in any wider call."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(3, TILE, head_dim, generator=g).to(device)
    q = torch.randn(3, head_dim, 900, generator=g).to(device)
    vt = torch.randn(3, head_dim, TILE, generator=g).to(device)
    p = torch.rand(3, TILE, 900, generator=g).to(device)
    full_s, full_o = torch.bmm(k, q), torch.bmm(vt, p)
    for n_min in _CANDIDATE_MIN_COLUMNS:
        widths = (n_min, n_min + 1, n_min + 3, 2 * n_min + 5, 257, 768)
        same = all(
            torch.equal(torch.bmm(k, q[:, :, o : o + n].contiguous()), full_s[:, :, o : o + n])
            and torch.equal(torch.bmm(vt, p[:, :, o : o + n].contiguous()), full_o[:, :, o : o + n])
            for n in widths for o in (0, 3)
        )
        if same:
            return n_min
    raise ValueError(
        f"deterministic: true cannot be honoured here: no batch-invariant attention GEMM for head_dim {head_dim} on {device} "
        "(checked at start-up); run with deterministic: false"
    )


def _keys_and_values(k: torch.Tensor, v: torch.Tensor, num_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., L, KVH, D] K and V -> float32 tiles, zero past L: keys [..., KVH, tiles, TILE, D], values
    transposed [..., KVH, tiles, D, TILE]; contiguous, so every product reads one layout. One strided copy
    (with the cast) per tile, no intermediate tensors."""
    *lead, length, kvh, d = k.shape
    length = min(length, num_tiles * TILE)
    keys = k.new_empty((*lead, kvh, num_tiles, TILE, d), dtype=torch.float32)
    values = v.new_empty((*lead, kvh, num_tiles, d, TILE), dtype=torch.float32)
    for t in range(num_tiles):
        a, b = t * TILE, min(length, (t + 1) * TILE)
        keys[..., t, : b - a, :].copy_(k[..., a:b, :, :].transpose(-3, -2))
        values[..., t, :, : b - a].copy_(v[..., a:b, :, :].permute(*range(len(lead)), -2, -1, -3))
        if b - a < TILE:
            keys[..., t, b - a :, :].zero_()
            values[..., t, :, b - a :].zero_()
    return keys, values


class _ColumnSoftmax:
    """Online softmax over tiles for query columns: running max and normaliser [..., N], output^T [..., D, N]."""

    def __init__(self, lead: tuple[int, ...], num_columns: int, head_dim: int, device: torch.device):
        self.m = torch.full((*lead, num_columns), float("-inf"), device=device)
        self.l = torch.zeros((*lead, num_columns), device=device)
        self.acc = torch.zeros((*lead, head_dim, num_columns), device=device)

    def add(self, keys: torch.Tensor, values_t: torch.Tensor, queries_t: torch.Tensor, scale: float, masked: torch.Tensor) -> None:
        """keys [..., TILE, D], values_t [..., D, TILE], queries_t [..., D, N]; masked broadcasts to [..., N, TILE]."""
        scores = torch.matmul(keys, queries_t).transpose(-1, -2).contiguous().mul_(scale)  # [..., N, TILE]
        scores.masked_fill_(masked, float("-inf"))
        m_new = torch.maximum(self.m, scores.amax(-1))
        correction = torch.exp(self.m - m_new)
        probs = torch.exp(scores - m_new.unsqueeze(-1))
        self.l = self.l * correction + probs.sum(-1)
        self.acc = self.acc * correction.unsqueeze(-2) + torch.matmul(values_t, probs.transpose(-1, -2).contiguous())
        self.m = m_new

    def result(self) -> torch.Tensor:
        """[..., N, D]"""
        return (self.acc / self.l.unsqueeze(-2)).transpose(-1, -2)


def _padded_columns(q: torch.Tensor, n_min: int) -> torch.Tensor:
    """[..., D, N] -> [..., D, max(N, n_min)], zero columns appended."""
    n = q.shape[-1]
    if n >= n_min:
        return q.contiguous()
    return torch.cat([q, q.new_zeros(*q.shape[:-1], n_min - n)], dim=-1)


def _decode(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata, scale: float, out: torch.Tensor) -> None:
    nd = meta.num_decode_tokens
    if nd == 0:
        return
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_tiles = -(-meta.max_decode_context_len // TILE)
    width = -(-meta.max_decode_context_len // meta.block_size)
    k, v = gather_kv_batched(kv_cache, layer, meta.decode_block_tables[:, :width])  # [B, L, KVH, D]
    num_kv_heads = k.shape[2]
    group = num_heads // num_kv_heads
    kt, vt = _keys_and_values(k, v, num_tiles)  # [B, KVH, tiles, TILE, D], [B, KVH, tiles, D, TILE]
    qt = q[:nd].float().reshape(nd, num_kv_heads, group, head_dim).transpose(-1, -2)  # [B, KVH, D, G]
    qt = _padded_columns(qt, min_columns(head_dim, q.device))
    state = _ColumnSoftmax((nd, num_kv_heads), qt.shape[-1], head_dim, q.device)
    positions = torch.arange(TILE, device=q.device)
    for t in range(num_tiles):
        masked = (positions + t * TILE).unsqueeze(0) >= meta.decode_context_lens.unsqueeze(1)  # [B, TILE]
        state.add(kt[:, :, t], vt[:, :, t], qt, scale, masked[:, None, None, :])
    out[:nd] = state.result()[:, :, :group].reshape(nd, num_heads, head_dim).to(out.dtype)


def _prefill(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata, scale: float, out: torch.Tensor) -> None:
    num_heads, head_dim = q.shape[1], q.shape[2]
    for chunk in meta.prefills:
        first = chunk.context_len - chunk.query_len  # position of the chunk's first query token
        k, v = gather_kv(kv_cache, layer, chunk.block_table, chunk.context_len)  # [ctx, KVH, D]
        num_kv_heads = k.shape[1]
        group = num_heads // num_kv_heads
        kt, vt = _keys_and_values(k, v, -(-chunk.context_len // TILE))  # [KVH, tiles, TILE, D], [KVH, tiles, D, TILE]
        rows = q[chunk.token_start : chunk.token_start + chunk.query_len].float()
        pos = first
        while pos < chunk.context_len:  # rows grouped by the tile their own position falls in
            tile = pos // TILE
            end = min(chunk.context_len, (tile + 1) * TILE)
            n = end - pos
            group_q = rows[pos - first : end - first].reshape(n, num_kv_heads, group, head_dim)
            qt = _padded_columns(group_q.permute(1, 3, 0, 2).reshape(num_kv_heads, head_dim, n * group), min_columns(head_dim, q.device))
            state = _ColumnSoftmax((num_kv_heads,), qt.shape[-1], head_dim, q.device)
            col_pos = torch.arange(pos, end, device=q.device).repeat_interleave(group)  # each column's token position
            col_pos = torch.cat([col_pos, col_pos.new_full((qt.shape[-1] - col_pos.shape[0],), end - 1)])  # padding: any valid position
            for t in range(tile + 1):
                masked = torch.arange(t * TILE, (t + 1) * TILE, device=q.device).unsqueeze(0) > col_pos.unsqueeze(1)  # [N, TILE]
                state.add(kt[:, t], vt[:, t], qt, scale, masked)
            o = state.result()[:, : n * group].reshape(num_kv_heads, n, group, head_dim).permute(1, 0, 2, 3)
            start = chunk.token_start + pos - first
            out[start : start + n] = o.reshape(n, num_heads, head_dim).to(out.dtype)
            pos = end


def invariant_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D]; the step's own k/v are already in the cache and read from there."""
    out = torch.empty_like(q)
    _decode(q, kv_cache, layer, meta, scale, out)
    _prefill(q, kv_cache, layer, meta, scale, out)
    return out

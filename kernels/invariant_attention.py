"""Batch-invariant attention: a token's output depends only on its query and its sequence's keys.

Used in deterministic mode. Fast kernels (SDPA, flash-attn) choose their internal
blocking from the number of query rows and keys in the call, so the same token
gets slightly different numbers alone, in a batch, as a decode or inside a prefill
chunk, and a near-tie in greedy decoding can flip. Here every token, whatever path
computes it, goes through exactly the same arithmetic:

- keys are read from the cache (the step's own K/V are already written there) in
  fixed tiles of ``TILE`` positions aligned at position 0;
- each tile's scores and weighted values are products of fixed shape per (token,
  KV head): ``[group, head_dim] @ [head_dim, TILE]`` and ``[group, TILE] @ [TILE,
  head_dim]``, in float32, so the GEMM kernel never sees a shape that depends on
  the batch (batched matmuls compute each item alike whatever the batch count);
- tiles combine in order with an online softmax. A tile past a token's position is
  fully masked: its update multiplies by exp(0) = 1 and adds exact zeros, so
  computing more tiles than a token needs changes nothing. A prefill chunk
  therefore skips them (rows grouped by their own tile), a decode batch does not.

The cost against SDPA is the Python loop over tiles (a few small ops per tile and
layer) and float32 products; ``docs/benchmarks.md`` has the measured figures.
"""

from __future__ import annotations

import torch

from splitserve.kernels.cache_ops import gather_kv, gather_kv_batched
from splitserve.kernels.metadata import AttentionMetadata

TILE = 256  # key positions per tile; fixed, so that every path tiles a sequence the same way


class _OnlineSoftmax:
    """Running max, normaliser and weighted sum for rows of shape [..., group]."""

    def __init__(self, shape: tuple[int, ...], head_dim: int, device: torch.device):
        self.m = torch.full(shape, float("-inf"), device=device)
        self.l = torch.zeros(shape, device=device)
        self.acc = torch.zeros(*shape, head_dim, device=device)

    def add(self, scores: torch.Tensor, values: torch.Tensor) -> None:
        """scores [..., group, TILE] (masked entries -inf), values [..., TILE, head_dim] broadcastable."""
        m_new = torch.maximum(self.m, scores.amax(-1))
        correction = torch.exp(self.m - m_new)
        probs = torch.exp(scores - m_new.unsqueeze(-1))
        self.l = self.l * correction + probs.sum(-1)
        self.acc = self.acc * correction.unsqueeze(-1) + probs @ values
        self.m = m_new

    def result(self) -> torch.Tensor:
        return self.acc / self.l.unsqueeze(-1)


def _tiles(x: torch.Tensor, num_tiles: int, keys: bool) -> torch.Tensor:
    """[..., L, KVH, D] -> contiguous float32 tiles, zero-padded (finite) past L: keys as
    [..., KVH, tiles, D, TILE] (already transposed for q @ k), values as [..., KVH, tiles, TILE, D].

    Every product then reads contiguous operands of one layout: a transposed view would
    send some calls (a single row) to a different GEMM path than others."""
    length = x.shape[-3]
    pad = num_tiles * TILE - length
    x = x.float()
    if pad > 0:
        x = torch.cat([x, x.new_zeros(*x.shape[:-3], pad, *x.shape[-2:])], dim=-3)
    x = x[..., : num_tiles * TILE, :, :]
    lead, (kvh, d) = x.shape[:-3], x.shape[-2:]
    x = x.reshape(*lead, num_tiles, TILE, kvh, d)  # [..., tiles, TILE, KVH, D]
    order = (-2, -4, -1, -3) if keys else (-2, -4, -3, -1)
    dims = tuple(range(len(lead))) + tuple(x.dim() + o for o in order)
    return x.permute(*dims).contiguous()


def _decode(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata, scale: float, out: torch.Tensor) -> None:
    nd = meta.num_decode_tokens
    if nd == 0:
        return
    lens = meta.decode_context_lens
    num_tiles = -(-meta.max_decode_context_len // TILE)
    width = -(-meta.max_decode_context_len // meta.block_size)
    k, v = gather_kv_batched(kv_cache, layer, meta.decode_block_tables[:, :width])  # [B, L, KVH, D]
    kt, vt = _tiles(k, num_tiles, keys=True), _tiles(v, num_tiles, keys=False)  # [B, KVH, tiles, D, TILE], [B, KVH, tiles, TILE, D]
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k.shape[2]
    qg = q[:nd].float().reshape(nd, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, KVH, G, D]
    state = _OnlineSoftmax(qg.shape[:-1], head_dim, q.device)
    positions = torch.arange(TILE, device=q.device)
    for t in range(num_tiles):
        scores = (qg @ kt[:, :, t]) * scale  # [B, KVH, G, TILE]
        masked = (positions + t * TILE).unsqueeze(0) >= lens.unsqueeze(1)  # [B, TILE]
        scores = scores.masked_fill(masked[:, None, None, :], float("-inf"))
        state.add(scores, vt[:, :, t])
    out[:nd] = state.result().reshape(nd, num_heads, head_dim).to(out.dtype)


def _prefill(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata, scale: float, out: torch.Tensor) -> None:
    num_heads, head_dim = q.shape[1], q.shape[2]
    for chunk in meta.prefills:
        first = chunk.context_len - chunk.query_len  # position of the chunk's first query token
        k, v = gather_kv(kv_cache, layer, chunk.block_table, chunk.context_len)  # [ctx, KVH, D]
        num_kv_heads = k.shape[1]
        num_tiles = -(-chunk.context_len // TILE)
        kt, vt = _tiles(k, num_tiles, keys=True).unsqueeze(0), _tiles(v, num_tiles, keys=False).unsqueeze(0)  # [1, KVH, tiles, ...]
        rows = q[chunk.token_start : chunk.token_start + chunk.query_len].float()
        qg = rows.reshape(chunk.query_len, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [n, KVH, G, D]
        # rows grouped by the tile their own position falls in: a group needs key tiles 0..that tile only
        pos = first
        while pos < chunk.context_len:
            tile = pos // TILE
            end = min(chunk.context_len, (tile + 1) * TILE)
            group = qg[pos - first : end - first]
            state = _OnlineSoftmax(group.shape[:-1], head_dim, q.device)
            row_pos = torch.arange(pos, end, device=q.device).unsqueeze(1)
            for t in range(tile + 1):
                scores = (group @ kt[:, :, t]) * scale  # [rows, KVH, G, TILE]
                masked = torch.arange(t * TILE, (t + 1) * TILE, device=q.device).unsqueeze(0) > row_pos  # [rows, TILE]
                scores = scores.masked_fill(masked[:, None, None, :], float("-inf"))
                state.add(scores, vt[:, :, t])
            start = chunk.token_start + pos - first
            out[start : start + end - pos] = state.result().reshape(end - pos, num_heads, head_dim).to(out.dtype)
            pos = end


def invariant_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q [T, H, D] -> [T, H, D]; the step's own k/v are already in the cache and read from there."""
    out = torch.empty_like(q)
    _decode(q, kv_cache, layer, meta, scale, out)
    _prefill(q, kv_cache, layer, meta, scale, out)
    return out

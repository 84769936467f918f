"""Batch-invariant attention: accurate, and bit-identical for a token however it is computed.

A token's output must not depend on the batch: alone or beside longer and shorter
decodes, as a decode or as a row of a prefill chunk, in one chunk or split at any
point (chunked prefill, prefix-cache hits).
"""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import AttentionMetadata, PrefillChunk, kv_cache_shape, reference_attention, write_kv
from splitserve.kernels.invariant_attention import TILE, invariant_attention
from tests.kernels.test_attention import HEADS, LAYER, NUM_LAYERS, SCENARIOS, build_step

pytestmark = pytest.mark.unit

BLOCK = 16


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"gqa{h[0] // h[1]}")
def test_matches_reference(scenario, dtype, heads):
    step = build_step(**SCENARIOS[scenario](BLOCK), num_heads=heads[0], num_kv_heads=heads[1], head_dim=16, block_size=BLOCK, dtype=dtype)
    scale = 16**-0.5
    ref = reference_attention(step.q, step.kv_cache, LAYER, step.meta, scale)
    out = invariant_attention(step.q, step.k, step.v, step.kv_cache, LAYER, step.meta, scale)
    assert out.dtype == dtype and torch.isfinite(out).all()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out.float(), ref.float(), **tol)


class Cache:
    """Three sequences' K/V written into shuffled blocks; metadata for any way of computing their tokens."""

    def __init__(self, lengths: list[int], num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        g = torch.Generator().manual_seed(0)
        num_blocks = sum(-(-n // BLOCK) for n in lengths) + 2
        order = torch.randperm(num_blocks, generator=g).tolist()
        self.kv = torch.zeros(kv_cache_shape(num_blocks, NUM_LAYERS, BLOCK, num_kv_heads, head_dim), dtype=dtype)
        self.tables, self.q = [], []
        for n in lengths:
            table, order = order[: -(-n // BLOCK)], order[-(-n // BLOCK) :]
            self.tables.append(torch.tensor(table))
            slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)])
            write_kv(self.kv, LAYER, torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype),
                     torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype), slots)
            self.q.append(torch.randn(n, num_heads, head_dim, generator=g).to(dtype))
        self.scale = head_dim**-0.5

    def run(self, decodes: list[tuple[int, int]], prefills: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """decodes: (seq, position); prefills: (seq, first, last+1). Returns per-token outputs in that order."""
        qs = [self.q[s][p : p + 1] for s, p in decodes] + [self.q[s][a:b] for s, a, b in prefills]
        q = torch.cat(qs)
        tables = lens = None
        max_len = 0
        if decodes:
            max_len = max(p + 1 for _, p in decodes)
            width = max(len(self.tables[s]) for s, _ in decodes)
            tables = torch.zeros(len(decodes), width, dtype=torch.int64)
            for i, (s, _) in enumerate(decodes):
                tables[i, : len(self.tables[s])] = self.tables[s]
            lens = torch.tensor([p + 1 for _, p in decodes])
        chunks, start = [], len(decodes)
        for s, a, b in prefills:
            chunks.append(PrefillChunk(start, b - a, b, self.tables[s][: -(-b // BLOCK)]))
            start += b - a
        meta = AttentionMetadata(BLOCK, torch.zeros(q.shape[0], dtype=torch.int64), len(decodes), tables, lens, chunks, max_len)
        out = invariant_attention(q, None, None, self.kv, LAYER, meta, self.scale)
        return list(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", [(9, 3), (4, 4)], ids=["gqa3", "mha"])
def test_a_token_is_computed_alike_on_every_path(dtype, heads):
    n = 2 * TILE + 100  # the tokens of interest span three tiles
    cache = Cache([n, 40, 3 * TILE + 7], *heads, 16, dtype)
    whole = torch.stack(cache.run([], [(0, 0, n)]))
    for cut in ([TILE - 1, TILE, 2 * TILE + 5], [17, 300, 301, 555], [n - 1]):  # chunked prefill / prefix-cache hits
        bounds = [0, *cut, n]
        rows = [r for a, b in zip(bounds, bounds[1:]) for r in cache.run([], [(0, a, b)])]
        assert torch.equal(torch.stack(rows), whole), f"chunked at {cut}"
    batched = cache.run([], [(2, 0, 3 * TILE + 7), (0, 0, n), (1, 0, 40)])  # beside other prompts in one step
    assert torch.equal(torch.stack(batched[3 * TILE + 7 : 3 * TILE + 7 + n]), whole)
    for p in (0, 5, TILE - 1, TILE, n - 1):
        alone = cache.run([(0, p)], [])[0]
        beside = cache.run([(1, 39), (0, p), (2, 3 * TILE + 6)], [(1, 0, 10)])[1]  # longer and shorter decodes, and a prefill
        assert torch.equal(alone, whole[p]) and torch.equal(beside, whole[p]), f"decode of position {p}"

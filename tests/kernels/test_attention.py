"""Attention kernels against ``reference_attention`` over a paged, block-major KV cache.

Every case writes K/V through ``write_kv`` into a cache whose blocks are handed
out in shuffled order and whose unused slots hold garbage (so a read past a
sequence's context or through a wrong block id shows up), then compares the
kernel with the reference, which reads K/V only from the cache. The reference is
in turn checked against dense causal attention on the raw K/V tensors.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import pytest
import torch

from splitserve.kernels import (
    AttentionMetadata,
    PrefillChunk,
    flash_attention,
    flash_attn_available,
    gather_kv,
    gather_kv_batched,
    kv_cache_shape,
    reference_attention,
    torch_attention,
    write_kv,
)
from splitserve.kernels import cpu_decode_attention
from splitserve.kernels.torch_attention import GEMM_DECODE_MIN_CONTEXT_TOKENS, GEMM_DECODE_MIN_SEQS

torch_attention_module = importlib.import_module("splitserve.kernels.torch_attention")  # the package exports the function

pytestmark = [pytest.mark.unit]

NUM_LAYERS = 3
LAYER = 1  # not 0, so a kernel that ignores ``layer`` reads the wrong K/V

# (num_cached, num_new) per sequence; num_new == 1 with decode=True goes in the decode section.
SCENARIOS = {
    # context 1, contexts ending exactly on a block boundary (bs, 2bs), one past it, one short of 3bs
    "decodes": lambda bs: dict(decodes=[0, bs - 1, 2 * bs - 1, bs, 3 * bs - 2, 36], prefills=[]),
    "prefill_from_zero": lambda bs: dict(decodes=[], prefills=[(0, 1), (0, bs), (0, 2 * bs + 3), (0, 5)]),
    "chunk_after_cache": lambda bs: dict(decodes=[], prefills=[(bs, 5), (bs + 3, bs), (2 * bs, 2 * bs), (7, 1)]),
    "mixed": lambda bs: dict(decodes=[4, bs - 1, 2 * bs + 2], prefills=[(0, 9), (bs + 2, 6), (bs, bs)]),
    # enough decodes over enough context for the batched-GEMM path (GEMM_DECODE_MIN_*): one long sequence beside short
    # ones, so most of each padded row is masked; with and without prefill chunks beside them
    "many_decodes": lambda bs: dict(decodes=[0, bs - 1, 2 * bs - 1, bs, 3 * bs - 2, 36, 5, 2000, 1, 2 * bs + 7], prefills=[]),
    "many_decodes_mixed": lambda bs: dict(decodes=[3, bs, 2 * bs - 1, 7, 3 * bs + 1, 1100, 0, 2 * bs], prefills=[(0, 9), (bs + 2, 6)]),
}
# (num_heads, num_kv_heads): GQA group sizes 1, 2 and 4
HEADS = [(4, 4), (4, 2), (4, 1)]
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@dataclass
class Step:
    q: torch.Tensor  # [T, H, D], packed: decodes first, then prefill chunks
    k: torch.Tensor  # [T, KVH, D] fresh keys of this step
    v: torch.Tensor
    kv_cache: torch.Tensor
    meta: AttentionMetadata
    full_k: list[torch.Tensor]  # per sequence, every context token's key (cached + fresh), in sequence order
    full_v: list[torch.Tensor]
    spans: list[tuple[int, int, int]]  # per sequence: (token_start, num_cached, num_new)


def build_step(
    decodes: list[int], prefills: list[tuple[int, int]], *, num_heads: int, num_kv_heads: int, head_dim: int,
    block_size: int, dtype: torch.dtype, seed: int = 0,
) -> Step:
    """Random q/k/v for one packed step; cached K/V and this step's fresh K/V written via ``write_kv``.

    ``decodes`` lists the number of cached tokens before each decode token.
    """
    g = torch.Generator().manual_seed(seed)
    seqs = [(c, 1) for c in decodes] + list(prefills)
    blocks_per_seq = [math.ceil((c + n) / block_size) for c, n in seqs]
    num_blocks = sum(blocks_per_seq) + 3  # a few spare blocks that nobody owns
    order = torch.randperm(num_blocks, generator=g).tolist()
    # garbage everywhere: slots nobody wrote must never be read
    kv_cache = (torch.randn(kv_cache_shape(num_blocks, NUM_LAYERS, block_size, num_kv_heads, head_dim), generator=g) * 50).to(dtype)

    tables, full_k, full_v = [], [], []
    slots_new: list[int] = []
    q_parts, k_parts, v_parts, spans = [], [], [], []
    token_start = 0
    for (cached, new), n_blocks in zip(seqs, blocks_per_seq):
        table, order = order[:n_blocks], order[n_blocks:]
        tables.append(torch.tensor(table, dtype=torch.int64))
        ctx = cached + new
        ks = torch.randn(ctx, num_kv_heads, head_dim, generator=g).to(dtype)
        vs = torch.randn(ctx, num_kv_heads, head_dim, generator=g).to(dtype)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(ctx)])
        if cached:  # an earlier step wrote these
            write_kv(kv_cache, LAYER, ks[:cached], vs[:cached], slots[:cached])
        slots_new += slots[cached:].tolist()
        full_k.append(ks)
        full_v.append(vs)
        q_parts.append(torch.randn(new, num_heads, head_dim, generator=g).to(dtype))
        k_parts.append(ks[cached:])
        v_parts.append(vs[cached:])
        spans.append((token_start, cached, new))
        token_start += new

    q, k, v = torch.cat(q_parts), torch.cat(k_parts), torch.cat(v_parts)
    slot_mapping = torch.tensor(slots_new, dtype=torch.int64)
    write_kv(kv_cache, LAYER, k, v, slot_mapping)

    nd = len(decodes)
    decode_tables = decode_lens = None
    max_ctx = 0
    if nd:
        lens = [c + 1 for c in decodes]
        max_ctx = max(lens)
        width = math.ceil(max_ctx / block_size) + 1  # one extra padding column, like a reused buffer
        decode_tables = torch.zeros(nd, width, dtype=torch.int64)  # padded with block 0, which someone owns
        for i in range(nd):
            decode_tables[i, : len(tables[i])] = tables[i]
        decode_lens = torch.tensor(lens, dtype=torch.int64)
    chunks = [PrefillChunk(spans[i][0], spans[i][2], spans[i][1] + spans[i][2], tables[i]) for i in range(nd, len(seqs))]
    meta = AttentionMetadata(
        block_size=block_size, slot_mapping=slot_mapping, num_decode_tokens=nd, decode_block_tables=decode_tables,
        decode_context_lens=decode_lens, prefills=chunks, max_decode_context_len=max_ctx,
    )
    return Step(q, k, v, kv_cache, meta, full_k, full_v, spans)


def dense_causal(step: Step, scale: float) -> torch.Tensor:
    """Attention from the raw K/V tensors (no cache), float32, with an explicit causal mask."""
    out = torch.empty(step.q.shape, dtype=torch.float32)
    group = step.q.shape[1] // step.k.shape[1]
    for (start, cached, new), ks, vs in zip(step.spans, step.full_k, step.full_v):
        q = step.q[start : start + new].float().transpose(0, 1)  # [H, new, D]
        kk = ks.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, ctx, D]
        vv = vs.float().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (q @ kk.transpose(1, 2)) * scale
        q_pos = torch.arange(cached, cached + new).unsqueeze(1)
        k_pos = torch.arange(cached + new).unsqueeze(0)
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        out[start : start + new] = (scores.softmax(-1) @ vv).transpose(0, 1)
    return out


@pytest.fixture(params=["native", "torch"])
def decode_path(request, monkeypatch):
    """CPU decodes through the native paged kernels (where they built) and through torch's gather-then-attend path
    (its GEMM variant for the scenarios with enough decodes, whichever dtypes it is chosen for on this CPU)."""
    if request.param == "native":
        if not cpu_decode_attention.serves(torch.zeros(kv_cache_shape(1, 1, 8, 1, 16))):
            pytest.skip("native CPU kernels not built here")
    else:
        monkeypatch.setattr(cpu_decode_attention, "serves", lambda kv_cache: False)
        monkeypatch.setattr(torch_attention_module, "gemm_decode_pays", lambda dtype: True)
    return request.param


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"gqa{h[0] // h[1]}")
@pytest.mark.parametrize("head_dim", [64, 16])
@pytest.mark.parametrize("block_size", [16, 8])
def test_torch_attention_matches_reference(scenario, dtype, heads, head_dim, block_size, decode_path):
    num_heads, num_kv_heads = heads
    step = build_step(**SCENARIOS[scenario](block_size), num_heads=num_heads, num_kv_heads=num_kv_heads,
                      head_dim=head_dim, block_size=block_size, dtype=dtype)
    scale = head_dim**-0.5
    ref = reference_attention(step.q, step.kv_cache, LAYER, step.meta, scale)
    out = torch_attention(step.q, step.k, step.v, step.kv_cache, LAYER, step.meta, scale)
    assert out.dtype == dtype and out.shape == step.q.shape
    assert torch.isfinite(out).all()
    # tolerances: fp32 1e-5; bf16 2e-2 (outputs are O(1), bf16 keeps 8 mantissa bits: one ulp is ~4e-3)
    torch.testing.assert_close(out.float(), ref.float(), **TOLERANCE[dtype])


def test_many_decode_scenarios_take_the_gemm_path():
    for name in ("many_decodes", "many_decodes_mixed"):
        for block_size in (8, 16):
            decodes = SCENARIOS[name](block_size)["decodes"]
            assert len(decodes) >= GEMM_DECODE_MIN_SEQS
            assert len(decodes) * (max(decodes) + 1) >= GEMM_DECODE_MIN_CONTEXT_TOKENS


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"gqa{h[0] // h[1]}")
def test_reference_matches_dense_attention(scenario, heads):
    """The oracle itself: reading through shuffled blocks equals attention on the raw tensors."""
    step = build_step(**SCENARIOS[scenario](8), num_heads=heads[0], num_kv_heads=heads[1], head_dim=16, block_size=8,
                      dtype=torch.float32, seed=3)
    ref = reference_attention(step.q, step.kv_cache, LAYER, step.meta, 0.25)
    torch.testing.assert_close(ref, dense_causal(step, 0.25), atol=1e-5, rtol=1e-5)


def test_output_depends_on_every_visible_key_and_no_later_one():
    """A prefill chunk after cached tokens: changing a cached key changes later outputs, never earlier ones."""
    step = build_step([], [(8, 8)], num_heads=2, num_kv_heads=1, head_dim=16, block_size=8, dtype=torch.float32)
    out = torch_attention(step.q, step.k, step.v, step.kv_cache, LAYER, step.meta, 0.25)
    # move the key of the 4th new token (position 11) far away
    block = int(step.meta.prefills[0].block_table[1])
    step.kv_cache[block, LAYER, 0, 3] += 10.0
    out2 = torch_attention(step.q, step.k, step.v, step.kv_cache, LAYER, step.meta, 0.25)
    assert torch.equal(out[:3], out2[:3]), "tokens before position 11 must not see its key"
    assert not torch.allclose(out[3:], out2[3:]), "tokens at or after position 11 must see it"


def test_other_layers_untouched_by_write():
    step = build_step([5], [(0, 9)], num_heads=4, num_kv_heads=2, head_dim=16, block_size=8, dtype=torch.float32)
    before = step.kv_cache.clone()
    write_kv(step.kv_cache, LAYER, step.k + 1, step.v + 1, step.meta.slot_mapping)
    changed = (before != step.kv_cache).any(dim=(2, 3, 4, 5))  # [num_blocks, num_layers]
    assert changed[:, LAYER].any()
    assert not changed[:, [i for i in range(NUM_LAYERS) if i != LAYER]].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_tokens", [1, 7, 8, 9, 24])
def test_gather_kv_returns_what_write_kv_stored(dtype, num_tokens):
    block_size, kvh, d = 8, 2, 4
    g = torch.Generator().manual_seed(num_tokens)
    cache = torch.randn(kv_cache_shape(10, NUM_LAYERS, block_size, kvh, d), generator=g).to(dtype)
    table = torch.randperm(10, generator=g)[: math.ceil(num_tokens / block_size)]
    slots = torch.tensor([int(table[p // block_size]) * block_size + p % block_size for p in range(num_tokens)])
    k = torch.randn(num_tokens, kvh, d, generator=g)  # float32 in, stored as the cache dtype
    v = torch.randn(num_tokens, kvh, d, generator=g)
    write_kv(cache, LAYER, k, v, slots)
    gk, gv = gather_kv(cache, LAYER, table, num_tokens)
    assert gk.shape == (num_tokens, kvh, d) and gk.dtype == dtype
    assert torch.equal(gk, k.to(dtype)) and torch.equal(gv, v.to(dtype))
    # batched gather with a padded table returns the same tokens first
    padded = torch.cat([table, torch.zeros(2, dtype=table.dtype)]).unsqueeze(0)
    bk, bv = gather_kv_batched(cache, LAYER, padded)
    assert bk.shape == (1, padded.shape[1] * block_size, kvh, d)
    assert torch.equal(bk[0, :num_tokens], gk) and torch.equal(bv[0, :num_tokens], gv)


@pytest.mark.skipif(not flash_attn_available("cuda" if torch.cuda.is_available() else "cpu"),
                    reason="needs CUDA and the flash-attn package")
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"gqa{h[0] // h[1]}")
def test_flash_attention_matches_reference(scenario, heads):
    block_size = 256
    spec = SCENARIOS[scenario](block_size)
    step = build_step(**spec, num_heads=heads[0], num_kv_heads=heads[1], head_dim=64, block_size=block_size, dtype=torch.bfloat16)
    scale = 64**-0.5
    ref = reference_attention(step.q, step.kv_cache, LAYER, step.meta, scale)
    meta = step.meta
    cuda_meta = AttentionMetadata(
        block_size=block_size, slot_mapping=meta.slot_mapping.cuda(), num_decode_tokens=meta.num_decode_tokens,
        decode_block_tables=None if meta.decode_block_tables is None else meta.decode_block_tables.cuda(),
        decode_context_lens=None if meta.decode_context_lens is None else meta.decode_context_lens.cuda(),
        prefills=[PrefillChunk(c.token_start, c.query_len, c.context_len, c.block_table.cuda()) for c in meta.prefills],
        max_decode_context_len=meta.max_decode_context_len,
    )
    out = flash_attention(step.q.cuda(), step.k.cuda(), step.v.cuda(), step.kv_cache.cuda(), LAYER, cuda_meta, scale)
    torch.testing.assert_close(out.cpu().float(), ref.float(), atol=2e-2, rtol=2e-2)

"""Decode attention on the CPU, read from the paged KV cache in place (``splitserve_decode_*`` in ``cpu_native.c``).

torch's path (``torch_attention.decode_attention``) first copies each decoding sequence's K and V
blocks into padded tensors (two ``index_select``s per layer), then runs SDPA or two batched GEMMs over
the copies. Here one native call computes the scores where K lies (scale * q . K, -inf past each
sequence's length), torch's softmax normalises them, and a second call sums probs * V where V lies.
Arithmetic is float32 throughout (q, the scores, the probabilities and the sums); the caller rounds the
output once to the activations' dtype.

Used for CPU decodes over a bf16 or float32 cache with ``head_dim`` a multiple of 16 up to 256, once the
library built (``cpu_native``) and the kernels matched a float64 reference on random paged caches (one
and several sequences, lengths around block edges, grouped heads, one and two threads). The block
tables and lengths come from the model runner, which builds them from the block pool; the native code
reads them as given.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

from splitserve.kernels import cpu_native
from splitserve.kernels.cache_ops import gather_kv, kv_cache_shape
from splitserve.kernels.metadata import AttentionMetadata

MAX_HEAD_DIM = 256  # MAX_HEAD_VECTORS * 16 in the C code
_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p

KernelPair = tuple[Callable[..., None], Callable[..., None]]


def _pair(lib: ctypes.CDLL, suffix: str) -> KernelPair:
    scores = cpu_native.entry_point(lib, f"splitserve_decode_scores_{suffix}", [_PTR] * 5 + [_I64] * 9 + [ctypes.c_float, ctypes.c_int])
    values = cpu_native.entry_point(lib, f"splitserve_decode_values_{suffix}", [_PTR] * 5 + [_I64] * 9 + [ctypes.c_int])
    return scores, values


def _run(pair: KernelPair, q: torch.Tensor, kv_cache: torch.Tensor, layer: int, tables: torch.Tensor, lens: torch.Tensor,
         max_len: int, scale: float, threads: int) -> torch.Tensor:
    scores_fn, values_fn = pair
    _, num_layers, _, block_size, kv_heads, head_dim = kv_cache.shape
    batch, heads, _ = q.shape
    q = q.float().contiguous()
    tables, lens = tables.contiguous(), lens.contiguous()
    shape = (batch, heads, kv_heads, head_dim, tables.shape[1], max_len, layer, num_layers, block_size)
    scores = torch.empty(batch, heads, max_len)
    scores_fn(q.data_ptr(), kv_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(), scores.data_ptr(), *shape, scale, threads)
    probs = torch.softmax(scores, dim=-1)
    out = torch.empty(batch, heads, head_dim)
    values_fn(probs.data_ptr(), kv_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(), out.data_ptr(), *shape, threads)
    return out


def check_kernels(pair: KernelPair, dtype: torch.dtype) -> None:
    """Raise ``AssertionError`` unless ``pair`` matches a float64 reference (gathered K and V, explicit softmax)
    within 1e-4 on random paged caches."""
    gen = torch.Generator().manual_seed(0)
    block_size, num_blocks, num_layers = 16, 24, 2
    cases = ((1, 3, 3, 64, [1], 1), (3, 6, 2, 16, [15, 16, 17], 2), (2, 4, 4, 32, [40, 7], 2), (4, 9, 3, 64, [33, 1, 64, 50], 1))
    for batch, heads, kv_heads, head_dim, lengths, threads in cases:
        cache = torch.randn(kv_cache_shape(num_blocks, num_layers, block_size, kv_heads, head_dim), generator=gen).to(dtype)
        max_blocks = -(-max(lengths) // block_size) + 1  # one padding column, as the runner pads
        tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:max_blocks] for _ in range(batch)])
        lens = torch.tensor(lengths, dtype=torch.int64)
        q = torch.randn(batch, heads, head_dim, generator=gen)
        got = _run(pair, q, cache, 1, tables, lens, max(lengths), 0.125, threads)
        for s, n in enumerate(lengths):
            k, v = gather_kv(cache, 1, tables[s], n)
            k = k.double().repeat_interleave(heads // kv_heads, dim=1)  # [n, H, D]
            v = v.double().repeat_interleave(heads // kv_heads, dim=1)
            probs = torch.softmax(torch.einsum("hd,nhd->hn", q[s].double(), k) * 0.125, dim=-1)
            ref = torch.einsum("hn,nhd->hd", probs, v)
            err = (got[s].double() - ref).abs().max().item()
            assert err <= 1e-4, f"{dtype} cache, {heads}/{kv_heads} heads, length {n}: error {err:.3g}"


@functools.cache
def _kernels(dtype: torch.dtype) -> KernelPair | None:
    return cpu_native.checked_kernels(
        lambda lib: _pair(lib, _SUFFIX[dtype]), lambda pair: check_kernels(pair, dtype), f"CPU decode attention kernel for {dtype} caches",
        "torch's path serves",
    )


def serves(kv_cache: torch.Tensor) -> bool:
    """Whether ``paged_decode_attention`` handles decodes over this cache."""
    head_dim = kv_cache.shape[-1]
    return (
        kv_cache.device.type == "cpu" and kv_cache.dtype in _SUFFIX and kv_cache.is_contiguous()
        and head_dim % 16 == 0 and head_dim <= MAX_HEAD_DIM and _kernels(kv_cache.dtype) is not None
    )


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The step's decodes (its first ``meta.num_decode_tokens`` rows of ``q`` [T, H, D]) attending over their cached
    tokens: float32 [num_decodes, H, D]. Only for a cache ``serves`` accepted."""
    nd, max_len = meta.num_decode_tokens, meta.max_decode_context_len
    tables = meta.decode_block_tables
    if tables.shape[0] < nd or tables.shape[1] * kv_cache.shape[3] < max_len:
        raise ValueError(f"block tables {tuple(tables.shape)} do not cover {nd} decodes of up to {max_len} tokens")
    return _run(_kernels(kv_cache.dtype), q[:nd], kv_cache, layer, tables[:nd], meta.decode_context_lens[:nd], max_len, scale, torch.get_num_threads())

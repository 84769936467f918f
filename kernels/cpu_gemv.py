"""Decode steps' matrix-vector products on the CPU (``splitserve_gemv_bf16`` in ``cpu_native.c``).

A decode step of a few sequences multiplies each weight matrix by as many rows of bf16 activations:
it reads every weight once and is bound by memory bandwidth. oneDNN's bf16 kernel (``Linear``'s path
for every other step) streams a SmolLM2-135M's weights at ~13-15 GB/s there against ~41 GB/s of read
bandwidth on the 2-core machines measured; the native kernel at ~22 GB/s for one row, ~20 for two and
~16 for three (docs/benchmarks.md). From four rows on, oneDNN's kernel is as fast or faster, and it
serves them. On CPUs where oneDNN has no bf16 kernel (without AVX-512: torch falls back to a slower
bf16 GEMM), this one serves every row count: it reads each weight once per four rows, in chunks
that stay in cache across the row groups, and is 1.1-3.5x faster than torch's there.

Before first use the kernel is checked against a float32 reference on small cases (one to seven rows, a
length that is not a multiple of 16, a bias, several threads). Not built (``cpu_native``) or a wrong
result: it is not used, the log says why once, and ``Linear`` keeps oneDNN.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

from splitserve.kernels import cpu_native

GEMV_MAX_ROWS = 3  # rows of activations Linear sends here beside oneDNN's bf16 kernel, which is as fast or faster from 4 on

GemvFn = Callable[..., None]


def _call(fn: GemvFn, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, threads: int) -> torch.Tensor:
    x = x.contiguous()
    (m, k), n = x.shape, weight.shape[0]
    y = torch.empty(m, n, dtype=torch.bfloat16)
    if fn(weight.data_ptr(), None if bias is None else bias.data_ptr(), x.data_ptr(), y.data_ptr(), m, k, n, threads) != 0:
        raise MemoryError(f"gemv_bf16: no memory for {m} x {k} float32 activations")
    return y


def check_kernel(fn: GemvFn) -> None:
    """Raise ``AssertionError`` unless ``fn`` agrees with a float32 reference: within bf16's rounding of the
    result plus float32 reordering of the sum (1e-5 of the sum of |terms|)."""
    gen = torch.Generator().manual_seed(0)
    cases = ((1, 64, 300, False, 1), (2, 40, 37, True, 2), (1, 1000, 700, True, 2), (2, 576, 129, False, 2), (1, 7, 3, True, 1),
             (3, 100, 50, True, 2), (6, 48, 700, False, 2), (7, 100, 1500, True, 2))  # the last: several chunks
    for m, k, n, with_bias, threads in cases:
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
        b = torch.randn(n, generator=gen).to(torch.bfloat16) if with_bias else None
        ref = x.float() @ w.float().T + (0 if b is None else b.float())
        terms = x.float().abs() @ w.float().abs().T + (0 if b is None else b.float().abs())
        err = (_call(fn, x, w, b, threads).float() - ref).abs()
        bound = ref.abs() * 2.0**-8 + terms * 1e-5
        assert bool((err <= bound).all()), f"m={m} k={k} n={n}: error {err.max().item():.3g} over its bound"


@functools.cache
def _kernel() -> GemvFn | None:
    def bind(lib: ctypes.CDLL) -> GemvFn:
        return cpu_native.entry_point(lib, "splitserve_gemv_bf16", [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int], ctypes.c_int)

    return cpu_native.checked_kernels(bind, check_kernel, "CPU GEMV kernel", "decode steps use oneDNN")


def can_use(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``gemv_bf16`` serves this layer: a contiguous 2-D bf16 weight on the CPU (and a matching bias), and
    the kernel built and checked on this machine."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.dim() != 2 or not weight.is_contiguous():
        return False
    if bias is not None and (bias.dtype != torch.bfloat16 or bias.shape != weight.shape[:1] or not bias.is_contiguous()):
        return False
    return _kernel() is not None


class PreparedGemv:
    """``x @ weight.T + bias`` for one or more rows of bf16 ``x``, on torch's current thread count, bound to one layer's
    weight (and bias) that ``can_use`` accepted: what ``Linear`` calls for every decode step (121 calls a step on
    SmolLM2, where re-checking the weight on each call cost ~6 µs). The shapes of ``x`` are checked on each call: the
    C code trusts them."""

    __slots__ = ("_fn", "_weight", "_bias")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        if not can_use(weight, bias):
            raise ValueError(f"gemv_bf16 cannot serve a {tuple(weight.shape)} {weight.dtype} weight here")
        self._fn, self._weight, self._bias = _kernel(), weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[0] == 0 or x.shape[1] != self._weight.shape[1] or x.device.type != "cpu":
            raise ValueError(f"gemv_bf16: x {tuple(x.shape)} {x.dtype} against weight {tuple(self._weight.shape)}")
        return _call(self._fn, x, self._weight, self._bias, torch.get_num_threads())


def gemv_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``PreparedGemv(weight, bias)(x)``, for a single call."""
    return PreparedGemv(weight, bias)(x)

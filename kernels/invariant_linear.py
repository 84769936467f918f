"""Batch-invariant linear layers: a row's result does not depend on how many rows share the call.

Used in deterministic mode. A GEMM library may pick a different kernel, or split
the reduction differently, for a different number of rows M (MKL's float32 SGEMM
does: a row of an M=1 call differs from the same row in an M=2 call, and rows move
between code paths as M grows). oneDNN's prepacked kernels keep the reduction order
fixed for every M >= 2 on the CPUs measured (with and without avx512_bf16), so a
single row is padded to two. Where oneDNN has no bf16 kernel (CPUs without AVX-512),
bf16 weights go through the native CPU GEMV (``cpu_gemv``), whose summation order is
fixed by construction. Nothing of that is taken on trust: ``invariant_linear``
probes the chosen kernel once per weight shape at start-up (M = 1, 2, 3, 5, 17,
64, 130, rows shifted by one) and falls back to one call per row (always invariant,
slow) where the probe fails; if even that fails, deterministic mode is refused.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import torch
import torch.nn.functional as F

from splitserve.kernels import cpu_gemv

logger = logging.getLogger(__name__)

LinearFn = Callable[[torch.Tensor], torch.Tensor]
_PROBE_ROWS = (1, 2, 3, 5, 17, 64)
_PROBE_MAX = 130


def _packed(weight: torch.Tensor, bias: torch.Tensor | None) -> LinearFn | None:
    """oneDNN with the weight prepacked, single rows padded to two; None where oneDNN cannot pack it."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return None
    if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 8)

    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return torch.ops.mkldnn._linear_pointwise(x.expand(2, -1).contiguous(), packed, bias, "none", [], "")[:1]
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    return fn


def _native(weight: torch.Tensor, bias: torch.Tensor | None) -> LinearFn | None:
    """The native CPU GEMV for every row count; None where it does not serve this weight."""
    if not cpu_gemv.can_use(weight, bias):
        return None
    gemv = cpu_gemv.PreparedGemv(weight, bias)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return gemv(x) if x.shape[0] else F.linear(x, weight, bias)

    return fn


def _row_by_row(weight: torch.Tensor, bias: torch.Tensor | None) -> LinearFn:
    """One GEMM call per row: every row goes through the same call shape."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return F.linear(x, weight, bias)
        return torch.cat([F.linear(x[i : i + 1], weight, bias) for i in range(x.shape[0])])

    return fn


def is_row_invariant(fn: LinearFn, in_features: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether every row of ``fn``'s output is the same bits whatever the number and position of rows."""
    x = torch.randn(_PROBE_MAX + 1, in_features, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    full = fn(x[:_PROBE_MAX])
    for m in _PROBE_ROWS:
        if not torch.equal(fn(x[:m]), full[:m]) or not torch.equal(fn(x[1 : m + 1])[: m - 1], full[1:m]):
            return False
    return True


@functools.lru_cache(maxsize=None)
def _choice(out_features: int, in_features: int, dtype: torch.dtype, device: torch.device, has_bias: bool) -> str:
    """'packed', 'native' or 'rows' for this shape on this machine (probed once with random weights)."""
    g = torch.Generator().manual_seed(1)
    weight = (torch.randn(out_features, in_features, generator=g) / in_features**0.5).to(device=device, dtype=dtype)
    bias = torch.randn(out_features, generator=g).to(device=device, dtype=dtype) if has_bias else None
    packed = _packed(weight, bias)
    if packed is not None and is_row_invariant(packed, in_features, dtype, device):
        return "packed"
    native = _native(weight, bias)
    if native is not None and is_row_invariant(native, in_features, dtype, device):
        return "native"
    if is_row_invariant(_row_by_row(weight, bias), in_features, dtype, device):
        logger.warning("deterministic mode: no batch-invariant GEMM for %dx%d %s on %s; computing it one row at a time (slow)",
                       out_features, in_features, dtype, device)
        return "rows"
    raise ValueError(
        f"deterministic: true cannot be honoured here: no batch-invariant {dtype} GEMM for a {out_features}x{in_features} weight "
        f"on {device} (checked at start-up); run with deterministic: false"
    )


def invariant_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> LinearFn:
    """``x @ weight.T + bias`` whose rows do not depend on the batch, verified for this shape on this machine."""
    choice = _choice(weight.shape[0], weight.shape[1], weight.dtype, weight.device, bias is not None)
    fn = _packed(weight, bias) if choice == "packed" else _native(weight, bias) if choice == "native" else _row_by_row(weight, bias)
    assert fn is not None
    return fn

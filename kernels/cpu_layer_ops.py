"""The small ops of a bf16 decoder layer on the CPU, one native call each (``cpu_native.c``).

A decode step of a few sequences spends a fifth of its time outside the GEMMs and attention, in
torch ops on a few rows: an RMSNorm is eight of them (to float32, square, mean, add, rsqrt, multiply,
back to bf16, times the weight) and the rotary embedding four, each with its dispatch and allocation.
Twice per layer, these do the residual add and the norm in one call; once per layer, the rotation in
place.

Numbers: the same roundings as torch's ops in bf16 (each bf16 op's float32 result rounded to bf16,
nearest-even). The one difference is the order of the float32 sum of squares in the norm (16 lanes,
a fixed tree), so an output can differ from torch's by one bf16 step where the product sits on a
rounding edge.

Checked against torch's own ops before first use (exactly for the residual sum and the rotation,
within one bf16 step for the norm). Not built or a wrong result: ``available()`` is False, the log
says why once, and the model keeps torch's ops.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from splitserve.engine.norm import add_rms_norm as torch_add_rms_norm
from splitserve.engine.rope import apply_rotary
from splitserve.kernels import cpu_native

_PTR, _I64 = ctypes.c_void_p, ctypes.c_int64


def _norm_call(fn, h: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float, threads: int) -> torch.Tensor:
    out = torch.empty_like(h)
    rows, dim = h.shape
    fn(h.data_ptr(), None if y is None else y.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, dim, eps, threads)
    return out


def _rotary_call(fn, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, threads: int) -> None:
    tokens, heads, head_dim = x.shape
    fn(x.data_ptr(), tokens, heads, head_dim, x.stride(0), cos.data_ptr(), sin.data_ptr(), positions.data_ptr(), threads)


def check_kernels(norm, rotary) -> None:
    """Raise ``AssertionError`` unless both agree with the model's torch ops (``engine.norm``, ``engine.rope``) on
    random bf16 inputs."""
    gen = torch.Generator().manual_seed(0)
    for rows, dim, with_y, threads in ((1, 64, False, 1), (3, 576, True, 2), (40, 2000, True, 2), (2, 37, True, 1)):
        h = (torch.randn(rows, dim, generator=gen) * 3).to(torch.bfloat16)
        y = torch.randn(rows, dim, generator=gen).to(torch.bfloat16) if with_y else None
        w = torch.randn(dim, generator=gen).to(torch.bfloat16)
        h_ref, h_ours = h.clone(), h.clone()
        ref = torch_add_rms_norm(h_ref, y, w, 1e-5, torch.bfloat16)
        ours = _norm_call(norm, h_ours, y, w, 1e-5, threads)
        assert torch.equal(h_ours, h_ref), f"residual sum differs ({rows} x {dim})"
        step = ref.float().abs().clamp_min(1e-30) * 2.0**-7  # one bf16 step
        assert bool(((ours.float() - ref.float()).abs() <= step).all()), f"norm off by more than one bf16 step ({rows} x {dim})"
    for tokens, heads, head_dim, width, threads in ((1, 3, 64, 3 * 64 + 32, 1), (5, 12, 128, 12 * 128, 2), (70, 8, 64, 8 * 64 + 64, 2)):
        base = torch.randn(tokens, width, generator=gen).to(torch.bfloat16)
        cos_t = torch.randn(100, head_dim, generator=gen).to(torch.bfloat16)
        sin_t = torch.randn(100, head_dim, generator=gen).to(torch.bfloat16)
        positions = torch.randint(0, 100, (tokens,), generator=gen)
        x = base[:, : heads * head_dim].view(tokens, heads, head_dim)
        ref = apply_rotary(x, cos_t[positions].unsqueeze(1), sin_t[positions].unsqueeze(1))
        ours = base.clone()
        _rotary_call(rotary, ours[:, : heads * head_dim].view(tokens, heads, head_dim), positions, cos_t, sin_t, threads)
        assert torch.equal(ours[:, : heads * head_dim].view(tokens, heads, head_dim), ref), f"rotary differs ({tokens} x {heads} x {head_dim})"
        assert torch.equal(ours[:, heads * head_dim :], base[:, heads * head_dim :]), "rotary wrote past its heads"


@functools.cache
def _kernels():
    def bind(lib: ctypes.CDLL):
        norm = cpu_native.entry_point(lib, "splitserve_add_rms_norm_bf16", [_PTR] * 4 + [_I64] * 2 + [ctypes.c_float, ctypes.c_int])
        rotary = cpu_native.entry_point(lib, "splitserve_rotary_bf16", [_PTR] + [_I64] * 4 + [_PTR] * 3 + [ctypes.c_int])
        return norm, rotary

    return cpu_native.checked_kernels(bind, lambda pair: check_kernels(*pair), "native layer ops", "decoder layers use torch's ops")


def available() -> bool:
    return _kernels() is not None


def add_rms_norm(h: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``h += y`` in place (when given), then RMSNorm of ``h`` times ``weight``: contiguous 2-D bf16 CPU tensors of
    one shape (``weight``: one row), only when ``available()``."""
    if h.dtype != torch.bfloat16 or h.dim() != 2 or not h.is_contiguous() or weight.dtype != torch.bfloat16 or weight.shape != h.shape[1:]:
        raise ValueError(f"add_rms_norm: h {tuple(h.shape)} {h.dtype}, weight {tuple(weight.shape)} {weight.dtype}")
    if y is not None and (y.dtype != torch.bfloat16 or y.shape != h.shape or not y.is_contiguous()):
        raise ValueError(f"add_rms_norm: y {tuple(y.shape)} {y.dtype} against h {tuple(h.shape)}")
    return _norm_call(_kernels()[0], h, y, weight.contiguous(), eps, torch.get_num_threads())


def rotary_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [tokens, heads, head_dim] (bf16, heads packed in each row) in place by the [max_positions,
    head_dim] bf16 tables' rows at ``positions`` (contiguous int64, each within the tables: the caller checks them
    once per step, as the C code reads those rows unchecked); returns ``x``. Only when ``available()``."""
    tokens, heads, head_dim = x.shape
    if (x.dtype != torch.bfloat16 or x.stride(2) != 1 or x.stride(1) != head_dim or head_dim % 2 or cos.dtype != torch.bfloat16
            or sin.dtype != torch.bfloat16 or cos.shape[1:] != (head_dim,) or sin.shape != cos.shape or not cos.is_contiguous()
            or not sin.is_contiguous() or positions.shape != (tokens,) or positions.dtype != torch.int64 or not positions.is_contiguous()):
        raise ValueError(f"rotary_: x {tuple(x.shape)} {x.dtype} against tables {tuple(cos.shape)} {cos.dtype}")
    _rotary_call(_kernels()[1], x, positions, cos, sin, torch.get_num_threads())
    return x

"""RMSNorm as transformers computes it, and the residual add that precedes it in a decoder layer.

Pure torch; the reference that ``kernels/cpu_layer_ops``' native version is checked against.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm in float32; rounded to ``x.dtype`` before the weight as transformers does, unless
    ``out_dtype`` asks for float32 activations (then nothing is rounded)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if out_dtype is None or out_dtype == x.dtype:
        return xf.to(x.dtype).mul_(weight) if x.dtype != torch.float32 else xf.mul_(weight)
    return xf.mul_(weight).to(out_dtype)


def add_rms_norm(h: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """The residual stream's ``h += y`` (when there is one), then ``rms_norm`` of ``h``."""
    if y is not None:
        h += y
    return rms_norm(h, weight, eps, out_dtype)

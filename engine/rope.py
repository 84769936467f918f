"""Rotary position embeddings (rotate-half convention) over precomputed cos/sin tables.

The inverse frequencies come from the model config (transformers' own initialisers,
so every rope type it supports here is bit-exact). The cos/sin table is computed
once in float32 for every position the model can see, scaled by the rope's
attention factor (yarn) as transformers does; a step gathers the rows for its
tokens' positions. The sin table's first half
is stored negated, so rotating is ``x * cos + swap_halves(x) * sin`` with no
negation pass; flipping a sign is exact, so the arithmetic still matches Hugging
Face's bit for bit and greedy outputs agree token for token.
"""

from __future__ import annotations

import torch


class RotaryEmbedding:
    """cos and sign-folded sin tables of shape [max_positions, head_dim] (see ``apply_rotary``)."""

    def __init__(self, inv_freq: tuple[float, ...], attention_factor: float, max_positions: int, device: torch.device, dtype: torch.dtype):
        head_dim = 2 * len(inv_freq)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.int64).float(), torch.tensor(inv_freq, dtype=torch.float32))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * attention_factor).to(device=device, dtype=dtype)
        sin = emb.sin() * attention_factor
        sin[:, : head_dim // 2].neg_()  # rotate-half's minus sign, folded into the table
        self.sin = sin.to(device=device, dtype=dtype)

    def checked_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """``positions`` as contiguous int64, after checking that each has a row in the tables."""
        positions = positions.to(torch.int64).contiguous()
        if positions.numel():
            low, high = torch.aminmax(positions)
            if int(low) < 0 or int(high) >= self.cos.shape[0]:
                raise IndexError(f"positions {int(low)}..{int(high)} outside the rotary tables' {self.cos.shape[0]} rows")
        return positions

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin rows for ``positions`` shaped [T, 1, head_dim] to broadcast over heads."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] rotated by the given tables (``sin`` from ``RotaryEmbedding``: first half negated)."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1).mul_(sin)
    return torch.mul(x, cos).add_(swapped)

"""Next-token selection for a batch: greedy, temperature, top-k, top-p, per-request seeds.

Filtering is vectorised over the batch; the draw itself is per row so that a
request with a seed uses only its own ``torch.Generator`` and gets the same tokens
whatever else shares the batch.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from splitserve.engine.sampling_params import SamplingParams


def _filter_top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) everything outside each row's top-k and nucleus; logits [n, V] float32."""
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    k = torch.where(top_ks > 0, top_ks, torch.full_like(top_ks, vocab)).unsqueeze(1)
    remove = ranks >= k
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    cum_before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
    remove |= (cum_before >= top_ps.unsqueeze(1)) & (top_ps < 1.0).unsqueeze(1)  # top_p == 1 is off: float32 cumsum can reach 1 early
    remove[:, 0] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


def sample(logits: torch.Tensor, params: Seq[SamplingParams], generators: Seq[torch.Generator | None], default_generator: torch.Generator) -> list[int]:
    """One token id per row of ``logits`` (float32 [n, V])."""
    n = logits.shape[0]
    out = logits.argmax(dim=-1).tolist()
    rows = [i for i in range(n) if not params[i].is_greedy]
    if not rows:
        return out
    sub = logits[rows]
    temps = torch.tensor([params[i].temperature for i in rows], dtype=torch.float32).unsqueeze(1)
    sub = sub / temps
    top_ks = torch.tensor([params[i].top_k for i in rows], dtype=torch.int64)
    top_ps = torch.tensor([params[i].top_p for i in rows], dtype=torch.float32)
    if bool((top_ks > 0).any()) or bool((top_ps < 1.0).any()):
        sub = _filter_top_k_top_p(sub, top_ks, top_ps)
    probs = sub.softmax(dim=-1)
    for j, i in enumerate(rows):
        gen = generators[i] or default_generator
        out[i] = int(torch.multinomial(probs[j], 1, generator=gen).item())
    return out

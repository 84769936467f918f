"""Performance curves of one prefill worker, one decode worker and the KV link between them.

Pure: dataclasses, least-squares fits and dict (JSON) round trips; no I/O. The
measurement lives in ``profile.py``, the projection to other devices and models
in ``scaling.py``, and the simulator (``simulator.py``) only evaluates these.

* ``PrefillProfile``: latency of one prefill step of ``t`` batched prompt tokens,
  ``a + b*t + c*t**2`` (the quadratic term is attention), under a token budget.
* ``DecodeProfile``: one decode step for ``n`` running sequences holding ``k``
  context tokens in all, ``a + b*n + c*k`` (weights read once per step, per
  sequence compute, KV read), with the worker's sequence cap and KV capacity.
* ``TransferProfile``: moving one prompt's KV, ``latency + tokens*bytes_per_token/bandwidth``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PrefillProfile:
    a_s: float
    b_s_per_token: float
    c_s_per_token2: float = 0.0
    token_budget: int = 2048

    def latency(self, num_tokens: int) -> float:
        t = float(num_tokens)
        return self.a_s + self.b_s_per_token * t + self.c_s_per_token2 * t * t


@dataclass(frozen=True)
class DecodeProfile:
    a_s: float
    b_s_per_seq: float
    c_s_per_ctx_token: float
    max_num_seqs: int = 128
    kv_capacity_tokens: int = 1 << 30

    def step(self, num_seqs: int, num_context_tokens: int) -> float:
        return self.a_s + self.b_s_per_seq * num_seqs + self.c_s_per_ctx_token * num_context_tokens


@dataclass(frozen=True)
class TransferProfile:
    bytes_per_token: float
    bandwidth_bytes_per_s: float
    latency_s: float = 0.0

    def seconds(self, num_tokens: int) -> float:
        return self.latency_s + num_tokens * self.bytes_per_token / self.bandwidth_bytes_per_s


@dataclass(frozen=True)
class Profiles:
    """Everything the simulator needs about one worker kind, plus where the numbers came from.

    ``meta`` is free-form provenance: device, model, how each curve was obtained,
    the raw measured points and the assumptions behind a projected profile.
    """

    prefill: PrefillProfile
    decode: DecodeProfile
    transfer: TransferProfile
    meta: dict[str, Any] = field(default_factory=dict)

    def mixed_step(self, num_prefill_tokens: int, num_decodes: int, num_context_tokens: int) -> float:
        """One step of an aggregated worker: prefill chunks and decodes in the same forward pass.

        Modelled as a prefill step over the prefill tokens plus one token per decode
        (the decodes ride along the same matrix multiplies) plus the decodes' KV
        reads. With no prefill tokens it is the plain decode step.
        """
        if num_prefill_tokens <= 0:
            return self.decode.step(num_decodes, num_context_tokens)
        return self.prefill.latency(num_prefill_tokens + num_decodes) + self.decode.c_s_per_ctx_token * num_context_tokens

    def to_dict(self) -> dict[str, Any]:
        return {"prefill": asdict(self.prefill), "decode": asdict(self.decode), "transfer": asdict(self.transfer), "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Profiles":
        try:
            return cls(
                PrefillProfile(**data["prefill"]), DecodeProfile(**data["decode"]), TransferProfile(**data["transfer"]),
                dict(data.get("meta", {})),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a splitserve tuning profile (needs prefill, decode and transfer sections): {e}") from e


def fit_prefill(points: list[tuple[int, float]], token_budget: int, quadratic: bool = True) -> PrefillProfile:
    """Least squares ``a + b*t (+ c*t^2)`` through measured (tokens, seconds); coefficients kept >= 0."""
    if len(points) < (3 if quadratic else 2):
        raise ValueError(f"need at least {3 if quadratic else 2} prefill points to fit, got {len(points)}")
    t = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    cols = [np.ones_like(t), t] + ([t * t] if quadratic else [])
    coef = _nonneg_lstsq(np.stack(cols, axis=1), y)
    c = coef[2] if quadratic else 0.0
    return PrefillProfile(float(coef[0]), float(coef[1]), float(c), token_budget)


def fit_decode(points: list[tuple[int, int, float]], max_num_seqs: int, kv_capacity_tokens: int) -> DecodeProfile:
    """Least squares ``a + b*n + c*k`` through measured (num_seqs, context tokens, seconds); coefficients >= 0."""
    if len(points) < 3:
        raise ValueError(f"need at least 3 decode points to fit, got {len(points)}")
    x = np.array([[1.0, p[0], p[1]] for p in points], dtype=float)
    y = np.array([p[2] for p in points], dtype=float)
    a, b, c = _nonneg_lstsq(x, y)
    return DecodeProfile(float(a), float(b), float(c), max_num_seqs, kv_capacity_tokens)


def _nonneg_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients (tiny active-set loop; a cost is never negative)."""
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            return coef
        active.pop(int(np.argmin(sol)))  # drop the most negative term and refit
    return coef


def fit_error(points: list[tuple], predict) -> float:
    """Mean absolute relative error (fraction) of ``predict(*point[:-1])`` against ``point[-1]``."""
    errs = [abs(predict(*p[:-1]) - p[-1]) / p[-1] for p in points if p[-1] > 0]
    return float(sum(errs) / len(errs)) if errs else math.nan

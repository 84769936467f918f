"""Per-request sampling settings, shaped like vLLM's ``SamplingParams``.

Validation happens at construction so that bad input fails at the boundary with
a ``ValueError`` naming the field and its allowed range, before any KV block is
reserved for the request. The limits are what the sampler can compute, so one
request's values can never make the batch it shares fail:

- floats must be finite; ``temperature`` below ``GREEDY_TEMPERATURE`` (1e-5) is
  greedy, as in vLLM (``logits / 1e-40`` overflows float32 to inf and the draw
  fails on NaN probabilities);
- integers must fit in int64 (the sampler's tensors); a ``top_k`` above the
  vocabulary simply keeps the whole vocabulary;
- ``seed`` may be any integer: it is mapped into the generator's 64-bit range
  (``seed % 2**64``, which is what ``torch.Generator.manual_seed`` itself does
  for the values it accepts), so 2**64 or -2**63-1 are seeds, not errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GREEDY_TEMPERATURE = 1e-5  # temperatures below this sample greedily (vLLM's _SAMPLING_EPS)
INT64_MAX = 2**63 - 1
SEED_RANGE = 2**64  # torch.Generator seeds are uint64


class InvalidSamplingParam(ValueError):
    """A sampling parameter out of range; ``field`` names it (the HTTP error's ``param``)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name


def _show(value: object) -> str:
    """``repr`` for error messages, short even for a 4,000-digit integer or a long list."""
    if _is_int(value) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, list):
        text = "[" + ", ".join(_show(v) for v in value[:8]) + (", ...]" if len(value) > 8 else "]")
    else:
        text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature == 0`` (or below ``GREEDY_TEMPERATURE``) means greedy.
    ``top_k <= 0`` (or -1) disables top-k. ``seed`` makes a sampled request
    reproducible regardless of batch mix; it is stored reduced to ``[0, 2**64)``.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream_interval: int = 1  # a stream sends the first token, then every this many tokens, then the last ones

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if _is_int(self.seed):
            self.seed %= SEED_RANGE
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of range."""
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= INT64_MAX:
            raise InvalidSamplingParam("max_tokens", f"max_tokens must be an integer >= 1, got {_show(self.max_tokens)} (the limit is 2**63-1)")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidSamplingParam("temperature", f"temperature must be >= 0 and finite (0 means greedy), got {_show(self.temperature)}")
        if not _is_real(self.top_p) or not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidSamplingParam("top_p", f"top_p must be in (0, 1], got {_show(self.top_p)}")
        if not _is_int(self.top_k) or (self.top_k < 1 and self.top_k not in (0, -1)) or self.top_k > INT64_MAX:
            raise InvalidSamplingParam("top_k", f"top_k must be -1 or 0 (disabled) or an integer >= 1 (at most 2**63-1; above the vocabulary size it keeps every token), got {_show(self.top_k)}")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < SEED_RANGE):
            raise InvalidSamplingParam("seed", f"seed must be None or an integer in [0, 2**64) (construction maps any integer there), got {_show(self.seed)}")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise InvalidSamplingParam("stop", f"stop must be a list of non-empty strings, got {_show(self.stop)}")
        if not _is_int(self.stream_interval) or not 1 <= self.stream_interval <= INT64_MAX:
            raise InvalidSamplingParam("stream_interval", f"stream_interval must be an integer >= 1, got {_show(self.stream_interval)}")
        if any(not _is_int(t) or not 0 <= t <= INT64_MAX for t in self.stop_token_ids):
            raise InvalidSamplingParam("stop_token_ids", f"stop_token_ids must be non-negative integers below 2**63, got {_show(self.stop_token_ids)}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def to_dict(self) -> dict:
        """Plain dict for msgpack / Ray transport."""
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": list(self.stop),
            "stop_token_ids": list(self.stop_token_ids),
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "stream_interval": self.stream_interval,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingParams":
        return cls(**data)

"""Workloads, SLOs and goodput. Pure: no I/O, no clock, no Ray.

A ``Workload`` is a prompt-length distribution, an output-length distribution
and an arrival process; ``Workload.requests(rate, num_requests)`` turns it into
a deterministic list of ``RequestSpec`` (arrival time, prompt length, output
length) -- the same list drives the real load generator and the simulator, so
both see exactly the same requests.

A request *meets the SLO* when it completed, its time to first token is
``<= slo.ttft_s`` and its **mean** inter-token latency -- ``(last token time -
first token time) / (output tokens - 1)``, the TPOT of vLLM's benchmark -- is
``<= slo.itl_s`` (``SLO(itl_stat="p90")`` uses the request's 90th-percentile
gap instead). **Goodput** is the number of requests meeting the SLO divided by
the run's duration (first arrival to last completion), in requests per second;
**attainment** is the fraction of requests meeting it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Literal

DistKind = Literal["fixed", "uniform", "normal", "lognormal"]


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution, clipped to ``[low, high]``.

    ``fixed``: always ``mean``. ``uniform``: integers in ``[mean - spread, mean + spread]``.
    ``normal``: mean ``mean``, standard deviation ``spread``. ``lognormal``: median
    ``mean``, ``spread`` is sigma of the log (0.5 gives a long right tail).
    """

    kind: DistKind = "fixed"
    mean: float = 128
    spread: float = 0.0
    low: int = 1
    high: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "normal", "lognormal"):
            raise ValueError(f"length distribution kind must be fixed, uniform, normal or lognormal, got {self.kind!r}")
        if self.mean < 1 or self.spread < 0 or self.low < 1 or (self.high is not None and self.high < self.low):
            raise ValueError(f"bad length distribution {self}: need mean >= 1, spread >= 0, 1 <= low <= high")

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            x = self.mean
        elif self.kind == "uniform":
            x = rng.uniform(self.mean - self.spread, self.mean + self.spread)
        elif self.kind == "normal":
            x = rng.gauss(self.mean, self.spread)
        else:
            x = rng.lognormvariate(math.log(self.mean), self.spread)
        n = max(self.low, int(round(x)))
        return min(n, self.high) if self.high is not None else n

    @property
    def max_value(self) -> int:
        """An upper bound on samples (used to size requests against a context limit)."""
        if self.high is not None:
            return self.high
        if self.kind == "fixed":
            return int(round(self.mean))
        if self.kind == "uniform":
            return int(math.ceil(self.mean + self.spread))
        if self.kind == "normal":
            return int(math.ceil(self.mean + 4 * self.spread))
        return int(math.ceil(self.mean * math.exp(4 * self.spread)))

    @classmethod
    def parse(cls, text: str) -> "LengthDist":
        """``"256"``, ``"fixed:256"``, ``"uniform:256,64"``, ``"normal:1024,128"``, ``"lognormal:256,0.5"``;
        an optional third and fourth number clip the range, e.g. ``"normal:1024,128,512,1536"``."""
        kind, _, rest = text.partition(":")
        if not rest:
            kind, rest = "fixed", kind
        try:
            nums = [float(x) for x in rest.split(",") if x.strip()]
        except ValueError as e:
            raise ValueError(f"cannot parse length distribution {text!r}; use e.g. 'normal:1024,128' or '64'") from e
        if not 1 <= len(nums) <= 4:
            raise ValueError(f"length distribution {text!r} needs 1 to 4 numbers (mean[,spread[,low[,high]]])")
        mean, spread = nums[0], nums[1] if len(nums) > 1 else 0.0
        low = int(nums[2]) if len(nums) > 2 else 1
        high = int(nums[3]) if len(nums) > 3 else None
        return cls(kind.strip().lower(), mean, spread, low, high)  # type: ignore[arg-type]

    def describe(self) -> str:
        clip = f" in [{self.low}, {self.high}]" if self.high is not None else ""
        if self.kind == "fixed":
            return f"{self.mean:g}"
        return f"{self.kind}({self.mean:g}, {self.spread:g}){clip}"


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request of a workload: when it arrives (seconds from the start) and its lengths."""

    index: int
    arrival_s: float
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class Workload:
    """Prompt and output length distributions plus an arrival process (``poisson`` or ``constant``)."""

    name: str
    prompt_len: LengthDist
    output_len: LengthDist
    arrival: Literal["poisson", "constant"] = "poisson"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arrival not in ("poisson", "constant"):
            raise ValueError(f"arrival must be 'poisson' or 'constant', got {self.arrival!r}")

    def requests(self, rate: float, num_requests: int, seed: int | None = None) -> list[RequestSpec]:
        """``num_requests`` requests at ``rate`` req/s; the same (rate, count, seed) gives the same list.

        Lengths come from their own random stream, so the k-th request has the same
        lengths at every rate (only its arrival time changes): sweeps compare like with like.
        """
        if rate <= 0 or not math.isfinite(rate):
            raise ValueError(f"request rate must be a positive number of requests per second, got {rate}")
        if num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {num_requests}")
        seed = self.seed if seed is None else seed
        len_rng = random.Random(f"lengths-{seed}")
        gap_rng = random.Random(f"arrivals-{seed}")
        out, t = [], 0.0
        for i in range(num_requests):
            if i > 0:
                t += gap_rng.expovariate(rate) if self.arrival == "poisson" else 1.0 / rate
            out.append(RequestSpec(i, t, self.prompt_len.sample(len_rng), self.output_len.sample(len_rng)))
        return out

    def with_lengths(self, prompt_len: LengthDist | None = None, output_len: LengthDist | None = None) -> "Workload":
        return replace(self, prompt_len=prompt_len or self.prompt_len, output_len=output_len or self.output_len)

    def describe(self) -> str:
        return f"{self.name}: prompt {self.prompt_len.describe()} tokens, output {self.output_len.describe()} tokens, {self.arrival} arrivals"


PRESETS: dict[str, Workload] = {
    # retrieval-augmented generation: long prompts (retrieved documents), short answers
    "rag": Workload("rag", LengthDist("normal", 1024, 128, 768, 1280), LengthDist("normal", 64, 8, 48, 80)),
    # chat: short prompts, answers as long as the prompts
    "chat": Workload("chat", LengthDist("normal", 256, 64, 128, 384), LengthDist("normal", 256, 64, 128, 384)),
    # the RAG shape scaled down 4x / 2x so that a sweep on a few CPU cores finishes in minutes
    "rag-small": Workload("rag-small", LengthDist("normal", 256, 32, 192, 320), LengthDist("normal", 32, 4, 24, 40)),
}


def preset(name: str, seed: int = 0) -> Workload:
    if name not in PRESETS:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return replace(PRESETS[name], seed=seed)


@dataclass(frozen=True)
class SLO:
    """Service-level objectives: time to first token and inter-token latency, in seconds."""

    ttft_s: float
    itl_s: float
    itl_stat: Literal["mean", "p90"] = "mean"

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.itl_s <= 0:
            raise ValueError(f"SLOs must be positive seconds, got ttft_s={self.ttft_s}, itl_s={self.itl_s}")
        if self.itl_stat not in ("mean", "p90"):
            raise ValueError(f"itl_stat must be 'mean' or 'p90', got {self.itl_stat!r}")

    def describe(self) -> str:
        return f"TTFT <= {self.ttft_s:g} s and {self.itl_stat} inter-token latency <= {self.itl_s * 1000:g} ms"


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request (measured or simulated). Times in seconds from the run start."""

    index: int
    arrival_s: float
    prompt_len: int
    output_len: int
    ttft_s: float | None = None
    itl_mean_s: float | None = None  # None when fewer than two tokens came back
    itl_p90_s: float | None = None
    finish_s: float | None = None
    num_output_tokens: int = 0
    itl_gaps_s: list[float] = field(default_factory=list)  # every inter-token gap (for run-wide percentiles)
    error: str | None = None

    @property
    def completed(self) -> bool:
        return self.error is None and self.finish_s is not None and self.num_output_tokens >= self.output_len

    def meets(self, slo: SLO) -> bool:
        if not self.completed or self.ttft_s is None or self.ttft_s > slo.ttft_s:
            return False
        itl = self.itl_mean_s if slo.itl_stat == "mean" else self.itl_p90_s
        return itl is None or itl <= slo.itl_s


def record_from_token_times(spec: RequestSpec, token_times: list[float], error: str | None = None) -> RequestRecord:
    """A record from the absolute times (same clock as ``spec.arrival_s``) at which each output token arrived."""
    rec = RequestRecord(spec.index, spec.arrival_s, spec.prompt_len, spec.output_len, error=error)
    if not token_times:
        return rec
    rec.num_output_tokens = len(token_times)
    rec.ttft_s = token_times[0] - spec.arrival_s
    rec.finish_s = token_times[-1]
    gaps = [b - a for a, b in zip(token_times, token_times[1:])]
    rec.itl_gaps_s = gaps
    if gaps:
        rec.itl_mean_s = (token_times[-1] - token_times[0]) / len(gaps)
        rec.itl_p90_s = percentile(gaps, 90)
    return rec


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class RunSummary:
    """Goodput and latency percentiles of one (split, rate) run."""

    num_requests: int
    num_completed: int
    num_good: int
    duration_s: float
    goodput: float  # requests meeting the SLO per second of run
    throughput: float  # completed requests per second of run
    attainment: float  # fraction of requests meeting the SLO
    ttft_p50: float | None
    ttft_p90: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p90: float | None
    itl_p99: float | None


def summarize(records: list[RequestRecord], slo: SLO) -> RunSummary:
    """Goodput, attainment and TTFT / inter-token-latency percentiles (over every gap of every request)."""
    if not records:
        raise ValueError("cannot summarize a run with no requests")
    done = [r for r in records if r.completed]
    good = sum(r.meets(slo) for r in records)
    start = min(r.arrival_s for r in records)
    end = max((r.finish_s for r in done), default=start)
    duration = max(end - start, 1e-9)
    ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
    gaps = [g for r in done for g in r.itl_gaps_s]
    if not gaps:  # records without per-gap detail: use each request's mean
        gaps = [r.itl_mean_s for r in done if r.itl_mean_s is not None]
    return RunSummary(
        num_requests=len(records), num_completed=len(done), num_good=good, duration_s=duration,
        goodput=good / duration if done else 0.0, throughput=len(done) / duration if done else 0.0,
        attainment=good / len(records),
        ttft_p50=percentile(ttfts, 50), ttft_p90=percentile(ttfts, 90), ttft_p99=percentile(ttfts, 99),
        itl_p50=percentile(gaps, 50), itl_p90=percentile(gaps, 90), itl_p99=percentile(gaps, 99),
    )

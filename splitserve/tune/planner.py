"""Search for the best prefill:decode split with the simulator (DistServe-style). Pure: no I/O.

Two questions, two functions:

* ``evaluate(split, workload, slo, profiles, rate)``: goodput and latency
  percentiles of one split at one request rate (one ``Row``).
* ``search_best_split(num_units, workload, slo, profiles, rates=None)``: every
  candidate split of ``num_units``. With ``rates`` each split runs at each rate
  and the best split is the one with the highest goodput at any of them. Without
  ``rates`` each split's **capacity** is found by bisection: the highest request
  rate at which at least ``target_attainment`` (90%) of requests meet the SLO --
  DistServe's definition of goodput -- and the best split has the highest capacity.
  Past ``COARSE_ABOVE`` disaggregated candidates the search goes coarse to fine
  (every k-th ratio, then every ratio near the best), so 64 units cost ~20 splits, not 63.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from splitserve.tune.curves import Profiles
from splitserve.tune.simulator import NO_LOCAL_PREFILL, LocalPrefill, Split, candidate_splits, simulate
from splitserve.tune.workload import SLO, RunSummary, Workload, summarize


@dataclass(frozen=True)
class Row:
    """One (split, rate) point: the ``RunSummary`` plus which split and rate it was."""

    split: str
    rate: float
    summary: RunSummary

    def as_dict(self) -> dict:
        return {"split": self.split, "rate": self.rate, **asdict(self.summary)}


@dataclass
class SearchResult:
    num_units: int
    rows: list[Row]
    score: dict[str, float]  # split label -> its goodput (max over rates) or capacity (req/s)
    score_kind: str  # "max goodput over the rates" or "capacity at >= X% attainment"
    best: str = field(init=False)

    def __post_init__(self) -> None:
        self.best = max(self.score, key=lambda k: (self.score[k], -_units_order(k)))

    def ranking(self) -> list[tuple[str, float]]:
        return sorted(self.score.items(), key=lambda kv: -kv[1])


COARSE_ABOVE = 12  # with more disaggregated splits than this, search coarse to fine
MIN_DURATION_S = 20.0  # simulated seconds of arrivals per capacity probe, at least


def _units_order(label: str) -> int:
    """Ties go to the split listed first (fewer prefill units), which keeps results stable."""
    split = Split.parse(label)
    return split.num_prefill


def default_num_requests(num_units: int) -> int:
    """Enough requests that a queue which grows at a rate past capacity shows in the tail."""
    return max(300, 60 * num_units)


def evaluate(split: Split, workload: Workload, slo: SLO, profiles: Profiles, rate: float, num_requests: int,
             seed: int | None = None, keep_gaps: bool = False, max_misses: int | None = None,
             local_prefill: LocalPrefill = NO_LOCAL_PREFILL) -> Row:
    """Simulate ``num_requests`` of ``workload`` at ``rate`` on ``split`` (``max_misses``, ``local_prefill``: see ``simulate``)."""
    reqs = workload.requests(rate, num_requests, seed)
    records = simulate(split, reqs, profiles, keep_gaps=keep_gaps, slo=slo if max_misses is not None else None, max_misses=max_misses,
                       local_prefill=local_prefill)
    return Row(split.label, rate, summarize(records, slo))


def throughput_bound(split: Split, workload: Workload, profiles: Profiles, local_prefill: LocalPrefill = NO_LOCAL_PREFILL) -> float:
    """Requests per second the split cannot exceed in steady state, whatever the SLO.

    Prefill workers at best run full token-budget steps; decode workers at best run
    full batches (``max_num_seqs``, or what the KV capacity holds); an aggregated
    worker at best pushes every prompt and output token through full-budget steps.
    Bisection never goes above it, so a short simulated run cannot pass off a
    slowly growing queue as sustainable. With local prefill, decode workers may prefill
    too, so every worker counts toward the prefill side of the bound.
    """
    mean_in, mean_out = _mean_lens(workload)
    p, d = profiles.prefill, profiles.decode
    budget = p.token_budget
    tokens_per_s = budget / p.latency(budget)
    if split.mode == "aggregated":
        return split.num_decode * tokens_per_s / (mean_in + mean_out)
    ctx_per_seq = mean_in + mean_out / 2
    n = max(1, min(d.max_num_seqs, int(d.kv_capacity_tokens // ctx_per_seq)))
    decode = split.num_decode * n / (d.step(n, int(n * ctx_per_seq)) * max(mean_out - 1, 1))
    prefilling = split.num_prefill + (split.num_decode if local_prefill != NO_LOCAL_PREFILL else 0)
    return min(prefilling * tokens_per_s / mean_in, decode)


def _mean_lens(workload: Workload) -> tuple[float, float]:
    reqs = workload.requests(1.0, 400, seed=12345)
    return sum(r.prompt_len for r in reqs) / len(reqs), sum(r.output_len for r in reqs) / len(reqs)


def capacity(split: Split, workload: Workload, slo: SLO, profiles: Profiles, num_requests: int,
             target_attainment: float = 0.9, iterations: int = 9, seed: int | None = None,
             min_duration_s: float = MIN_DURATION_S, local_prefill: LocalPrefill = NO_LOCAL_PREFILL) -> tuple[float, list[Row]]:
    """Highest rate (req/s) at which >= ``target_attainment`` of requests meet ``slo``; 0 if even a trickle fails.

    Geometric bisection between a trickle (1/1000 of the bound) and
    ``throughput_bound``; attainment is assumed to fall as the rate rises. Each
    run has at least ``num_requests`` requests and at least ``min_duration_s`` of
    arrivals: a short run would let a queue that grows slowly past capacity pass
    (at 200 req/s, 480 requests last 2.4 s and hide an overload that 20 s expose).
    A run stops early once too many requests missed the SLO for it to pass (the
    rows evaluated are returned too; early-stopped ones count the rest as failed).
    """

    def passes(rate: float) -> bool:
        n = max(num_requests, math.ceil(rate * min_duration_s))
        row = evaluate(split, workload, slo, profiles, rate, n, seed, max_misses=int((1 - target_attainment) * n), local_prefill=local_prefill)
        rows.append(row)
        return row.summary.attainment >= target_attainment

    rows: list[Row] = []
    hi = throughput_bound(split, workload, profiles, local_prefill)
    lo = hi / 1000
    if not passes(lo):
        return 0.0, rows
    if passes(hi):
        return hi, rows
    for _ in range(iterations):
        mid = math.sqrt(lo * hi)
        if passes(mid):
            lo = mid
        else:
            hi = mid
    return lo, rows


def search_best_split(num_units: int, workload: Workload, slo: SLO, profiles: Profiles, rates: list[float] | None = None,
                      *, splits: list[Split] | None = None, num_requests: int | None = None,
                      target_attainment: float = 0.9, seed: int | None = None, progress=None,
                      local_prefill: LocalPrefill = NO_LOCAL_PREFILL) -> SearchResult:
    """Simulate every candidate split of ``num_units`` (or ``splits``); see the module docstring.

    ``progress`` (optional) is called with each split label as it finishes (for a progress bar).
    """
    explicit = splits is not None
    splits = splits or candidate_splits(num_units)
    for s in splits:
        if s.num_units > num_units:
            raise ValueError(f"split {s.label} needs {s.num_units} units but only {num_units} are available")
    num_requests = num_requests or default_num_requests(num_units)
    rows: list[Row] = []
    score: dict[str, float] = {}

    def run(split: Split) -> None:
        if split.label in score:
            return
        if rates:
            mine = [evaluate(split, workload, slo, profiles, r, num_requests, seed, local_prefill=local_prefill) for r in rates]
            score[split.label] = max(r.summary.goodput for r in mine)
        else:
            score[split.label], mine = capacity(split, workload, slo, profiles, num_requests, target_attainment, seed=seed,
                                                local_prefill=local_prefill)
        rows.extend(mine)
        if progress is not None:
            progress(split.label)

    disagg = [s for s in splits if s.mode == "disaggregated"]
    if explicit or len(disagg) <= COARSE_ABOVE:
        for split in splits:
            run(split)
    else:  # coarse to fine: every k-th ratio, then every ratio within k of the best coarse one
        k = math.ceil(len(disagg) / COARSE_ABOVE)
        for split in [*disagg[k // 2::k], *(s for s in splits if s.mode == "aggregated")]:
            run(split)
        best_p = max((Split.parse(lbl) for lbl in score if not lbl.startswith("agg")), key=lambda s: score[s.label]).num_prefill
        for split in disagg:
            if abs(split.num_prefill - best_p) < k:
                run(split)
    kind = "max goodput over the rates (req/s)" if rates else f"capacity: highest rate with >= {target_attainment:.0%} of requests in SLO (req/s)"
    return SearchResult(num_units, rows, score, kind)

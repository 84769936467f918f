"""Fit the simulator's fixed hand-off cost to a measured sweep. Pure: no I/O.

The profile measures one worker alone, so what the disaggregated path adds on
top -- the reservation call to the decode worker, the call to the prefill
worker, the NIXL write and its notification, the ingress, and two busy workers
sharing cores with both -- is only an assumed fixed latency
(``TransferProfile.latency_s``). ``calibrate_handoff`` replaces that assumption
with a measurement: at each disaggregated split's *lowest* measured rate
(little queueing, so the gap is mostly the fixed cost) it simulates the same
requests with no hand-off latency at all, and takes the median of
``measured TTFT p50 - simulated TTFT p50`` over those splits as the latency.

Only the lowest rate of each split is used to fit, so every higher rate of the
same sweep remains a held-out check of the calibrated simulator
(``splitserve simulate --against results.csv --calibrate`` prints both).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from splitserve.tune.curves import Profiles
from splitserve.tune.planner import evaluate
from splitserve.tune.simulator import Split
from splitserve.tune.workload import SLO, Workload


@dataclass(frozen=True)
class Calibration:
    """The calibrated profiles, the fitted latency and the (split, rate, gap in s) points it came from."""

    profiles: Profiles
    latency_s: float
    points: tuple[tuple[str, float, float], ...]

    def used(self, split: str, rate: float) -> bool:
        """Whether this measured point was used to fit (so it is not a held-out check)."""
        return any(s == split and r == rate for s, r, _ in self.points)

    def describe(self) -> str:
        gaps = ", ".join(f"{s} @ {r:g}/s: {g * 1000:+.0f} ms" for s, r, g in self.points)
        return (f"calibrated KV hand-off latency {self.latency_s * 1000:.0f} ms (was an assumed "
                f"{self.profiles.meta.get('assumed_handoff_latency_s', float('nan')) * 1000:.0f} ms); "
                f"measured - simulated TTFT p50 at the lowest rate: {gaps}")


def calibrate_handoff(measured: Iterable[Mapping[str, str]], workload: Workload, slo: SLO, profiles: Profiles,
                      seed: int | None = None) -> Calibration:
    """Fit ``profiles.transfer.latency_s`` to the lowest-rate TTFT of each disaggregated split in ``measured``.

    ``measured``: rows of a ``splitserve tune`` results.csv (``split``, ``rate``,
    ``num_requests``, ``ttft_p50``). Raises ``ValueError`` when no row of a
    disaggregated split has a TTFT to fit to.
    """
    lowest: dict[str, Mapping[str, str]] = {}
    for row in measured:
        if Split.parse(row["split"]).mode != "disaggregated" or not row.get("ttft_p50"):
            continue
        if row["split"] not in lowest or float(row["rate"]) < float(lowest[row["split"]]["rate"]):
            lowest[row["split"]] = row
    if not lowest:
        raise ValueError("nothing to calibrate from: the measured sweep has no disaggregated split (e.g. 1P1D) "
                         "with a TTFT; run 'splitserve tune' with such a split")
    no_handoff = replace(profiles, transfer=replace(profiles.transfer, latency_s=0.0))
    points = []
    for label, row in sorted(lowest.items()):
        rate = float(row["rate"])
        sim = evaluate(Split.parse(label), workload, slo, no_handoff, rate, int(row["num_requests"]), seed).summary
        if sim.ttft_p50 is None:
            continue
        points.append((label, rate, float(row["ttft_p50"]) - sim.ttft_p50))
    if not points:
        raise ValueError("nothing to calibrate from: the simulator finished no request at the lowest measured rates")
    latency = max(0.0, statistics.median(g for _, _, g in points))
    meta = {**profiles.meta, "assumed_handoff_latency_s": profiles.transfer.latency_s,
            "calibrated_handoff_latency_s": latency, "calibrated_from": [list(p) for p in points]}
    calibrated = replace(profiles, transfer=replace(profiles.transfer, latency_s=latency), meta=meta)
    return Calibration(calibrated, latency, tuple(points))

"""Fit the simulator to a measured sweep: the live slowdown of the workers and the hand-off cost. Pure: no I/O.

The profile measures one engine alone, in-process, on an otherwise idle
machine. Deployed, the same worker shares the CPUs with the ingress, the HTTP
proxy, the other worker and the load generator, and a disaggregated request
also pays the hand-off: the reservation call to the decode worker, the call to
the prefill worker, the NIXL write and its notification. ``calibrate`` fits two
numbers to the *lowest* measured rate of each split (little queueing there):

1. ``slowdown``: the median of measured / simulated inter-token latency p50
   over every split; the prefill and decode curves are scaled by it;
2. ``latency_s``: then, the median of measured - simulated TTFT p50 over the
   disaggregated splits, simulated with no hand-off latency, becomes
   ``TransferProfile.latency_s`` (never below zero).

Every higher rate of the same sweep is left out of the fit and stays a
held-out check (``splitserve simulate --against results.csv --calibrate``
prints both). What this cannot capture: a slowdown that grows with load, as
when the serving stack's own CPU work per token competes with the engines.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from splitserve.tune.curves import Profiles
from splitserve.tune.planner import evaluate
from splitserve.tune.simulator import NO_LOCAL_PREFILL, LocalPrefill, Split
from splitserve.tune.workload import SLO, Workload


@dataclass(frozen=True)
class Calibration:
    """The calibrated profiles and what was fitted, with the points each number came from.

    ``itl_points``: (split, rate, measured / simulated ITL p50) for the slowdown;
    ``points``: (split, rate, measured - simulated TTFT p50 in s) for the latency.
    """

    profiles: Profiles
    slowdown: float
    latency_s: float
    itl_points: tuple[tuple[str, float, float], ...]
    points: tuple[tuple[str, float, float], ...]

    def used(self, split: str, rate: float) -> bool:
        """Whether this measured point was used to fit (so it is not a held-out check)."""
        return any(s == split and r == rate for s, r, _ in self.itl_points + self.points)

    def describe(self) -> str:
        ratios = ", ".join(f"{s} @ {r:g}/s: x{g:.2f}" for s, r, g in self.itl_points)
        gaps = ", ".join(f"{s} @ {r:g}/s: {g * 1000:+.0f} ms" for s, r, g in self.points)
        assumed = self.profiles.meta.get("assumed_handoff_latency_s", float("nan"))
        return (f"calibrated: workers x{self.slowdown:.2f} slower than profiled (measured / simulated ITL p50 at the "
                f"lowest rate: {ratios}); KV hand-off latency {self.latency_s * 1000:.0f} ms, was an assumed "
                f"{assumed * 1000:.0f} ms (measured - simulated TTFT p50: {gaps or 'no disaggregated split'})")


def scale_speed(profiles: Profiles, factor: float) -> Profiles:
    """The same profiles with every prefill and decode cost multiplied by ``factor`` (> 1: slower)."""
    if not factor > 0:
        raise ValueError(f"a speed factor must be > 0, got {factor}")
    p, d = profiles.prefill, profiles.decode
    return replace(
        profiles,
        prefill=replace(p, a_s=p.a_s * factor, b_s_per_token=p.b_s_per_token * factor, c_s_per_token2=p.c_s_per_token2 * factor),
        decode=replace(d, a_s=d.a_s * factor, b_s_per_seq=d.b_s_per_seq * factor, c_s_per_ctx_token=d.c_s_per_ctx_token * factor),
    )


def _lowest_rate_rows(measured: Iterable[Mapping[str, str]], key: str) -> dict[str, Mapping[str, str]]:
    lowest: dict[str, Mapping[str, str]] = {}
    for row in measured:
        if not row.get(key):
            continue
        if row["split"] not in lowest or float(row["rate"]) < float(lowest[row["split"]]["rate"]):
            lowest[row["split"]] = row
    return lowest


def calibrate(measured: Iterable[Mapping[str, str]], workload: Workload, slo: SLO, profiles: Profiles,
              seed: int | None = None, local_prefill: LocalPrefill = NO_LOCAL_PREFILL) -> Calibration:
    """Fit the slowdown to every split's lowest-rate ITL, then the hand-off latency (see the module doc).

    Raises ``ValueError`` when the sweep has no inter-token latency to fit to.
    """
    measured = list(measured)
    itl_points = []
    for label, row in sorted(_lowest_rate_rows(measured, "itl_p50").items()):
        rate = float(row["rate"])
        sim = evaluate(Split.parse(label), workload, slo, profiles, rate, int(row["num_requests"]), seed, keep_gaps=True,
                       local_prefill=local_prefill).summary
        if sim.itl_p50:
            itl_points.append((label, rate, float(row["itl_p50"]) / sim.itl_p50))
    if not itl_points:
        raise ValueError("nothing to calibrate from: the measured sweep has no inter-token latency (itl_p50) at any point")
    slowdown = statistics.median(r for _, _, r in itl_points)
    scaled = scale_speed(profiles, slowdown)
    handoff = calibrate_handoff(measured, workload, slo, scaled, seed, local_prefill) if _has_disaggregated(measured) else None
    latency = handoff.latency_s if handoff else scaled.transfer.latency_s
    meta = {**profiles.meta, "assumed_handoff_latency_s": profiles.transfer.latency_s, "calibrated_slowdown": slowdown,
            "calibrated_handoff_latency_s": latency}
    out = replace(scaled, transfer=replace(scaled.transfer, latency_s=latency), meta=meta)
    return Calibration(out, slowdown, latency, tuple(itl_points), handoff.points if handoff else ())


def _has_disaggregated(measured: list[Mapping[str, str]]) -> bool:
    return any(Split.parse(r["split"]).mode == "disaggregated" for r in measured)


def calibrate_handoff(measured: Iterable[Mapping[str, str]], workload: Workload, slo: SLO, profiles: Profiles,
                      seed: int | None = None, local_prefill: LocalPrefill = NO_LOCAL_PREFILL) -> Calibration:
    """Fit only ``profiles.transfer.latency_s`` to the lowest-rate TTFT of each disaggregated split in ``measured``.

    ``measured``: rows of a ``splitserve tune`` results.csv (``split``, ``rate``,
    ``num_requests``, ``ttft_p50``). Raises ``ValueError`` when no row of a
    disaggregated split has a TTFT to fit to.
    """
    disaggregated = [row for row in measured if Split.parse(row["split"]).mode == "disaggregated"]
    lowest = _lowest_rate_rows(disaggregated, "ttft_p50")
    if not lowest:
        raise ValueError("nothing to calibrate from: the measured sweep has no disaggregated split (e.g. 1P1D) "
                         "with a TTFT; run 'splitserve tune' with such a split")
    no_handoff = replace(profiles, transfer=replace(profiles.transfer, latency_s=0.0))
    points = []
    for label, row in sorted(lowest.items()):
        rate = float(row["rate"])
        sim = evaluate(Split.parse(label), workload, slo, no_handoff, rate, int(row["num_requests"]), seed, local_prefill=local_prefill).summary
        if sim.ttft_p50 is None:
            continue
        points.append((label, rate, float(row["ttft_p50"]) - sim.ttft_p50))
    if not points:
        raise ValueError("nothing to calibrate from: the simulator finished no request at the lowest measured rates")
    latency = max(0.0, statistics.median(g for _, _, g in points))
    meta = {**profiles.meta, "assumed_handoff_latency_s": profiles.transfer.latency_s,
            "calibrated_handoff_latency_s": latency}
    calibrated = replace(profiles, transfer=replace(profiles.transfer, latency_s=latency), meta=meta)
    return Calibration(calibrated, 1.0, latency, (), tuple(points))

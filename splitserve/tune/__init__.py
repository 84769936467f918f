"""Prefill:decode ratio tuning: measure splits on this machine, simulate clusters larger than it.

Pure (no I/O, tested in milliseconds):
    workload.py   Workload / LengthDist / presets, SLO, RequestRecord, goodput and percentiles
    curves.py     PrefillProfile, DecodeProfile, TransferProfile, Profiles; least-squares fits
    scaling.py    project curves onto H200/H100 and Llama-3 shapes from stated assumptions
    simulator.py  discrete-event simulation of a Split (disaggregated or aggregated)
    planner.py    evaluate / capacity / search_best_split (DistServe-style)
With I/O:
    profile.py    measure the curves with the in-process engine -> profile.json
    loadgen.py    open-loop streaming HTTP load generator (httpx, SSE)
    sweep.py      deploy each split on a local Ray Serve, drive it at each rate
    report.py     results.csv, requests.csv, goodput.png, latency.png, tables
    commands.py, cli.py   ``splitserve tune`` and ``splitserve simulate``
"""

from splitserve.tune.curves import DecodeProfile, PrefillProfile, Profiles, TransferProfile
from splitserve.tune.planner import SearchResult, capacity, evaluate, search_best_split
from splitserve.tune.simulator import Split, candidate_splits, simulate
from splitserve.tune.workload import SLO, LengthDist, RequestRecord, RequestSpec, Workload, preset, summarize

__all__ = [
    "SLO", "DecodeProfile", "LengthDist", "PrefillProfile", "Profiles", "RequestRecord", "RequestSpec", "SearchResult", "Split",
    "TransferProfile", "Workload", "candidate_splits", "capacity", "evaluate", "preset", "search_best_split", "simulate", "summarize",
]

"""How evenly the work spreads over the workers of each role. Pure: the caller passes reports and the clock.

Two measures per role, each as max/mean over the role's workers (1.0 is perfectly
even; 2.0 means the busiest worker has twice the average; below two workers or
with nothing to spread it is 1.0):

* ``in_flight``: requests waiting or running on each worker now;
* ``requests``: requests each worker started within the last ``window_s``
  (from the cumulative ``num_requests`` its reports carry).

Each worker's share of its role's total is reported next to it, so an operator
sees who is hot, not only that someone is.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

WINDOW_S = 60.0


def imbalance(values: Iterable[float]) -> float:
    """max / mean of ``values``; 1.0 for fewer than two values or a zero mean."""
    xs = list(values)
    if len(xs) < 2:
        return 1.0
    mean = sum(xs) / len(xs)
    return max(xs) / mean if mean > 0 else 1.0


def shares(values: Mapping[str, float]) -> dict[str, float]:
    """Each key's fraction of the total (equal shares when the total is zero)."""
    total = sum(values.values())
    if total <= 0:
        return {k: 1.0 / len(values) for k in values} if values else {}
    return {k: v / total for k, v in values.items()}


class SpreadTracker:
    """Remembers each worker's ``num_requests`` over the window, to count the requests it started recently."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: dict[str, deque[tuple[float, int]]] = {}

    def observe(self, now: float, reports: Iterable[Mapping[str, Any]]) -> None:
        seen = set()
        for rep in reports:
            w = rep["worker_id"]
            seen.add(w)
            samples = self._samples.setdefault(w, deque())
            samples.append((now, int(rep.get("num_requests", 0))))
            while len(samples) > 1 and samples[1][0] <= now - self.window_s:
                samples.popleft()  # keep one sample at or before the horizon as the baseline
        for w in [w for w in self._samples if w not in seen]:
            del self._samples[w]  # a worker that left

    def recent_requests(self) -> dict[str, int]:
        return {w: s[-1][1] - s[0][1] for w, s in self._samples.items() if s}

    def summary(self, reports: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """Per role: ``imbalance`` of both measures and each worker's ``share`` of them."""
        recent = self.recent_requests()
        by_role: dict[str, dict[str, tuple[float, float]]] = {}
        for rep in reports:
            in_flight = float(rep.get("num_running", 0) + rep.get("num_waiting", 0))
            by_role.setdefault(rep["role"], {})[rep["worker_id"]] = (in_flight, float(recent.get(rep["worker_id"], 0)))
        out = {}
        for role, workers in by_role.items():
            in_flight = {w: v[0] for w, v in workers.items()}
            started = {w: v[1] for w, v in workers.items()}
            in_flight_share, started_share = shares(in_flight), shares(started)
            out[role] = {
                "imbalance": {"in_flight": round(imbalance(in_flight.values()), 3), "requests": round(imbalance(started.values()), 3)},
                "share": {w: {"in_flight": round(in_flight_share[w], 3), "requests": round(started_share[w], 3)} for w in workers},
            }
        return out

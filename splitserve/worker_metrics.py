"""What a worker measures for the SLA planner, over a sliding window. Pure: the caller passes the clock.

A worker notes each request's arrival (with its prompt length), its first token
(time from arrival: queueing + prefill, + the KV transfer on a prefill worker),
the gaps between later tokens, and its output length at the end. ``snapshot``
turns the last ``window_s`` into the floats Serve carries to the autoscaling
policy (``record_autoscaling_stats``): arrival rate, mean prompt and output
lengths, p90 of time to first token and of inter-token latency (-1 when the
window saw none).
"""

from __future__ import annotations

from collections import deque

WINDOW_S = 30.0


def _p90(values: list[float]) -> float:
    if not values:
        return -1.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]


class WorkerMeters:
    def __init__(self, window_s: float = WINDOW_S, started_s: float | None = None) -> None:
        self.window_s = window_s
        self.started_s = started_s  # a replica younger than the window divides by its age, not the window
        self._arrivals: deque[tuple[float, int]] = deque()  # (time, prompt tokens)
        self._ttfts: deque[tuple[float, float]] = deque()
        self._gaps: deque[tuple[float, float]] = deque()  # (time, seconds per token)
        self._outputs: deque[tuple[float, int]] = deque()

    def on_arrival(self, now: float, num_prompt_tokens: int) -> None:
        self._arrivals.append((now, num_prompt_tokens))

    def on_first_token(self, now: float, seconds_since_arrival: float) -> None:
        self._ttfts.append((now, seconds_since_arrival))

    def on_tokens(self, now: float, seconds: float, num_tokens: int) -> None:
        if num_tokens > 0:
            self._gaps.append((now, seconds / num_tokens))

    def on_finish(self, now: float, num_output_tokens: int) -> None:
        self._outputs.append((now, num_output_tokens))

    def snapshot(self, now: float) -> dict[str, float]:
        horizon = now - self.window_s
        for series in (self._arrivals, self._ttfts, self._gaps, self._outputs):
            while series and series[0][0] < horizon:
                series.popleft()
        arrivals = [n for _, n in self._arrivals]
        outputs = [n for _, n in self._outputs]
        span = self.window_s if self.started_s is None else min(self.window_s, max(1.0, now - self.started_s))
        return {
            "arrivals_per_s": len(arrivals) / span,
            "mean_prompt_tokens": sum(arrivals) / len(arrivals) if arrivals else -1.0,
            "mean_output_tokens": sum(outputs) / len(outputs) if outputs else -1.0,
            "output_tokens_per_s": sum(outputs) / span,
            "ttft_p90_s": _p90([v for _, v in self._ttfts]),
            "itl_p90_s": _p90([v for _, v in self._gaps]),
        }


class BusyMeter:
    """The fraction of wall time an engine spent in steps over the last ``window_s``, from samples of its
    cumulative busy seconds (taken whenever the worker reports; at least one sample older than the window is kept
    so the fraction spans the whole window once the worker is that old)."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque()  # (time, cumulative busy seconds)

    def sample(self, now: float, busy_s: float) -> float:
        self._samples.append((now, busy_s))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()
        t0, b0 = self._samples[0]
        if now <= t0:
            return 0.0
        return min(1.0, max(0.0, (busy_s - b0) / (now - t0)))

"""Prompt chunks as small as the prompts' deadlines allow, while streams decode beside them.

An aggregated worker that computes a whole 1,024-token prompt in one step stalls
every running stream for that step (on a 2-core CPU, ~0.9 s between two of a
stream's tokens). A fixed bound on the prompt tokens per step (``BatchScheduler``'s
``max_prefill_tokens_beside_decodes``) smooths the streams but slows every prompt,
also when the worker is loaded and prompts are already late, which costs goodput
(docs/benchmarks.md). The pacer bounds by time instead: each prompt should finish
its prefill ``deadline_s`` after it arrived, and a step that also decodes computes
the fewest prompt tokens that keep every queued prompt on course. A quiet worker
then prefills in small chunks (smooth streams, time to first token near the
deadline); a worker whose prompts would be late takes the whole budget, as if
unbounded.

The course is planned from two costs the engine measures as it runs: a step's
fixed cost (``step_s``, from steps without prompt tokens) and each prompt token's
(``token_s``, from steps with them). With prompts in service order needing
``R_i`` tokens up to and including prompt ``i``, chunks of ``B`` tokens finish
prompt ``i`` after ``ceil(R_i / B)`` steps, i.e. at
``now + ceil(R_i / B) * step_s + R_i * token_s``; ``B`` is the smallest chunk meeting
every prompt's deadline. Pure logic: no clock, no tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

MIN_CHUNK_TOKENS = 32  # below this a chunk's GEMMs run far under their rate: more steps cost more than they smooth
_EWMA = 0.2  # weight of the newest measurement


class PrefillPacer:
    def __init__(self, deadline_s: float, min_chunk: int = MIN_CHUNK_TOKENS) -> None:
        self.deadline_s = deadline_s
        self.min_chunk = min_chunk
        self.step_s: float | None = None  # a step's cost without prompt tokens (its decodes)
        self.token_s: float | None = None  # each prompt token's cost on top

    def observe(self, num_prompt_tokens: int, has_decodes: bool, elapsed_s: float) -> None:
        """Learn from one step that just ran: its prompt tokens, whether it decoded streams, how long it took."""
        if num_prompt_tokens == 0:
            if has_decodes:
                self.step_s = _mix(self.step_s, elapsed_s)
            return
        overhead = self.step_s if has_decodes and self.step_s is not None else 0.0
        self.token_s = _mix(self.token_s, max(0.0, elapsed_s - overhead) / num_prompt_tokens)

    def budget(self, now: float, prompts: Iterable[tuple[float, int]], full: int) -> int:
        """Prompt tokens for the next step (at most ``full``). ``prompts``: (arrival time, tokens left to compute) of
        every prompt not yet prefilled, in the order they will be computed."""
        if self.step_s is None or self.token_s is None or self.step_s <= 0:
            return full  # nothing measured yet: no basis to slow a prompt down
        chunk, queued = self.min_chunk, 0
        for arrival, remaining in prompts:
            queued += remaining
            slack = arrival + self.deadline_s - now - queued * self.token_s  # time left for the steps' fixed costs
            steps = math.floor(slack / self.step_s)
            if steps < 1:
                return full  # late (or nearly): compute as much as the step allows
            chunk = max(chunk, -(-queued // steps))
            if chunk >= full:
                return full
        return min(chunk, full)


def _mix(old: float | None, new: float) -> float:
    return new if old is None else (1 - _EWMA) * old + _EWMA * new

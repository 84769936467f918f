"""Scheduling to latency targets: which waiting prompts go first, and how many prompt tokens a step that
also decodes may take. Pure: no clock and no I/O (the caller passes ``now`` and the measured costs).

Both rules serve *goodput*, the requests that meet both targets (time to first token <= ``ttft_s``, mean
time per output token after the first <= ``tpot_s``). Under first-come-first-served, a server that
falls behind makes every request late: each new prompt queues behind all the older ones, so once the
queue is longer than the TTFT target nobody meets it, and prompts prefilled back to back stall the
running streams in every step, so nobody meets the TPOT target either.

1. **On-time prompts first.** A waiting prompt is *late* when its prefill, started after the on-time
   prompts ahead of it (in priority and arrival order), would end after ``arrival + ttft_s``, from the
   measured cost of a prompt token. Late prompts keep their arrival order among themselves and run
   when no on-time prompt waits; one that has waited ``starve_after_s`` takes its arrival-order place
   again, so nothing waits forever behind a steady flow of newer arrivals. Sequences that already
   streamed tokens (preempted ones) stay in front.
2. **Prompt tokens only as far as the streams' TPOT allows.** A decoding stream's *slack* is how far
   it runs ahead of its pace after the next step, plus a share of what its next tokens could give up:

       slack = tpot_s * tokens out - (now - first token) - decode step
               + borrow_fraction * (tpot_s - decode step) * min(tokens left - 1, borrow_horizon_tokens)

   A step that also decodes takes at most ``min(slack) / time per prompt token`` prompt tokens, and
   none while that is below ``min_chunk_tokens`` (each chunk is a step that reads the weights and
   decodes the streams again: with 64-token slivers allowed, a served aggregated worker finished
   ~15% fewer requests per second once overloaded). Streams that cannot meet the targets
   any more (first token late, or too far behind to catch up with plain decode steps) do not
   restrain it. Borrowing from the future lets a prompt in soon after a stream starts (at pace
   alone, every new stream would hold the next prompt back for several steps, and the queue would
   miss its TTFT instead); borrowing only half, over a bounded horizon, keeps room for the prompts
   still to come, which spending the whole budget at once does not (measured: the budget rule left
   every stream doomed at twice the load this machine can serve). At light load the slack is
   seconds and nothing changes.

The costs come from the engine's own steps (``StepCosts``); until both are measured neither rule
estimates (rule 1 then calls late only the prompts already past their deadline; rule 2 does not limit).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from splitserve.engine.sequence import Sequence


@dataclass(frozen=True, slots=True)
class LatencyTargets:
    ttft_s: float
    tpot_s: float
    starve_after_s: float = 30.0
    min_chunk_tokens: int = 512
    borrow_fraction: float = 0.5
    borrow_horizon_tokens: int = 64

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0 or self.starve_after_s <= 0:
            raise ValueError(f"latency targets must be > 0 seconds, got ttft_s={self.ttft_s}, tpot_s={self.tpot_s}, "
                             f"starve_after_s={self.starve_after_s}")


class StepCosts:
    """Moving averages of a plain decode step and of one prompt token, from the engine's timed steps.

    ``s_per_prompt_token`` is a prompt token's share of a step beyond its decodes, from chunks of at
    least ``min_prompt_tokens``. ``prompt_step_s_per_token`` is step time over tokens for steps of
    prompt tokens only, of any size: a step's fixed cost spread over its tokens, so it reads high for
    short prompts; the router's local-prefill budget reads it (workers report it with their load).
    """

    def __init__(self, weight: float = 0.2, min_prompt_tokens: int = 32) -> None:
        self.weight = weight
        self.min_prompt_tokens = min_prompt_tokens  # smaller chunks say more about the step than about a token
        self.decode_step_s: float | None = None
        self.s_per_prompt_token: float | None = None
        self.prompt_step_s_per_token: float | None = None

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.weight) * old + self.weight * new

    def observe(self, num_prompt_tokens: int, num_decodes: int, elapsed_s: float) -> None:
        if num_prompt_tokens == 0:
            if num_decodes:
                self.decode_step_s = self._mix(self.decode_step_s, elapsed_s)
            return
        if not num_decodes:
            self.prompt_step_s_per_token = self._mix(self.prompt_step_s_per_token, elapsed_s / num_prompt_tokens)
        if num_prompt_tokens < self.min_prompt_tokens:
            return
        beside = (self.decode_step_s or 0.0) if num_decodes else 0.0
        self.s_per_prompt_token = self._mix(self.s_per_prompt_token, max(elapsed_s - beside, 0.0) / num_prompt_tokens)


def _has_streamed(seq: Sequence) -> bool:
    return seq.num_output_tokens > 0


def order_waiting(
    waiting: Iterable[Sequence], tokens_ahead: int, now: float, targets: LatencyTargets, costs: StepCosts,
) -> tuple[list[Sequence], set[str]]:
    """``waiting`` reordered (streamed sequences, then by priority, on-time before late, arrival order), and the
    request ids of the late ones. ``tokens_ahead``: prompt tokens already running that the next prefill waits for.
    """
    s_per_token = costs.s_per_prompt_token or 0.0
    ahead = tokens_ahead
    keyed = []
    late_ids: set[str] = set()
    for seq in sorted(waiting, key=lambda s: (not _has_streamed(s), s.priority, s.arrival_time)):
        late = False
        if not _has_streamed(seq) and now - seq.arrival_time < targets.starve_after_s:
            late = now + (ahead + seq.num_uncomputed_tokens) * s_per_token > seq.arrival_time + targets.ttft_s
        if late:
            late_ids.add(seq.req_id)
        else:
            ahead += seq.num_uncomputed_tokens
        keyed.append(((not _has_streamed(seq), seq.priority, late, seq.arrival_time), seq))
    keyed.sort(key=lambda pair: pair[0])
    return [seq for _, seq in keyed], late_ids


def may_join_step(
    seq: Sequence, late: bool, step_prompt_tokens: int, step_deadline: float, now: float, targets: LatencyTargets, costs: StepCosts,
) -> bool:
    """Whether a waiting prompt may share a step that already holds ``step_prompt_tokens`` prompt tokens.

    A prompt's first token comes when its whole step ends, so a second prompt in a step delays the first: a late
    prompt never joins another's step, and an on-time one only while every prompt in the step (the earliest
    ``step_deadline`` among them) still ends in time.
    """
    if step_prompt_tokens == 0:
        return True
    if late:
        return False
    end = now + (step_prompt_tokens + seq.num_uncomputed_tokens) * (costs.s_per_prompt_token or 0.0)
    return end <= min(step_deadline, seq.arrival_time + targets.ttft_s)


def stream_slack_s(seq: Sequence, now: float, targets: LatencyTargets, decode_step_s: float) -> float | None:
    """Seconds by which this decoding stream is ahead of its TPOT pace after one more step (what a prompt beside it
    may take); None when the stream cannot meet the targets any more (first token late, or too far behind to catch
    up even with plain decode steps from now on)."""
    if seq.first_token_time is None or seq.first_token_time - seq.arrival_time > targets.ttft_s:
        return None
    max_tokens = seq.params.max_tokens
    tokens_left = max(max_tokens - seq.num_output_tokens, 0)
    elapsed = now - seq.first_token_time
    if targets.tpot_s * max(max_tokens - 1, 1) - elapsed - tokens_left * decode_step_s < 0:
        return None
    on_pace = targets.tpot_s * seq.num_output_tokens - elapsed - decode_step_s
    horizon = min(max(tokens_left - 1, 0), targets.borrow_horizon_tokens)
    return on_pace + targets.borrow_fraction * max(targets.tpot_s - decode_step_s, 0.0) * horizon


def prompt_token_allowance(running: Iterable[Sequence], now: float, targets: LatencyTargets, costs: StepCosts) -> int | None:
    """Most prompt tokens a step beside these running streams may take (0: none this step); None: no limit."""
    if costs.decode_step_s is None or not costs.s_per_prompt_token:
        return None
    slacks = [s for seq in running if seq.num_uncomputed_tokens == 1
              and (s := stream_slack_s(seq, now, targets, costs.decode_step_s)) is not None]
    if not slacks:
        return None
    allowance = int(max(min(slacks), 0.0) / costs.s_per_prompt_token)
    return allowance if allowance >= targets.min_chunk_tokens else 0

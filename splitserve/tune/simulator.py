"""A discrete-event simulation of a prefill:decode split, DistServe-style. Pure: no I/O, no asyncio, no clock.

``simulate(split, requests, profiles)`` plays a list of ``RequestSpec`` through
``split.num_prefill`` prefill workers and ``split.num_decode`` decode workers (or
``num_decode`` aggregated workers) whose speeds are the ``Profiles`` curves, and
returns one ``RequestRecord`` per request. Same inputs, same records.

A request's life in the disaggregated model (mirrors splitserve's router and workers):
  1. arrival: the pair is chosen at once -- decode worker with the most free KV
     tokens (then fewest sequences), prefill worker with the fewest queued prompt
     tokens (then fewest queued requests), as ``scheduler.policy`` does, but on
     exact load instead of a 0.25 s-old poll.
  2. prefill queue (FCFS): each step packs queued prompts under the token budget,
     chunking a prompt that does not fit; the step lasts ``prefill.latency(tokens)``.
  3. transfer: when its last chunk is done the prompt's KV moves to the decode
     worker in ``transfer.seconds(prompt_len)`` (links never contend); the first
     token reaches the client when it lands (that is the TTFT).
  4. decode: at the decode worker's next step boundary the sequence joins the
     continuous batch (sequence cap and KV capacity permitting, else it waits) and
     gets one token per step of ``decode.step(num_seqs, context_tokens)``.
An aggregated worker runs the same engine loop as splitserve's: each step takes
every running decode (one token each) and then prompt chunks in the rest of the
token budget, and lasts ``profiles.mixed_step`` -- so a long prompt admitted
beside running decodes stretches their inter-token gap (the stall that
disaggregation removes).

Conditional disaggregation (``LocalPrefill``, off unless asked for; the CLI asks
for what ``splitserve serve`` does by default): at arrival, a prompt short enough
for the router's token threshold or time budget skips the prefill worker and the
transfer and is prefilled by its decode worker, in the same engine loop as an
aggregated worker's, beside the streams there.
"""

from __future__ import annotations

import heapq
import itertools
import re
from collections import deque
from dataclasses import dataclass
from typing import Literal

from splitserve.tune.curves import PrefillProfile, Profiles
from splitserve.tune.workload import SLO, RequestRecord, RequestSpec, percentile

_ARRIVAL, _PREFILL_DONE, _KV_ARRIVED, _STEP_DONE = range(4)


@dataclass(frozen=True, order=True)
class Split:
    """``num_prefill`` prefill + ``num_decode`` decode workers, or ``num_decode`` aggregated workers; one unit each."""

    num_prefill: int
    num_decode: int
    mode: Literal["disaggregated", "aggregated"] = "disaggregated"

    def __post_init__(self) -> None:
        if self.mode == "aggregated" and self.num_prefill != 0:
            raise ValueError(f"an aggregated split has no prefill workers, got num_prefill={self.num_prefill}")
        if self.mode == "disaggregated" and self.num_prefill < 1:
            raise ValueError("a disaggregated split needs at least one prefill worker (or use mode='aggregated')")
        if self.num_decode < 1:
            raise ValueError(f"a split needs at least one decode (or aggregated) worker, got {self.num_decode}")

    @property
    def num_units(self) -> int:
        return self.num_prefill + self.num_decode

    @property
    def label(self) -> str:
        return f"agg{self.num_decode}" if self.mode == "aggregated" else f"{self.num_prefill}P{self.num_decode}D"

    @classmethod
    def parse(cls, text: str) -> "Split":
        """``"1P1D"``, ``"3P5D"``, ``"agg2"`` (case-insensitive)."""
        t = text.strip().lower()
        if m := re.fullmatch(r"(\d+)p(\d+)d", t):
            return cls(int(m[1]), int(m[2]))
        if m := re.fullmatch(r"agg(\d+)", t):
            return cls(0, int(m[1]), "aggregated")
        raise ValueError(f"cannot parse split {text!r}; write e.g. '1P1D', '3P5D' or 'agg2'")


@dataclass(frozen=True)
class LocalPrefill:
    """Which prompts the router prefills on their decode worker (``scheduler.policy`` rules 3 and 4, without a prefix
    cache): at most ``threshold_tokens`` uncached tokens, or a prompt that, behind the prompts already queued on that
    decode worker, would be prefilled there within ``budget_s``. A prompt token costs what the prefill curve gives a
    step of the prompt's size per token (the router's figure is the same kind: step time over tokens, measured)."""

    threshold_tokens: int = 0
    budget_s: float = 0.0

    def __post_init__(self) -> None:
        if self.threshold_tokens < 0 or self.budget_s < 0:
            raise ValueError(f"local prefill needs threshold_tokens >= 0 and budget_s >= 0, got {self}")

    def is_local(self, num_tokens: int, queued_tokens: int, prefill: PrefillProfile) -> bool:
        if num_tokens <= self.threshold_tokens:
            return True
        if self.budget_s <= 0 or num_tokens <= 0:
            return False
        return (queued_tokens + num_tokens) * prefill.latency(num_tokens) / num_tokens <= self.budget_s


NO_LOCAL_PREFILL = LocalPrefill()


def candidate_splits(num_units: int, aggregated: bool = True) -> list[Split]:
    """Every disaggregated split using all ``num_units`` (1P(N-1)D .. (N-1)P1D), then the aggregated baseline."""
    if num_units < 1:
        raise ValueError(f"need at least one unit, got {num_units}")
    out = [Split(p, num_units - p) for p in range(1, num_units)]
    if aggregated:
        out.append(Split(0, num_units, "aggregated"))
    return out


class _Req:
    __slots__ = ("spec", "remaining", "first_token_s", "join_step", "decode_id", "missed")

    def __init__(self, spec: RequestSpec) -> None:
        self.spec = spec
        self.missed = False  # already counted as an SLO miss
        self.remaining = spec.prompt_len  # prompt tokens not yet prefilled
        self.first_token_s = 0.0
        self.join_step = 0
        self.decode_id = -1


class _DecodeBatch:
    """The running sequences of one worker, kept as aggregates so a step costs O(finishing sequences)."""

    def __init__(self) -> None:
        self.num_seqs = 0
        self.ctx_tokens = 0
        self.step_ends: list[float] = []  # end time of every step so far
        self.finish_heap: list[tuple[int, int, _Req]] = []  # (last step index, tiebreak, req)
        self._tie = itertools.count()

    def admit(self, req: _Req) -> None:
        """Join before the next step; it needs ``output_len - 1`` more tokens."""
        req.join_step = len(self.step_ends)
        self.num_seqs += 1
        self.ctx_tokens += req.spec.prompt_len + 1
        heapq.heappush(self.finish_heap, (req.join_step + req.spec.output_len - 2, next(self._tie), req))

    def complete_step(self, now: float) -> list[_Req]:
        """Record a step's end: every sequence got a token; returns the ones that are done."""
        k = len(self.step_ends)
        self.step_ends.append(now)
        self.ctx_tokens += self.num_seqs
        done = []
        while self.finish_heap and self.finish_heap[0][0] == k:
            req = heapq.heappop(self.finish_heap)[2]
            done.append(req)
            self.num_seqs -= 1
            self.ctx_tokens -= req.spec.prompt_len + req.spec.output_len
        return done

    def record(self, req: _Req, keep_gaps: bool) -> RequestRecord:
        spec = req.spec
        ends = self.step_ends[req.join_step:]
        gaps = [ends[0] - req.first_token_s] + [b - a for a, b in zip(ends, ends[1:])]
        return _record(spec, req.first_token_s, ends[-1], gaps, keep_gaps)


def _record(spec: RequestSpec, first_s: float, finish_s: float, gaps: list[float], keep_gaps: bool) -> RequestRecord:
    rec = RequestRecord(spec.index, spec.arrival_s, spec.prompt_len, spec.output_len, ttft_s=first_s - spec.arrival_s,
                        finish_s=finish_s, num_output_tokens=spec.output_len)
    if gaps:
        rec.itl_mean_s = (finish_s - first_s) / len(gaps)
        rec.itl_p90_s = percentile(gaps, 90)
        if keep_gaps:
            rec.itl_gaps_s = gaps
    return rec


class _Sim:
    def __init__(self, split: Split, profiles: Profiles, keep_gaps: bool, slo: SLO | None, max_misses: int | None,
                 local_prefill: LocalPrefill = NO_LOCAL_PREFILL) -> None:
        self.split, self.prof, self.keep_gaps, self.local = split, profiles, keep_gaps, local_prefill
        self.slo, self.max_misses, self.num_misses = slo, max_misses, 0
        self.events: list[tuple[float, int, int, int, object]] = []
        self._seq = itertools.count()
        self.records: list[RequestRecord] = []
        n_p = split.num_prefill
        n_d = split.num_decode
        self.p_queue = [deque() for _ in range(n_p)]  # prompts waiting or being chunked (FCFS)
        self.p_queued_tokens = [0] * n_p
        self.p_busy = [False] * n_p
        self.p_batch: list[list[tuple[_Req, int]]] = [[] for _ in range(n_p)]
        self.d_batch = [_DecodeBatch() for _ in range(n_d)]
        self.d_waiting = [deque() for _ in range(n_d)]  # disaggregated: KV landed, not yet in the batch
        self.d_committed = [0] * n_d  # KV tokens promised: running + in flight + waiting
        self.d_busy = [False] * n_d
        self.a_queue = [deque() for _ in range(n_d)]  # aggregated or local: prompts not fully prefilled here
        self.a_queued_tokens = [0] * n_d
        self.a_step: list[list[tuple[_Req, int]]] = [[] for _ in range(n_d)]

    def push(self, t: float, kind: int, worker: int, payload: object = None) -> None:
        heapq.heappush(self.events, (t, next(self._seq), kind, worker, payload))

    def run(self, requests: list[RequestSpec]) -> list[RequestRecord]:
        for spec in requests:
            self.push(spec.arrival_s, _ARRIVAL, -1, _Req(spec))
        aggregated = self.split.mode == "aggregated"
        while self.events and not self.stopped:
            now, _, kind, w, payload = heapq.heappop(self.events)
            if kind == _ARRIVAL:
                (self._arrive_aggregated if aggregated else self._arrive)(now, payload)
            elif kind == _PREFILL_DONE:
                self._prefill_done(now, w)
            elif kind == _KV_ARRIVED:
                self._kv_arrived(now, w, payload)
            else:
                self._step_done(now, w)
        if self.stopped:  # the rest can no longer change the verdict: report them unfinished
            done = {r.index for r in self.records}
            self.records += [RequestRecord(s.index, s.arrival_s, s.prompt_len, s.output_len, error="not simulated: too many SLO misses")
                             for s in requests if s.index not in done]
        assert len(self.records) == len(requests), (len(self.records), len(requests))
        self.records.sort(key=lambda r: r.index)
        return self.records

    @property
    def stopped(self) -> bool:
        return self.max_misses is not None and self.num_misses > self.max_misses

    def _first_token(self, req: _Req, now: float) -> None:
        req.first_token_s = now
        if self.slo is not None and now - req.spec.arrival_s > self.slo.ttft_s:
            req.missed = True
            self.num_misses += 1

    def _finish(self, req: _Req, rec: RequestRecord) -> None:
        self.records.append(rec)
        if self.slo is not None and not req.missed and not rec.meets(self.slo):
            self.num_misses += 1

    # ---- disaggregated ----------------------------------------------------------
    def _arrive(self, now: float, req: _Req) -> None:
        n = req.spec.prompt_len
        cap = self.prof.decode.kv_capacity_tokens
        d = min(range(len(self.d_batch)), key=lambda i: (-(cap - self.d_committed[i]), self.d_batch[i].num_seqs + len(self.d_waiting[i]), i))
        req.decode_id = d
        self.d_committed[d] += n + req.spec.output_len
        if self.local.is_local(n, self.a_queued_tokens[d], self.prof.prefill):
            self._queue_here(now, d, req)
            return
        p = min(range(len(self.p_queue)), key=lambda i: (self.p_queued_tokens[i], len(self.p_queue[i]), i))
        self.p_queue[p].append(req)
        self.p_queued_tokens[p] += n
        if not self.p_busy[p]:
            self._start_prefill(now, p)

    def _start_prefill(self, now: float, p: int) -> None:
        budget = self.prof.prefill.token_budget
        batch = []
        for req in self.p_queue[p]:
            if budget <= 0:
                break
            take = min(req.remaining, budget)
            batch.append((req, take))
            budget -= take
        if not batch:
            self.p_busy[p] = False
            return
        self.p_busy[p] = True
        self.p_batch[p] = batch
        tokens = self.prof.prefill.token_budget - budget
        self.push(now + self.prof.prefill.latency(tokens), _PREFILL_DONE, p)

    def _prefill_done(self, now: float, p: int) -> None:
        for req, take in self.p_batch[p]:
            req.remaining -= take
            self.p_queued_tokens[p] -= take
            if req.remaining == 0:
                self.p_queue[p].remove(req)  # finished chunks are at the front: O(1) in practice
                self.push(now + self.prof.transfer.seconds(req.spec.prompt_len), _KV_ARRIVED, req.decode_id, req)
        self._start_prefill(now, p)

    def _kv_arrived(self, now: float, d: int, req: _Req) -> None:
        self._first_token(req, now)
        if req.spec.output_len <= 1:
            self.d_committed[d] -= req.spec.prompt_len + req.spec.output_len
            self._finish(req, _record(req.spec, now, now, [], self.keep_gaps))
            return
        self.d_waiting[d].append(req)
        if not self.d_busy[d]:
            self._start_step(now, d)

    def _admit(self, d: int, queue: deque) -> None:
        batch, dec = self.d_batch[d], self.prof.decode
        while queue and batch.num_seqs < dec.max_num_seqs:
            req = queue[0]
            # a sequence waits while its whole context would not fit (the first one always runs)
            if batch.num_seqs and batch.ctx_tokens + req.spec.prompt_len + req.spec.output_len > dec.kv_capacity_tokens:
                break
            batch.admit(queue.popleft())

    # ---- aggregated, and the engine loop of every decode or aggregated worker ------------
    def _arrive_aggregated(self, now: float, req: _Req) -> None:
        w = min(range(len(self.a_queue)), key=lambda i: (self.a_queued_tokens[i], self.d_batch[i].num_seqs + len(self.a_queue[i]), i))
        self.d_committed[w] += req.spec.prompt_len + req.spec.output_len
        self._queue_here(now, w, req)

    def _queue_here(self, now: float, w: int, req: _Req) -> None:
        """A prompt that worker ``w`` prefills itself (aggregated, or local on a decode worker)."""
        self.a_queue[w].append(req)
        self.a_queued_tokens[w] += req.spec.prompt_len
        if not self.d_busy[w]:
            self._start_step(now, w)

    def _start_step(self, now: float, w: int) -> None:
        """The next step: the running streams (and those whose KV landed) decode, prompts queued here fill the budget."""
        self._admit(w, self.d_waiting[w])
        batch, prof = self.d_batch[w], self.prof
        budget = prof.prefill.token_budget - batch.num_seqs
        room = prof.decode.max_num_seqs - batch.num_seqs
        chunks = []
        for req in self.a_queue[w]:
            if budget <= 0 or room <= 0:
                break
            take = min(req.remaining, budget)
            chunks.append((req, take))
            budget -= take
            room -= 1
        if not chunks and batch.num_seqs == 0:
            self.d_busy[w] = False
            return
        self.d_busy[w] = True
        self.a_step[w] = chunks
        num_prefill_tokens = sum(t for _, t in chunks)
        self.push(now + prof.mixed_step(num_prefill_tokens, batch.num_seqs, batch.ctx_tokens), _STEP_DONE, w)

    def _step_done(self, now: float, w: int) -> None:
        batch = self.d_batch[w]
        for req in batch.complete_step(now):
            self.d_committed[w] -= req.spec.prompt_len + req.spec.output_len
            self._finish(req, batch.record(req, self.keep_gaps))
        for req, take in self.a_step[w]:
            req.remaining -= take
            self.a_queued_tokens[w] -= take
            if req.remaining == 0:
                self.a_queue[w].remove(req)
                self._first_token(req, now)
                if req.spec.output_len <= 1:
                    self.d_committed[w] -= req.spec.prompt_len + req.spec.output_len
                    self._finish(req, _record(req.spec, now, now, [], self.keep_gaps))
                else:
                    batch.admit(req)  # its step already counted it against the sequence cap
        self._start_step(now, w)


def simulate(split: Split, requests: list[RequestSpec], profiles: Profiles, keep_gaps: bool = False,
             slo: SLO | None = None, max_misses: int | None = None, local_prefill: LocalPrefill = NO_LOCAL_PREFILL) -> list[RequestRecord]:
    """One record per request (in ``requests`` order); ``keep_gaps`` also keeps every inter-token gap.

    With ``slo`` and ``max_misses`` the run stops as soon as more than ``max_misses``
    requests have missed the SLO (the verdict "attainment too low" cannot change);
    the requests not finished by then come back as failed records.
    """
    if not requests:
        return []
    if max_misses is not None and slo is None:
        raise ValueError("max_misses needs an slo to count misses against")
    return _Sim(split, profiles, keep_gaps, slo, max_misses, local_prefill).run(requests)

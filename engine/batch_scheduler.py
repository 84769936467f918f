"""Continuous batching: which sequences run in the next step, and how many tokens each.

Pure logic over ``Sequence`` records and a ``BlockPool`` (no tensors, no I/O).
Each step: running sequences first (decodes take one token; unfinished prefills
take a chunk), then waiting sequences are admitted in (priority, arrival) order (lower priority value first, as in vLLM)
while the token budget, the sequence cap and the free blocks allow. A prompt
longer than the budget is prefilled in chunks over several steps. A step that
also decodes gives prompts at most ``max_prefill_tokens_beside_decodes`` of its
budget, so a new prompt delays the running streams by a bounded chunk, not by its
whole length (a step with no decodes still prefills as much as the budget allows,
which is what a lone request's time to first token wants). With latency targets
(``engine.slo_policy``), prompts that can still meet the TTFT target are admitted
before late ones, and prompt tokens beside decodes are limited to what keeps the
running streams within the TPOT target. When a running
sequence needs a block and none is free, the most recently arrived running
sequence is preempted (blocks freed, recomputed later); nothing ever crashes on a
full pool.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from splitserve.engine.block_pool import BlockPool, compute_block_hashes
from splitserve.engine.sequence import Sequence, SequenceStatus
from splitserve.engine.slo_policy import LatencyTargets, StepCosts, may_join_step, order_waiting, prompt_token_allowance


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step computes the sequence's last known token, so a next token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    decodes: list[ScheduledChunk] = field(default_factory=list)  # exactly one new token each
    prefills: list[ScheduledChunk] = field(default_factory=list)  # one or more new tokens after cached ones
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def chunks(self) -> list[ScheduledChunk]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.num_new_tokens for c in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class BatchScheduler:
    def __init__(
        self, pool: BlockPool, max_num_batched_tokens: int, max_num_seqs: int, max_prefill_tokens_beside_decodes: int | None = None,
        targets: LatencyTargets | None = None,
    ):
        self.pool = pool
        self.block_size = pool.block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens_beside_decodes = max_prefill_tokens_beside_decodes
        self.targets = targets
        self.costs = StepCosts()  # the engine reports each step's time (``observe``); only the targets' rules read it
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    # ---- queue management -------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        if not self.waiting or self.waiting[-1].priority <= seq.priority:
            self.waiting.append(seq)
            return
        # as in vLLM: a lower priority value is served first; FCFS within a priority
        for i, other in enumerate(self.waiting):
            if other.priority > seq.priority:
                self.waiting.insert(i, seq)
                return
        self.waiting.append(seq)

    def finish(self, seq: Sequence, status: SequenceStatus, keep_blocks: bool = False) -> list[int]:
        """Mark finished and return its blocks to the pool (kept as prefix cache where hashed).

        With ``keep_blocks`` the blocks stay referenced and are returned to the caller,
        who frees them later (a prefill worker keeps them until the KV transfer is done).
        """
        seq.status = status
        blocks = seq.block_ids
        if not keep_blocks:
            self.pool.free(blocks)
            blocks = []
        seq.block_ids = []
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        return blocks

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def num_queued_prompt_tokens(self) -> int:
        """Prompt tokens still to compute: the waiting sequences' and what is left of prompts already being prefilled
        in chunks (a running sequence with more than its newest token uncomputed). Copies first: a load report may
        read this from another thread while a step runs."""
        running = sum(n for n in (s.num_uncomputed_tokens for s in list(self.running)) if n > 1)
        return running + sum(s.num_uncomputed_tokens for s in list(self.waiting))

    # ---- one step -----------------------------------------------------------
    def _blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_ids))

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _admit_prefix(self, seq: Sequence) -> None:
        """On (re)admission, reuse cached full blocks; always leave >= 1 token to compute."""
        if not self.pool.enable_prefix_caching:
            return
        max_cached_blocks = (seq.num_tokens - 1) // self.block_size
        hashes = compute_block_hashes(seq.token_ids[: max_cached_blocks * self.block_size], self.block_size)
        hits = self.pool.lookup_prefix(hashes)
        seq.block_ids = hits
        seq.block_hashes = hashes[: len(hits)]
        seq.num_computed_tokens = len(hits) * self.block_size
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = seq.num_computed_tokens

    def _prefill_budget(self, now: float | None) -> int:
        """Most prompt tokens this step may compute: all of the budget, unless running streams decode beside them."""
        if not any(seq.num_uncomputed_tokens == 1 for seq in self.running):
            return self.max_num_batched_tokens
        limit = self.max_prefill_tokens_beside_decodes
        if self.targets is not None and now is not None and (  # a plain decode step (no prompt work) computes nothing here
            self.waiting or any(seq.num_uncomputed_tokens > 1 for seq in self.running)
        ):
            allowance = prompt_token_allowance(self.running, now, self.targets, self.costs)
            if allowance is not None:
                limit = allowance if limit is None else min(limit, allowance)
        return self.max_num_batched_tokens if limit is None else limit

    def _order_waiting(self, now: float) -> set[str]:
        """Reorders the queue by the latency targets; returns the ids of the prompts that would miss their TTFT."""
        assert self.targets is not None
        tokens_ahead = sum(seq.num_uncomputed_tokens for seq in self.running if seq.num_uncomputed_tokens > 1)
        ordered, late = order_waiting(self.waiting, tokens_ahead, now, self.targets, self.costs)
        self.waiting = deque(ordered)
        return late

    def schedule(self, now: float | None = None) -> SchedulerOutput:
        """The next step's work; ``now`` (the engine's monotonic clock) drives the latency targets' rules, if any."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        prefill_budget = self._prefill_budget(now)
        targets = self.targets if now is not None else None
        late = self._order_waiting(now) if targets is not None and self.waiting else set()
        step_prompt_tokens, step_deadline = 0, float("inf")  # prompt tokens in this step; the earliest TTFT deadline among them
        scheduled: list[ScheduledChunk] = []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING:  # preempted below by an earlier sequence
                continue
            if budget <= 0:
                break
            num_new = min(seq.num_uncomputed_tokens, budget)
            if num_new > 1:
                if prefill_budget <= 0:
                    continue
                num_new = min(num_new, prefill_budget)
            need = self._blocks_needed(seq, num_new)
            while not self.pool.can_allocate(need):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.block_ids.extend(self.pool.allocate(need))
            scheduled.append(ScheduledChunk(seq, num_new))
            budget -= num_new
            if num_new > 1:
                prefill_budget -= num_new
                step_prompt_tokens += num_new
                if targets is not None and not seq.num_output_tokens and seq.arrival_time + targets.ttft_s > now:
                    step_deadline = min(step_deadline, seq.arrival_time + targets.ttft_s)

        while self.waiting and min(budget, prefill_budget) > 0 and not out.preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if targets is not None:
                assert now is not None
                if not may_join_step(seq, seq.req_id in late, step_prompt_tokens, step_deadline, now, targets, self.costs):
                    break
                if seq.req_id not in late and not seq.num_output_tokens:
                    step_deadline = min(step_deadline, seq.arrival_time + targets.ttft_s)
            looked_up = not seq.block_ids
            if looked_up:
                self._admit_prefix(seq)
            num_new = min(seq.num_uncomputed_tokens, budget, prefill_budget)
            need = self._blocks_needed(seq, num_new)
            if not self.pool.can_allocate(need):
                if looked_up:  # wait holding no prefix references: they could starve a sequence preempted in front of it
                    self.pool.free(seq.block_ids)
                    seq.block_ids, seq.block_hashes, seq.num_computed_tokens = [], [], 0
                break  # wait for blocks
            self.waiting.popleft()
            seq.block_ids.extend(self.pool.allocate(need))
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledChunk(seq, num_new))
            budget -= num_new
            prefill_budget -= num_new
            step_prompt_tokens += num_new

        for chunk in scheduled:
            is_decode = chunk.num_new_tokens == 1
            (out.decodes if is_decode else out.prefills).append(chunk)
        return out

    def advance(self, chunk: ScheduledChunk) -> None:
        """After the step ran: count the computed tokens and hash blocks that became full."""
        seq = chunk.seq
        seq.num_computed_tokens += chunk.num_new_tokens
        if not self.pool.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full > len(seq.block_hashes):
            parent = seq.block_hashes[-1] if seq.block_hashes else 0
            new = compute_block_hashes(seq.token_ids[: num_full * self.block_size], self.block_size, parent, len(seq.block_hashes))
            for i, h in enumerate(new, start=len(seq.block_hashes)):
                self.pool.register(seq.block_ids[i], h)
            seq.block_hashes.extend(new)

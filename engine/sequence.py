"""A request's state inside the engine.

Lifecycle: WAITING (queued; no blocks) -> RUNNING (blocks allocated; prefill
chunks, then one token per step) -> FINISHED_*. A RUNNING sequence may be
preempted back to WAITING: its blocks are freed and it is recomputed from
prompt + tokens so far when blocks are available again.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from splitserve.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # sampling, detokenizing or stop-checking this sequence failed; its batch went on

    @property
    def is_finished(self) -> bool:
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING)


@dataclass(slots=True, eq=False)  # identity: value equality made every `seq in running` compare all fields (O(n^2) per step)
class Sequence:
    req_id: str
    token_ids: list[int]  # prompt followed by generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full blocks, in order
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # tokens served from the prefix cache at admission
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    stop_reason: int | str | None = None
    keep_kv: bool = False  # on finish, hold the blocks for a KV transfer instead of freeing them
    compute_s: float = 0.0  # this sequence's share of the engine steps it was in (``LLMEngine.busy_s`` summed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

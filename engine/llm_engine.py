"""The engine loop: add requests, step, collect outputs.

Lifecycle of a request: ``add_request`` validates it (ValueError naming the field
and the allowed range, before any block is touched) and queues a ``Sequence``;
each ``step`` asks the batch scheduler what to run, runs the model once over the
packed batch, samples, detokenizes, checks stop conditions and frees the blocks
of finished sequences; ``abort_request`` frees a request's blocks at any time.
Three lines carry the data flow: schedule -> execute -> process.

Per-sequence failures stay per sequence: when sampling, detokenizing or the stop
check fails for one sequence, that sequence alone finishes with finish reason
``"error"`` (its blocks freed, the cause logged with its request id) and the rest
of the batch goes on. A failure of the step as a whole (the model) is the async
engine's to handle.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence as Seq

import torch

from splitserve.engine.batch_scheduler import BatchScheduler, SchedulerOutput
from splitserve.engine.block_pool import BlockPool, NoFreeBlocks, compute_block_hashes
from splitserve.engine.config import EngineConfig, resolve_max_model_len
from splitserve.engine.detokenizer import IncrementalDetokenizer, decoder_for
from splitserve.engine.model import StepAbandoned
from splitserve.engine.model_config import ModelConfig
from splitserve.engine.model_runner import ModelRunner
from splitserve.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from splitserve.engine.sampler import SampleFailed, sample_rows
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.sequence import Sequence, SequenceStatus
from splitserve.engine.slo_policy import LatencyTargets
from splitserve.engine.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


def resolve_model_path(model: str | None) -> str:
    if model is not None:
        return model
    from splitserve.engine.default_model import default_model_path

    return str(default_model_path())


class LLMEngine:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.model_path = resolve_model_path(cfg.model)
        self.model_config = ModelConfig.from_pretrained(self.model_path)
        mc = self.model_config
        self.max_model_len = resolve_max_model_len(cfg.max_model_len, mc)
        self.tokenizer = load_tokenizer(self.model_path)
        self._decode = None if self.tokenizer is None else decoder_for(self.tokenizer)  # one for every sequence's detokenizer
        self.runner = ModelRunner(cfg, self.model_path, mc, self.max_model_len)
        self.block_size = self.runner.block_size
        self.pool = BlockPool(self.runner.num_blocks, self.block_size, cfg.enable_prefix_caching)
        targets = LatencyTargets(cfg.slo_ttft_s, cfg.slo_tpot_s) if cfg.slo_ttft_s is not None and cfg.slo_tpot_s is not None else None
        self.scheduler = BatchScheduler(
            self.pool, cfg.max_num_batched_tokens, cfg.max_num_seqs, cfg.max_prefill_tokens_beside_decodes, targets,
        )
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._prompts: dict[str, str | None] = {}
        self._prompt_ids: dict[str, list[int]] = {}  # one copy per request, shared by its outputs (not one per token)
        self._emitted: dict[str, tuple[int, int]] = {}  # tokens and characters already reported
        self._counter = itertools.count()
        self._held: dict[str, list[int]] = {}  # finished keep_kv requests -> blocks awaiting transfer
        self._reserved: dict[str, list[int]] = {}  # decode side: blocks waiting for incoming KV
        self._reserved_cached: dict[str, int] = {}  # decode side: leading reserved blocks reused from the prefix cache
        self.busy_s = 0.0  # time spent in steps (forward, sampling, bookkeeping), all of it charged to sequences
        self.num_step_tokens = 0  # tokens computed by steps (prompt chunks and decodes)
        self.decode_step_s = 0.0  # moving average of the time of steps that decoded (the gap between a stream's tokens)
        self._stopping: set[str] = set()  # requests an abort is on its way for (``stop_soon``, from any thread)
        self._step_req_ids: list[str] = []  # the requests of the step being run
        self.num_abandoned_steps = 0
        self.runner.interrupt = self._step_is_moot

    @property
    def prompt_s_per_token(self) -> float:
        """Step time over tokens of this engine's recent prompt-only steps (``StepCosts``); 0.0 until measured."""
        return self.scheduler.costs.prompt_step_s_per_token or 0.0

    # ---- requests -------------------------------------------------------------
    def tokenize(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"the model at {self.model_path} has no tokenizer; pass prompts as lists of token ids")
            return list(self.tokenizer.encode(prompt))
        return list(prompt)

    def validate_prompt(self, token_ids: Seq[int]) -> None:
        """ValueError naming the problem for prompts the engine cannot serve."""
        if len(token_ids) == 0:
            raise ValueError("prompt must not be empty (got 0 tokens)")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab - 1}] (the vocabulary); got {bad[:5]}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens but the model's context is {self.max_model_len} tokens "
                f"(max_model_len), leaving no room to generate; shorten the prompt to at most {self.max_model_len - 1} tokens"
            )
        need = -(-(len(token_ids) + 1) // self.block_size)
        if need > self.pool.num_blocks:
            raise ValueError(f"prompt needs {need} KV blocks but the whole pool has {self.pool.num_blocks}; raise kv_cache_memory_bytes")

    def add_request(
        self,
        prompt: str | Seq[int],
        params: SamplingParams | None = None,
        req_id: str | None = None,
        *,
        priority: int = 0,
        arrival_time: float | None = None,
        keep_kv: bool = False,
    ) -> str:
        """Queue a request; ``keep_kv`` holds its KV blocks after it finishes (see ``release_kv``)."""
        params = params or SamplingParams()
        params.validate()
        token_ids = self.tokenize(prompt)
        self.validate_prompt(token_ids)
        bad_stop = [t for t in params.stop_token_ids if t >= self.model_config.vocab_size]
        if bad_stop:
            raise ValueError(f"stop_token_ids must be in [0, {self.model_config.vocab_size - 1}], got {bad_stop}")
        req_id = req_id if req_id is not None else f"req-{next(self._counter)}"
        if req_id in self._seqs:
            raise ValueError(f"request id {req_id!r} is already in use")
        seq = Sequence(
            req_id=req_id,
            token_ids=list(token_ids),
            num_prompt_tokens=len(token_ids),
            params=params,
            priority=priority,
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(),
            generator=torch.Generator().manual_seed(params.seed) if params.seed is not None else None,
            keep_kv=keep_kv,
        )
        self._track(seq, prompt if isinstance(prompt, str) else None)
        self.scheduler.add(seq)
        return req_id

    def resume_request(
        self, req_id: str, prompt_ids: Seq[int], output_ids: Seq[int], params: SamplingParams, *, num_sent_chars: int = 0,
        priority: int = 0,
    ) -> str:
        """Continue a request another worker started (it died mid-stream): same prompt, ``output_ids`` already out.

        The sequence is prompt + those tokens, all prefilled here; counting, stop
        rules and detokenization go on as if nothing happened (``max_tokens``
        counts the earlier tokens, a stop string may span the seam), and the
        first output carries the text the caller had not received yet: whatever
        lies past ``num_sent_chars`` (held back for a stop string, or an
        incomplete character) and the new token's.
        """
        output_ids = list(output_ids)
        self.add_request(list(prompt_ids) + output_ids, params, req_id, priority=priority)
        seq = self._seqs[req_id]
        seq.num_prompt_tokens = len(prompt_ids)
        detok = self._detok[req_id]
        for token in output_ids:
            detok.update(token)
        self._emitted[req_id] = (len(output_ids), min(num_sent_chars, len(detok.text)))
        return req_id

    def _track(self, seq: Sequence, prompt: str | None) -> None:
        p = seq.params
        self._seqs[seq.req_id] = seq
        self._prompts[seq.req_id] = prompt
        self._detok[seq.req_id] = IncrementalDetokenizer(
            self.tokenizer, p.skip_special_tokens, list(p.stop), p.include_stop_str_in_output, _decode=self._decode,
        )
        self._emitted[seq.req_id] = (0, 0)

    # ---- KV hand-off (disaggregated roles) ------------------------------------
    def release_kv(self, req_id: str) -> bool:
        """Free the blocks a finished ``keep_kv`` request still holds (after its transfer)."""
        blocks = self._held.pop(req_id, None)
        if blocks is None:
            return False
        self.pool.free(blocks)
        return True

    def reserve_blocks(self, req_id: str, num_tokens: int) -> list[int]:
        """Decode side: set aside blocks for ``num_tokens`` of incoming KV; raises ``NoFreeBlocks``."""
        return self._reserve(req_id, num_tokens, None)[1]

    def reserve_prompt(self, req_id: str, prompt_ids: Seq[int]) -> tuple[int, list[int]]:
        """Decode side, prefix-aware: reuse the cached leading blocks of the prompt, reserve the rest.

        Returns ``(num_cached_blocks, new_block_ids)``: the prefill worker writes only
        the prompt's blocks from ``num_cached_blocks`` on, into ``new_block_ids``. At
        least the last block always comes over the wire (so a transfer, and its
        notification, always happen), and cached blocks are never written into:
        other running sequences may be reading them. Raises ``NoFreeBlocks``.
        """
        return self._reserve(req_id, len(prompt_ids), prompt_ids)

    def _reserve(self, req_id: str, num_tokens: int, prompt_ids: Seq[int] | None) -> tuple[int, list[int]]:
        if req_id in self._reserved or req_id in self._seqs:
            raise ValueError(f"request id {req_id!r} is already in use")
        if num_tokens < 1 or num_tokens >= self.max_model_len:
            raise ValueError(f"cannot reserve KV for {num_tokens} tokens; the model's context is {self.max_model_len} tokens")
        cached: list[int] = []
        if prompt_ids is not None and self.pool.enable_prefix_caching:
            reusable = (num_tokens - 1) // self.block_size  # full blocks before the one holding the last prompt token
            cached = self.pool.lookup_prefix(compute_block_hashes(list(prompt_ids[: reusable * self.block_size]), self.block_size))
        try:
            new = self.pool.allocate(-(-num_tokens // self.block_size) - len(cached))
        except NoFreeBlocks:
            self.pool.free(cached)
            raise
        self._reserved[req_id] = cached + new
        self._reserved_cached[req_id] = len(cached)
        return len(cached), new

    def release_reservation(self, req_id: str) -> bool:
        self._reserved_cached.pop(req_id, None)
        blocks = self._reserved.pop(req_id, None)
        if blocks is None:
            return False
        self.pool.free(blocks)
        return True

    def rename_reservation(self, req_id: str, new_id: str) -> bool:
        """Keep ``req_id``'s reserved blocks under ``new_id`` (its name is free again for a new reservation)."""
        if req_id not in self._reserved or new_id in self._reserved or new_id in self._seqs:
            return False
        self._reserved[new_id] = self._reserved.pop(req_id)
        self._reserved_cached[new_id] = self._reserved_cached.pop(req_id, 0)
        return True

    def add_prefilled_request(
        self, req_id: str, prompt_ids: Seq[int], first_token: int, params: SamplingParams, *, priority: int = 0,
        arrival_time: float | None = None,
    ) -> RequestOutput:
        """Decode side: admit a request whose prompt KV arrived in its reserved blocks.

        The first token (sampled by the prefill worker) is reported at once; the
        request then decodes like any other, or finishes here if that token ends it.
        """
        blocks = self._reserved.pop(req_id, None)
        num_cached_blocks = self._reserved_cached.pop(req_id, 0)
        if blocks is None:
            raise ValueError(f"request {req_id!r} has no reserved KV blocks on this worker")
        try:
            self.validate_prompt(prompt_ids)
            if not 0 <= first_token < self.model_config.vocab_size:
                raise ValueError(f"first token {first_token} is outside the vocabulary")
        except ValueError:
            self.pool.free(blocks)
            raise
        now = time.monotonic()
        seq = Sequence(
            req_id=req_id, token_ids=list(prompt_ids), num_prompt_tokens=len(prompt_ids), params=params, priority=priority,
            arrival_time=arrival_time if arrival_time is not None else now,
            generator=torch.Generator().manual_seed(params.seed) if params.seed is not None else None,
            block_ids=blocks, num_computed_tokens=len(prompt_ids), first_scheduled_time=now,
            num_cached_tokens=num_cached_blocks * self.block_size,
        )
        if self.pool.enable_prefix_caching:
            seq.block_hashes = compute_block_hashes(seq.token_ids, self.block_size)
            for block_id, h in zip(blocks, seq.block_hashes):
                self.pool.register(block_id, h)
        self._track(seq, None)
        self.scheduler.add(seq)
        return self._append_token(seq, first_token, now)

    def abort_request(self, req_id: str) -> bool:
        """Stop a request and free its blocks (held or reserved ones too); False if there was nothing to stop."""
        self._stopping.discard(req_id)
        if self.release_reservation(req_id) | self.release_kv(req_id):
            return True
        seq = self._seqs.get(req_id)
        if seq is None or seq.is_finished:
            return False
        self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
        seq.finished_time = time.monotonic()
        self._forget(req_id)
        return True

    def num_blocks_in_flight(self) -> int:
        """Blocks held for transfers or reserved for incoming KV."""
        return sum(map(len, self._held.values())) + sum(map(len, self._reserved.values()))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    @property
    def num_unfinished_requests(self) -> int:
        return self.scheduler.num_unfinished

    # ---- the loop -------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        sched = self.scheduler.schedule(time.monotonic())
        if sched.is_empty:
            return []
        self._step_req_ids = [c.seq.req_id for c in sched.chunks]
        try:
            logits = self.runner.execute(sched)
        except StepAbandoned:
            # nothing advanced: a sequence in it would compute the same chunk again (each is being aborted anyway)
            self.num_abandoned_steps += 1
            self._charge_sequences(sched, time.perf_counter() - start)
            return []
        finally:
            self._step_req_ids = []
        return self._process(sched, logits, start)

    def stop_soon(self, req_id: str) -> None:
        """An abort of ``req_id`` is on its way (``abort_request`` runs between steps). Safe from any thread: a step
        running now whose every request is about to be aborted is given up at its next layer, so a long prompt's
        chunk does not run to its end for a client that left."""
        self._stopping.add(req_id)

    def _step_is_moot(self) -> bool:
        stopping = self._stopping
        return bool(stopping) and bool(self._step_req_ids) and all(r in stopping for r in self._step_req_ids)

    def _process(self, sched: SchedulerOutput, logits: torch.Tensor, start: float) -> list[RequestOutput]:
        now = time.monotonic()
        sampling = [c for c in sched.chunks if c.samples]
        tokens = sample_rows(logits, [c.seq.params for c in sampling], [c.seq.generator for c in sampling], self.generator)
        for chunk in sched.chunks:
            if chunk.seq.first_scheduled_time is None:
                chunk.seq.first_scheduled_time = now
            self.scheduler.advance(chunk)
        self._charge(sched, time.perf_counter() - start)
        outputs = []
        for chunk, token in zip(sampling, tokens):
            if isinstance(token, SampleFailed):
                outputs.append(self._fail(chunk.seq, token, now))
                continue
            try:
                outputs.append(self._append_token(chunk.seq, token, now))
            except Exception as e:  # detokenizer or stop check: this sequence only
                outputs.append(self._fail(chunk.seq, e, now))
        return outputs

    def _charge(self, sched: SchedulerOutput, elapsed_s: float) -> None:
        """Split a step's time over its sequences by the tokens each computed in it (a decode step: evenly)."""
        self.num_step_tokens += sched.num_tokens
        self.scheduler.costs.observe(sched.num_tokens - len(sched.decodes), len(sched.decodes), elapsed_s)
        if sched.decodes:
            self.decode_step_s = elapsed_s if not self.decode_step_s else 0.8 * self.decode_step_s + 0.2 * elapsed_s
        self._charge_sequences(sched, elapsed_s)

    def _charge_sequences(self, sched: SchedulerOutput, elapsed_s: float) -> None:
        """Busy time, every second of it charged to the step's sequences by the tokens each computed (a step given
        up too: its time was spent; it does not count as a step's cost, which the latency rules learn from)."""
        self.busy_s += elapsed_s
        per_token = elapsed_s / max(1, sched.num_tokens)
        for chunk in sched.chunks:
            chunk.seq.compute_s += per_token * chunk.num_new_tokens

    def _fail(self, seq: Sequence, error: BaseException, now: float) -> RequestOutput:
        """End ``seq`` with finish reason "error" and free its blocks; the rest of the batch is untouched.

        The cause goes to the log with the request id, not to the caller: it may
        name internals, and the client only needs to know its request failed.
        """
        logger.error("request %s failed in the engine step and was ended: %r", seq.req_id, error, exc_info=error)
        if seq.is_finished:  # failed after finishing (building its output): blocks already freed or held
            seq.status = SequenceStatus.FINISHED_ERROR
        else:
            self.scheduler.finish(seq, SequenceStatus.FINISHED_ERROR)  # never keeps blocks for a transfer
        seq.finished_time = now
        self._forget(seq.req_id)
        return RequestOutput(
            req_id=seq.req_id, prompt=None, prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            outputs=[CompletionOutput(0, "", [], SequenceStatus.FINISHED_ERROR.value)], finished=True,
            metrics=RequestMetrics(
                arrival_time=seq.arrival_time, first_scheduled_time=seq.first_scheduled_time, finished_time=now, compute_s=seq.compute_s,
            ),
        )

    def _append_token(self, seq: Sequence, token: int, now: float) -> RequestOutput:
        seq.token_ids.append(token)
        seq.first_token_time = seq.first_token_time or now
        seq.last_token_time = now
        _, stop_str = self._detok[seq.req_id].update(token)
        status = self._finish_status(seq, token, stop_str)
        kept: list[int] = []
        if status is not None:
            kept = self.scheduler.finish(seq, status, keep_blocks=seq.keep_kv)
            if kept:
                self._held[seq.req_id] = kept
            seq.finished_time = now
        out = self._output(seq)
        out.kv_block_ids = kept
        if status is not None:
            self._forget(seq.req_id)
        return out

    def _finish_status(self, seq: Sequence, token: int, stop_str: str | None) -> SequenceStatus | None:
        p = seq.params
        if stop_str is not None:
            seq.stop_reason = stop_str
            return SequenceStatus.FINISHED_STOPPED
        if token in p.stop_token_ids:
            seq.stop_reason = token
            return SequenceStatus.FINISHED_STOPPED
        if not p.ignore_eos and token in self.model_config.eos_token_ids:
            return SequenceStatus.FINISHED_STOPPED
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return SequenceStatus.FINISHED_LENGTH
        return None

    def _output(self, seq: Sequence) -> RequestOutput:
        detok = self._detok[seq.req_id]
        num_sent_tokens, num_sent_chars = self._emitted[seq.req_id]
        out_ids = seq.output_ids
        # while running, hold back text a stop string could still claim
        holdback = max(detok.longest_stop, 1) - 1
        text_end = len(detok.text) if seq.is_finished else max(num_sent_chars, len(detok.text) - holdback)
        self._emitted[seq.req_id] = (len(out_ids), text_end)
        finish = seq.status.value if seq.is_finished else None
        metrics = RequestMetrics(
            arrival_time=seq.arrival_time, first_scheduled_time=seq.first_scheduled_time, first_token_time=seq.first_token_time,
            last_token_time=seq.last_token_time, finished_time=seq.finished_time, num_cached_tokens=seq.num_cached_tokens,
            num_preemptions=seq.num_preemptions, compute_s=seq.compute_s,
        )
        prompt_ids = self._prompt_ids.get(seq.req_id)
        if prompt_ids is None or len(prompt_ids) != seq.num_prompt_tokens:
            prompt_ids = self._prompt_ids[seq.req_id] = seq.token_ids[: seq.num_prompt_tokens]
        return RequestOutput(
            req_id=seq.req_id,
            prompt=self._prompts.get(seq.req_id),
            prompt_token_ids=prompt_ids,
            outputs=[CompletionOutput(0, detok.text, out_ids, finish, seq.stop_reason)],  # out_ids: a fresh slice
            finished=seq.is_finished,
            metrics=metrics,
            new_token_ids=out_ids[num_sent_tokens:],
            new_text=detok.text[num_sent_chars:text_end],
        )

    def _forget(self, req_id: str) -> None:
        for d in (self._seqs, self._detok, self._prompts, self._prompt_ids, self._emitted):
            d.pop(req_id, None)

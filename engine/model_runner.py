"""Owns the model weights and the KV cache tensor; turns a scheduled step into logits.

Start-up: read the checkpoint config, pick device, dtype and attention kernel,
load the weights, size and allocate the KV pool once (it never grows). Each step:
pack the scheduled chunks (decodes first) into flat tensors and attention
metadata, run the model, return logits for the chunks that sample.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from splitserve.engine.batch_scheduler import SchedulerOutput
from splitserve.engine.config import EngineConfig, resolve_device, resolve_dtype, resolve_num_blocks
from splitserve.engine.host_memory import keep_freed_memory
from splitserve.engine.model import LlamaModel
from splitserve.engine.model_config import ModelConfig
from splitserve.engine.openmp import llvm_openmp_loaded
from splitserve.kernels import FLASH_BLOCK_SIZE_MULTIPLE, AttentionMetadata, PrefillChunk, kv_cache_shape, select_attention
from splitserve.kernels.invariant_attention import invariant_attention

logger = logging.getLogger(__name__)

# Steps with fewer tokens than this run on ``small_step_threads``: row-few GEMMs (decodes) are memory-bound and
# short, so a parallel region costs about as much to start as it saves (the same crossover as FP32_MIN_TOKENS).
SMALL_STEP_TOKENS = 128


def off_main_thread_threads(num_threads: int) -> int:
    """Intra-op threads for a few-token step run off the process's main thread (``AsyncEngine``'s step thread).

    GNU OpenMP counts the main thread among the threads it manages even when it never
    runs a parallel region; when they outnumber the CPUs it may use, its idle threads
    stop spinning and sleep after every region, so each of a decode step's ~200 small
    ops pays a futex wake-up. Measured on 2 CPUs with 2 threads (one SmolLM2 decode
    step): 52 ms from a worker thread against 38 ms from the main thread, and 46 ms
    with 1 thread from the worker thread. So keep the team one smaller than the CPUs, unless an
    LLVM OpenMP runtime serves the process (``engine.openmp``: it has no such penalty).
    """
    if llvm_openmp_loaded():
        return num_threads
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(num_threads, cpus - 1))


class ModelRunner:
    def __init__(self, cfg: EngineConfig, model_path: str, model_config: ModelConfig, max_model_len: int):
        self.device = resolve_device(cfg)
        self.dtype = resolve_dtype(cfg, model_config, self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        if cfg.num_threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.num_threads)
        self.num_threads = torch.get_num_threads()  # for steps of many tokens (prefill)
        self.interrupt: Callable[[], bool] | None = None  # asked between layers: True gives the step up (StepAbandoned)
        self._small_steps_fixed = cfg.small_step_threads is not None
        self.small_step_threads = cfg.small_step_threads or self.num_threads
        prefer_flash = cfg.attention_backend in ("auto", "flash")
        self.attention_name, attention = select_attention(self.device, prefer_flash)
        if cfg.attention_backend == "flash" and self.attention_name != "flash":
            raise ValueError("attention_backend='flash' needs a CUDA device and the flash-attn package (pip install 'splitserve[gpu]')")
        if cfg.deterministic:
            if cfg.attention_backend == "flash":
                raise ValueError("deterministic: true uses its own batch-invariant attention; drop attention_backend='flash'")
            self.attention_name, attention = "invariant", invariant_attention
        default_bs = FLASH_BLOCK_SIZE_MULTIPLE if self.attention_name == "flash" else 16
        self.block_size = cfg.block_size or default_bs
        if self.attention_name == "flash" and self.block_size % FLASH_BLOCK_SIZE_MULTIPLE:
            raise ValueError(f"flash-attn paged kernels need block_size to be a multiple of {FLASH_BLOCK_SIZE_MULTIPLE}, got {self.block_size}")
        self.model_config = model_config
        self.model = LlamaModel.load(model_path, model_config, attention, max_model_len, self.device, self.dtype, cfg.deterministic)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.bytes_per_block = 2 * model_config.num_layers * self.block_size * model_config.num_kv_heads * model_config.head_dim * itemsize
        self.num_blocks = resolve_num_blocks(cfg, self.bytes_per_block, self.device)
        shape = kv_cache_shape(self.num_blocks, model_config.num_layers, self.block_size, model_config.num_kv_heads, model_config.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        logger.info(
            "model runner: %s on %s (%s, %s attention), KV pool %d blocks x %d tokens (%.1f MiB)",
            model_config.architecture, self.device, self.dtype, self.attention_name, self.num_blocks, self.block_size,
            self.num_blocks * self.bytes_per_block / 2**20,
        )

    def _metadata(self, sched: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_rows: list[int] = []
        for chunk in sched.chunks:
            seq = chunk.seq
            start = seq.num_computed_tokens
            end = start + chunk.num_new_tokens
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            blocks = seq.block_ids
            slots += [blocks[pos // bs] * bs + pos % bs for pos in range(start, end)]
            if chunk.samples:
                logits_rows.append(len(input_ids) - 1)
        dev = self.device
        decode_tables = decode_lens = None
        max_ctx = 0
        if sched.decodes:
            lens = [c.seq.num_computed_tokens + 1 for c in sched.decodes]
            max_ctx = max(lens)
            width = -(-max_ctx // bs)
            table = [c.seq.block_ids[:width] + [0] * (width - min(width, len(c.seq.block_ids))) for c in sched.decodes]
            decode_tables = torch.tensor(table, dtype=torch.int64, device=dev)
            decode_lens = torch.tensor(lens, dtype=torch.int64, device=dev)
        prefills = []
        offset = len(sched.decodes)
        for chunk in sched.prefills:
            seq = chunk.seq
            ctx = seq.num_computed_tokens + chunk.num_new_tokens
            table = torch.tensor(seq.block_ids[: -(-ctx // bs)], dtype=torch.int64, device=dev)
            prefills.append(PrefillChunk(offset, chunk.num_new_tokens, ctx, table))
            offset += chunk.num_new_tokens
        meta = AttentionMetadata(
            block_size=bs,
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            num_decode_tokens=len(sched.decodes),
            decode_block_tables=decode_tables,
            decode_context_lens=decode_lens,
            prefills=prefills,
            max_decode_context_len=max_ctx,
        )
        return (
            torch.tensor(input_ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            meta,
            torch.tensor(logits_rows, dtype=torch.int64, device=dev),
        )

    def steps_off_main_thread(self) -> None:
        """The caller runs ``execute`` from a thread other than the main one: size few-token steps for that
        (``off_main_thread_threads``), unless the config fixed ``small_step_threads``."""
        if not self._small_steps_fixed and self.device.type == "cpu":
            self.small_step_threads = off_main_thread_threads(self.num_threads)

    def execute(self, sched: SchedulerOutput) -> torch.Tensor:
        """Run one step; float32 logits for the sampling chunks, in ``sched.chunks`` order, on the model's device (the
        sampler brings back only token ids, and the rows that sample, not every row's whole vocabulary)."""
        input_ids, positions, meta, rows = self._metadata(sched)
        if self.device.type == "cpu":
            threads = self.small_step_threads if input_ids.shape[0] < SMALL_STEP_TOKENS else self.num_threads
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)
        return self.model.forward(input_ids, positions, meta, self.kv_cache, rows, self.interrupt)

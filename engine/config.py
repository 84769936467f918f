"""Engine settings (pydantic: they come from Python, YAML files and the CLI).

Validators reject bad values with a message that says how to fix them. Sizes that
depend on the checkpoint or the machine (dtype "auto", max_model_len, the number
of KV blocks) are resolved by ``resolve_*`` helpers when the engine starts.
"""

from __future__ import annotations

import logging
import os
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from splitserve.engine.model_config import ModelConfig, parse_dtype

logger = logging.getLogger(__name__)


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(None, description="HF checkpoint directory; None = the default model, SmolLM2-135M-Instruct")
    dtype: str = Field("auto", description="auto | float32 | bfloat16 | float16; auto = the checkpoint's dtype")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    attention_backend: Literal["auto", "torch", "flash"] = "auto"
    block_size: int | None = Field(None, ge=1, le=1024, description="tokens per KV block; None = 16 on CPU, 256 with flash-attn")
    kv_cache_memory_bytes: int | None = Field(None, ge=1, description="KV pool size in bytes (overrides the fraction)")
    kv_cache_memory_fraction: float = Field(0.1, gt=0, le=0.95, description="fraction of free memory for the KV pool")
    num_kv_blocks: int | None = Field(None, ge=1, description="exact number of KV blocks (overrides both sizes)")
    max_num_batched_tokens: int = Field(2048, ge=1, description="token budget of one step (prefill chunks + decodes)")
    max_prefill_tokens_beside_decodes: int | None = Field(
        None, ge=1, description="most prompt tokens in a step that also decodes (bounds how long a new prompt stalls the running "
        "streams; steps without decodes still take the whole budget); None = the whole budget",
    )
    slo_ttft_s: float | None = Field(
        None, gt=0, description="with slo_tpot_s: schedule to these targets (prompts that can still meet the time to first token "
        "go before late ones; prompt tokens beside decodes only as far as the streams' time per output token allows); "
        "None = first come, first served",
    )
    slo_tpot_s: float | None = Field(None, gt=0, description="the time-per-output-token target of slo_ttft_s's scheduling")
    max_num_seqs: int = Field(128, ge=1, description="most sequences running at once")
    max_model_len: int | None = Field(None, ge=2, description="context limit; None = the model's max_position_embeddings")
    enable_prefix_caching: bool = True
    seed: int = 0
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads on CPU; None = torch's default")
    small_step_threads: int | None = Field(
        None, ge=1, description="intra-op threads for steps of few tokens (decodes) on CPU; None = num_threads, or one fewer "
        "than the CPUs when the engine steps off the main thread under GNU OpenMP (splitserve.engine.model_runner.off_main_thread_threads)",
    )
    deterministic: bool = Field(False, description="batch-invariant numerics: a request's output does not depend on what runs beside it")

    @field_validator("dtype")
    @classmethod
    def _check_dtype(cls, v: str) -> str:
        if v != "auto":
            parse_dtype(v)
        return v

    @model_validator(mode="after")
    def _check_slo_pair(self) -> "EngineConfig":
        if (self.slo_ttft_s is None) != (self.slo_tpot_s is None):
            raise ValueError("set both slo_ttft_s and slo_tpot_s (scheduling to latency targets) or neither")
        return self

    @field_validator("block_size")
    @classmethod
    def _check_block_size(cls, v: int | None) -> int | None:
        if v is not None and v & (v - 1):
            raise ValueError(f"block_size must be a power of two (e.g. 16), got {v}")
        return v


def resolve_max_model_len(requested: int | None, model: ModelConfig) -> int:
    """The context limit: ``requested`` if the model runs it exactly, else a ValueError saying why not."""
    limit = model.max_context_len
    if requested is None:
        if model.context_limit_reason:
            logger.warning("context limited to %d tokens: %s", limit, model.context_limit_reason)
        return limit
    if requested > limit:
        why = model.context_limit_reason or f"the checkpoint's max_position_embeddings is {model.max_position_embeddings}"
        raise ValueError(f"max_model_len={requested} is longer than this model can run: {why}; set max_model_len <= {limit}")
    return requested


def resolve_device(cfg: EngineConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but CUDA is not available on this machine; use device='cpu' or 'auto'")
    return device


def resolve_dtype(cfg: EngineConfig, model: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype != "auto":
        return parse_dtype(cfg.dtype)
    ckpt = parse_dtype(model.checkpoint_dtype) if model.checkpoint_dtype in ("float32", "bfloat16", "float16") else torch.float32
    if device.type == "cuda" and ckpt == torch.float32:
        return torch.bfloat16
    if device.type == "cpu" and ckpt == torch.float16:
        return torch.bfloat16  # fp16 matmuls are slow on CPUs; bf16 keeps the range
    return ckpt


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def resolve_num_blocks(cfg: EngineConfig, bytes_per_block: int, device: torch.device) -> int:
    if cfg.num_kv_blocks is not None:
        return cfg.num_kv_blocks
    budget = cfg.kv_cache_memory_bytes or int(available_memory_bytes(device) * cfg.kv_cache_memory_fraction)
    num = budget // bytes_per_block
    if num < 1:
        raise ValueError(f"KV cache budget of {budget} bytes is smaller than one block ({bytes_per_block} bytes); raise kv_cache_memory_bytes")
    return int(num)

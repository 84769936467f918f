"""splitserve.kernels: attention and KV-cache ops behind one call signature.

``select_attention(device, prefer_flash)`` returns ``fn(q, k, v, kv_cache, layer,
meta, scale) -> out``: FlashAttention on CUDA when flash-attn is installed, the
torch SDPA path otherwise (whose decodes on a CPU read the paged cache in place
through ``cpu_decode_attention``'s native kernels where they built).
``reference_attention`` is the slow oracle for tests.
"""

from __future__ import annotations

from typing import Callable

import torch

from splitserve.kernels.cache_ops import gather_kv, gather_kv_batched, kv_cache_shape, write_kv
from splitserve.kernels.flash_attention import FLASH_BLOCK_SIZE_MULTIPLE, flash_attn_available, flash_attention
from splitserve.kernels.metadata import AttentionMetadata, PrefillChunk
from splitserve.kernels.reference import reference_attention
from splitserve.kernels.torch_attention import torch_attention

AttentionFn = Callable[..., torch.Tensor]


def select_attention(device: torch.device | str, prefer_flash: bool = True) -> tuple[str, AttentionFn]:
    """Pick the attention implementation for ``device``: ("flash", fn) or ("torch", fn)."""
    if prefer_flash and flash_attn_available(device):
        return "flash", flash_attention
    return "torch", torch_attention


__all__ = [
    "AttentionMetadata",
    "PrefillChunk",
    "FLASH_BLOCK_SIZE_MULTIPLE",
    "gather_kv",
    "gather_kv_batched",
    "kv_cache_shape",
    "write_kv",
    "reference_attention",
    "torch_attention",
    "flash_attention",
    "select_attention",
]

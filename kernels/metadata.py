"""Attention metadata for one packed engine step.

A step's tokens are packed into one flat batch: first every decode sequence (one
new token each), then every prefill chunk (``query_len`` new tokens that may
continue after ``context_len - query_len`` tokens already in the cache).
The model runner builds this record once per step; every layer reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class PrefillChunk:
    """One sequence's slice of the packed batch during prefill."""

    token_start: int  # offset of this chunk's first token in the packed batch
    query_len: int  # new tokens computed this step
    context_len: int  # tokens in the cache after this step (cached + new)
    block_table: torch.Tensor  # [num_blocks_for_seq] int64, covers context_len tokens


@dataclass(slots=True)
class AttentionMetadata:
    """Everything attention needs for one step, shared by all layers."""

    block_size: int
    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset
    num_decode_tokens: int  # the first num_decode_tokens tokens are decodes, one per sequence
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int64, padded with 0
    decode_context_lens: torch.Tensor | None  # [num_decodes] int64, including the new token
    prefills: list[PrefillChunk]
    max_decode_context_len: int = 0

    @property
    def num_decodes(self) -> int:
        return self.num_decode_tokens

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

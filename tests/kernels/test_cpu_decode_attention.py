"""The native paged decode attention (kernels/cpu_decode_attention): which caches it serves, its start-up check,
and refusing metadata that does not cover the step. Its results against the reference, with garbage in every
unused slot, are in test_attention.py (``decode_path``)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from splitserve.kernels import AttentionMetadata, cpu_decode_attention, cpu_native, kv_cache_shape
from tests.helpers import needs_compiler


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_passes_its_check_on_this_machine(dtype):
    assert cpu_decode_attention._kernels(dtype) is not None
    assert cpu_decode_attention.serves(torch.zeros(kv_cache_shape(4, 2, 16, 2, 64), dtype=dtype))


@needs_compiler
def test_serves_only_what_the_c_code_handles():
    assert not cpu_decode_attention.serves(torch.zeros(kv_cache_shape(4, 2, 16, 2, 8)))  # head_dim not a multiple of 16
    assert not cpu_decode_attention.serves(torch.zeros(kv_cache_shape(2, 1, 16, 1, 272)))  # over MAX_HEAD_DIM
    assert not cpu_decode_attention.serves(torch.zeros(kv_cache_shape(4, 2, 16, 2, 64), dtype=torch.float16))
    assert not cpu_decode_attention.serves(torch.zeros(kv_cache_shape(4, 2, 16, 2, 64)).transpose(0, 1))


@needs_compiler
@pytest.mark.parametrize("broken", ["scores", "values"])
def test_the_check_rejects_a_wrong_kernel(broken):
    scores, values = cpu_decode_attention._pair(cpu_native.library(), "f32")

    def zeros(*args):
        batch, heads, _, head_dim, _, max_len = args[5:11]
        ctypes.memset(args[4], 0, batch * heads * (max_len if broken == "scores" else head_dim) * 4)

    pair = (zeros, values) if broken == "scores" else (scores, zeros)
    with pytest.raises(AssertionError, match="error"):
        cpu_decode_attention.check_kernels(pair, torch.float32)


@needs_compiler
def test_refuses_tables_that_do_not_cover_the_contexts():
    cache = torch.zeros(kv_cache_shape(4, 1, 16, 1, 16))
    meta = AttentionMetadata(
        block_size=16, slot_mapping=torch.zeros(1, dtype=torch.int64), num_decode_tokens=1,
        decode_block_tables=torch.zeros(1, 1, dtype=torch.int64), decode_context_lens=torch.tensor([17]), prefills=[],
        max_decode_context_len=17,
    )
    with pytest.raises(ValueError, match="do not cover"):
        cpu_decode_attention.paged_decode_attention(torch.zeros(1, 1, 16), cache, 0, meta, 0.25)

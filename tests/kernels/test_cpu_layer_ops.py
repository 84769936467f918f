"""The native residual-add + RMSNorm and rotary ops (kernels/cpu_layer_ops) against torch's own bf16 ops, and the
model taking them for bf16 steps with the same greedy tokens as torch's ops. Building and the fallbacks when
the library cannot be built: test_cpu_native.py."""

from __future__ import annotations

import ctypes

import pytest
import torch

from splitserve.engine.norm import add_rms_norm as torch_add_rms_norm
from splitserve.engine.rope import RotaryEmbedding, apply_rotary
from splitserve.kernels import cpu_layer_ops
from tests.helpers import needs_compiler, torch_threads


def _bf16(*shape: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(torch.bfloat16)


@needs_compiler
def test_passes_its_check_on_this_machine():
    assert cpu_layer_ops.available()


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows,dim,with_y", [(1, 576, True), (1, 576, False), (4, 960, True), (64, 2048, True), (3, 15, True)])
def test_norm_matches_torch_and_the_residual_sum_is_exact(rows, dim, with_y, threads):
    gen = torch.Generator().manual_seed(rows * 31 + dim)
    h, w = _bf16(rows, dim, gen=gen, scale=4.0), _bf16(dim, gen=gen)
    y = _bf16(rows, dim, gen=gen) if with_y else None
    h_ref, h_ours = h.clone(), h.clone()
    ref = torch_add_rms_norm(h_ref, y, w, 1e-6, torch.bfloat16)
    with torch_threads(threads):
        ours = cpu_layer_ops.add_rms_norm(h_ours, y, w, 1e-6)
    assert torch.equal(h_ours, h_ref)  # the residual stream is bit for bit torch's
    differ = ours != ref
    # only the float32 sum of squares is ordered differently: at most one bf16 step, and rarely
    assert bool(((ours.float() - ref.float()).abs() <= ref.float().abs() * 2.0**-7).all())
    assert int(differ.sum()) <= max(2, ours.numel() // 500), int(differ.sum())


@needs_compiler
def test_a_row_is_the_same_alone_or_beside_others():
    gen = torch.Generator().manual_seed(5)
    h, y, w = _bf16(40, 3000, gen=gen), _bf16(40, 3000, gen=gen), _bf16(3000, gen=gen)
    with torch_threads(2):
        together = cpu_layer_ops.add_rms_norm(h.clone(), y, w, 1e-5)
    with torch_threads(1):
        alone = cpu_layer_ops.add_rms_norm(h[7:8].clone(), y[7:8].contiguous(), w, 1e-5)
    assert torch.equal(together[7:8], alone)


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens,heads,head_dim", [(1, 12, 64), (3, 4, 128), (200, 15, 64), (2, 2, 6)])
def test_rotary_is_torch_bit_for_bit_and_touches_only_its_heads(tokens, heads, head_dim, threads):
    gen = torch.Generator().manual_seed(tokens + heads + head_dim)
    rope = RotaryEmbedding(tuple(10000.0 ** (-2 * i / head_dim) for i in range(head_dim // 2)), 1.0, 4096, torch.device("cpu"), torch.bfloat16)
    width = heads * head_dim + 3 * head_dim  # v's heads after q and k, as in the model's qkv rows
    base = _bf16(tokens, width, gen=gen)
    positions = torch.randint(0, 4096, (tokens,), generator=gen)
    cos, sin = rope.tables(positions)
    ref = apply_rotary(base[:, : heads * head_dim].view(tokens, heads, head_dim), cos, sin)
    ours = base.clone()
    with torch_threads(threads):
        out = cpu_layer_ops.rotary_(ours[:, : heads * head_dim].view(tokens, heads, head_dim), rope.checked_positions(positions), rope.cos, rope.sin)
    assert out.data_ptr() == ours.data_ptr()  # in place
    assert torch.equal(out, ref)
    assert torch.equal(ours[:, heads * head_dim :], base[:, heads * head_dim :])


def test_positions_outside_the_tables_are_refused_before_any_native_read():
    rope = RotaryEmbedding((1.0, 0.1), 1.0, 16, torch.device("cpu"), torch.bfloat16)
    assert rope.checked_positions(torch.tensor([0, 15], dtype=torch.int32)).dtype == torch.int64
    for bad in ([16], [-1], [3, 99]):
        with pytest.raises(IndexError, match="outside the rotary tables"):
            rope.checked_positions(torch.tensor(bad))


@needs_compiler
@pytest.mark.parametrize("call", ["float32 h", "y of another shape", "strided x", "int32 positions"])
def test_inputs_the_c_code_would_misread_are_refused(call):
    h, w = torch.zeros(2, 16, dtype=torch.bfloat16), torch.ones(16, dtype=torch.bfloat16)
    table = torch.zeros(8, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        if call == "float32 h":
            cpu_layer_ops.add_rms_norm(h.float(), None, w, 1e-5)
        elif call == "y of another shape":
            cpu_layer_ops.add_rms_norm(h, torch.zeros(1, 16, dtype=torch.bfloat16), w, 1e-5)
        elif call == "strided x":
            cpu_layer_ops.rotary_(torch.zeros(2, 16, 3, dtype=torch.bfloat16).transpose(1, 2), torch.zeros(2, dtype=torch.int64), table, table)
        else:
            cpu_layer_ops.rotary_(torch.zeros(2, 3, 16, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.int32), table, table)


def test_the_check_rejects_wrong_kernels():
    def norm_without_weight(h, y, w, out, rows, dim, eps, threads):
        ctypes.memmove(out, h, rows * dim * 2)

    def rotary_noop(*args):
        pass

    def fine_norm(h, y, w, out, rows, dim, eps, threads):
        ht = torch.frombuffer((ctypes.c_uint16 * (rows * dim)).from_address(h), dtype=torch.bfloat16).view(rows, dim)
        yt = None if y is None else torch.frombuffer((ctypes.c_uint16 * (rows * dim)).from_address(y), dtype=torch.bfloat16).view(rows, dim)
        wt = torch.frombuffer((ctypes.c_uint16 * dim).from_address(w), dtype=torch.bfloat16)
        res = torch_add_rms_norm(ht, yt, wt, eps, torch.bfloat16)
        ctypes.memmove(out, res.data_ptr(), rows * dim * 2)

    with pytest.raises(AssertionError, match="norm off"):
        cpu_layer_ops.check_kernels(norm_without_weight, rotary_noop)
    with pytest.raises(AssertionError, match="rotary differs"):
        cpu_layer_ops.check_kernels(fine_norm, rotary_noop)


@needs_compiler
@pytest.mark.engine
@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: the rotation of q/k-normed heads
def test_bf16_engine_gives_the_greedy_tokens_of_torchs_ops(checkpoints, make_llm, arch):
    import json
    import random

    from splitserve import SamplingParams

    path = checkpoints[arch]
    vocab = json.load(open(f"{path}/config.json"))["vocab_size"]
    rng = random.Random(arch)
    prompts = [[rng.randrange(5, vocab) for _ in range(n)] for n in (1, 9, 40, 100)]  # short: bf16 prefills too
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    one_call, op_by_op, with_torch = (make_llm(path, dtype="bfloat16") for _ in range(3))
    assert one_call.engine.runner.model.decode_step is not None  # decode steps in one native call (cpu_decode_step)
    op_by_op.engine.runner.model.decode_step = None  # the native ops one by one
    with_torch.engine.runner.model.decode_step = None
    with_torch.engine.runner.model.native_layer_ops = False
    ours = [o.token_ids for o in one_call.generate(prompts, params, use_tqdm=False)]
    assert ours == [o.token_ids for o in op_by_op.generate(prompts, params, use_tqdm=False)]
    assert ours == [o.token_ids for o in with_torch.generate(prompts, params, use_tqdm=False)]

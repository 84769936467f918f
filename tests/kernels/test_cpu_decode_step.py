"""A bf16 decode step's layers in one native call (kernels/cpu_decode_step) against the torch reference built from the
model's own ops, the inputs it refuses, its vectorised exp, and the model taking it for steps of decodes only. The
engine's greedy tokens through it against the op-by-op and torch paths: test_cpu_layer_ops.py."""

from __future__ import annotations

import ctypes

import pytest
import torch

from splitserve.kernels import cpu_decode_step, cpu_native
from splitserve.kernels.cpu_decode_step import DecoderShape, DecodeStep, random_case, run_both
from tests.helpers import needs_compiler, torch_threads

SMALL = DecoderShape(dim=64, heads=4, kv_heads=2, head_dim=16, intermediate=96, eps=1e-5, scale=0.25)
SMOL_LIKE = DecoderShape(dim=192, heads=6, kv_heads=2, head_dim=64, intermediate=256, eps=1e-5, scale=0.125)  # values in 2 slices
WIDE_HEADS = DecoderShape(dim=256, heads=4, kv_heads=4, head_dim=128, intermediate=128, eps=1e-6, scale=128**-0.5)


def _by_slot(cache: torch.Tensor) -> torch.Tensor:
    """The cache [blocks, layers, 2, block_size, kv_heads, head_dim] as one row per slot (every layer's K and V)."""
    return cache.permute(0, 3, 1, 2, 4, 5).reshape(cache.shape[0] * cache.shape[3], -1)


def _step(case: dict, shape: DecoderShape) -> DecodeStep:
    return DecodeStep(shape, case["layers"], case["cos"], case["sin"])


def _call(step: DecodeStep, case: dict, h: torch.Tensor, cache: torch.Tensor, rows: slice = slice(None)) -> None:
    lens = case["context_lens"][rows].contiguous()
    step(h, case["positions"][rows].contiguous(), case["slots"][rows].contiguous(), cache, case["block_tables"][rows].contiguous(), lens,
         int(lens.max()))


@needs_compiler
def test_passes_its_check_on_this_machine():
    assert cpu_decode_step.available()


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "shape,lengths,biases,qk_norm",
    [
        (SMALL, [1], False, False),
        (SMALL, [15, 16, 17, 32, 33], True, False),  # around block edges
        (SMOL_LIKE, [7, 100], False, False),
        (SMOL_LIKE, [1, 2, 3, 4, 5, 6, 40], True, True),  # more rows than the GEMV's group of four
        (WIDE_HEADS, [50, 3], False, True),
    ],
)
def test_matches_the_torch_reference(shape, lengths, biases, qk_norm, threads):
    gen = torch.Generator().manual_seed(len(lengths) * 7 + shape.head_dim)
    case = random_case(shape, lengths, gen, num_layers=3, biases=biases, qk_norm=qk_norm)
    ours, ref, ours_cache, ref_cache = run_both(cpu_decode_step._kernel(), shape, case, threads)
    # the cache: K after the (normed and) rotated heads, V, at the step's slots only; every other byte untouched
    assert bool(((ours_cache.float() - ref_cache.float()).abs() <= ref_cache.float().abs() * 2.0**-7).all())
    untouched = torch.ones(ours_cache.shape[0] * ours_cache.shape[3], dtype=torch.bool)
    untouched[case["slots"]] = False
    assert torch.equal(_by_slot(ours_cache)[untouched], _by_slot(case["kv_cache"])[untouched])
    # the residual stream after three layers: bf16 roundings of float32 sums in another order, nothing more
    err = (ours.float() - ref.float()).abs()
    assert err.max().item() <= 0.02 * ref.float().abs().max().item(), err.max().item()
    assert (err > 0).float().mean().item() <= 0.05


@needs_compiler
def test_a_sequence_gets_the_same_numbers_alone_beside_others_and_on_any_thread_count():
    gen = torch.Generator().manual_seed(3)
    case = random_case(SMOL_LIKE, [40, 9, 77, 16, 2], gen, num_layers=2, qk_norm=True)
    step = _step(case, SMOL_LIKE)
    together, together_cache = case["h"].clone(), case["kv_cache"].clone()
    with torch_threads(2):
        _call(step, case, together, together_cache)
    alone, alone_cache = case["h"][2:3].clone(), case["kv_cache"].clone()
    with torch_threads(1):
        _call(step, case, alone, alone_cache, slice(2, 3))
    assert torch.equal(together[2:3], alone)


@needs_compiler
def test_writes_only_h_and_the_cache():
    gen = torch.Generator().manual_seed(4)
    case = random_case(SMALL, [20, 3], gen, biases=True, qk_norm=True)
    weights_before = [{name: None if t is None else t.clone() for name, t in vars(layer).items()} for layer in case["layers"]]
    inputs_before = {k: case[k].clone() for k in ("positions", "slots", "block_tables", "context_lens", "cos", "sin")}
    h = case["h"].clone()
    _call(_step(case, SMALL), case, h, case["kv_cache"].clone())
    assert not torch.equal(h, case["h"])
    for layer, before in zip(case["layers"], weights_before):
        for name, t in before.items():
            assert t is None or torch.equal(getattr(layer, name), t), name
    for k, t in inputs_before.items():
        assert torch.equal(case[k], t), k


@needs_compiler
@pytest.mark.parametrize("bad", ["float32 h", "int32 positions", "tables too short", "cache of another model", "slots for fewer rows"])
def test_inputs_the_c_code_would_misread_are_refused(bad):
    gen = torch.Generator().manual_seed(5)
    case = random_case(SMALL, [20, 3], gen)
    step = _step(case, SMALL)
    h, cache = case["h"].clone(), case["kv_cache"]
    args = dict(positions=case["positions"], slots=case["slots"], kv_cache=cache, block_tables=case["block_tables"],
                context_lens=case["context_lens"], max_len=20)
    if bad == "float32 h":
        h = h.float()
    elif bad == "int32 positions":
        args["positions"] = args["positions"].int()
    elif bad == "tables too short":
        args["max_len"] = args["block_tables"].shape[1] * cache.shape[3] + 1
    elif bad == "cache of another model":
        args["kv_cache"] = torch.zeros(4, 2, 2, 16, SMALL.kv_heads, 32, dtype=torch.bfloat16)
    else:
        args["slots"] = args["slots"][:1]
    with pytest.raises(ValueError):
        step(h, **args)


@needs_compiler
def test_decoders_it_cannot_serve_are_declined():
    gen = torch.Generator().manual_seed(6)
    case = random_case(SMALL, [4], gen)
    assert cpu_decode_step.supports(SMALL, case["layers"], case["cos"], case["sin"])
    odd_heads = DecoderShape(dim=64, heads=4, kv_heads=2, head_dim=24, intermediate=96, eps=1e-5, scale=0.2)
    assert not cpu_decode_step.supports(odd_heads, case["layers"], case["cos"], case["sin"])
    case["layers"][1].down = case["layers"][1].down.float()  # one float32 matrix
    assert not cpu_decode_step.supports(SMALL, case["layers"], case["cos"], case["sin"])
    with pytest.raises(ValueError, match="cannot serve"):
        DecodeStep(SMALL, case["layers"], case["cos"], case["sin"])


def test_the_check_rejects_a_wrong_kernel():
    def skips_the_layers(decoder, h, *args):
        return 0

    with pytest.raises(AssertionError, match="differs"):
        cpu_decode_step.check_kernel(skips_the_layers)


@needs_compiler
def test_the_vectorised_exp_is_within_an_ulp_and_keeps_the_edges():
    fn = cpu_native.entry_point(cpu_native.library(), "splitserve_exp_f32", [ctypes.c_void_p] * 2 + [ctypes.c_int64])
    x = torch.cat([torch.linspace(-87.3, 88.0, 300_007), torch.tensor([float("-inf"), -1e30, -90.0, float("nan"), 0.0, -0.0])])
    out = torch.empty_like(x)
    fn(x.data_ptr(), out.data_ptr(), x.numel())  # an odd count: the tail goes through the padded vector
    exact = x[:-6].double().exp()
    ulps = (out[:-6].double() - exact).abs() / (exact * 2.0**-23)
    assert ulps.max().item() <= 1.0
    assert out[-6:-3].tolist() == [0.0, 0.0, 0.0]  # softmax's masked scores weigh nothing
    assert out[-3].isnan() and out[-2:].tolist() == [1.0, 1.0]


@needs_compiler
@pytest.mark.engine
def test_the_model_runs_steps_of_decodes_only_through_it(checkpoints, make_llm):
    from splitserve import SamplingParams

    llm = make_llm(checkpoints["llama"], dtype="bfloat16", max_num_batched_tokens=64)
    model = llm.engine.runner.model
    calls = []
    inner = model.decode_step

    def counting(h, *args):
        calls.append(h.shape[0])
        inner(h, *args)

    model.decode_step = counting
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    llm.generate([[5] * 40, [7] * 3, [9] * 100], params, use_tqdm=False)  # 100 tokens: a prefill in chunks beside decodes
    assert calls and max(calls) <= 3
    total_decode_tokens = 3 * 5  # each sequence's tokens after its first, which the prefill step samples
    assert sum(calls) < total_decode_tokens  # the steps that mixed in a prefill chunk went op by op

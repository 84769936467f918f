"""A bf16 decode step's decoder layers in one native call (``splitserve_decode_step_bf16`` in ``cpu_decode_step.c``).

The op-by-op path of a decode step calls ~11 native kernels and a dozen torch ops per layer; on a small
model at a few sequences their argument passing, allocations and OpenMP fork/joins cost as much as a
third of the weight reads. ``DecodeStep`` runs every layer of the step in one call and one parallel
region, with the same kernels and roundings (see the C file for the two ops that differ: softmax and
SiLU in float32 through the C file's own vectorised exp, within an ulp as torch's is, rounding differently).

Serves steps of decodes only (no prefill chunk) on the CPU, bf16 weights and cache, ``head_dim`` a
multiple of 16 up to 256, whole-model GEMVs (every linear a contiguous bf16 matrix). Checked before first
use against a torch reference built from the model's own ops (``engine.norm``, ``engine.rope``) on
small random decoders with and without biases and per-head q/k norms; unbuilt or wrong: ``available()``
is False, the log says why once, and the model keeps the op-by-op path.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from splitserve.engine.norm import add_rms_norm, rms_norm
from splitserve.engine.rope import apply_rotary
from splitserve.kernels import cpu_native
from splitserve.kernels.cache_ops import gather_kv, kv_cache_shape, write_kv

MAX_HEAD_DIM = 256
_LAYER_FIELDS = ("input_norm", "qkv", "qkv_bias", "o_proj", "o_proj_bias", "qk_norm", "post_norm", "gate_up", "down")
_PTR, _I64 = ctypes.c_void_p, ctypes.c_int64


class LayerTensors(Protocol):
    """One decoder layer's weights, as ``engine.weights.LayerWeights`` holds them."""

    input_norm: torch.Tensor
    qkv: torch.Tensor  # [q + 2 kv, dim]
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor
    o_proj_bias: torch.Tensor | None
    qk_norm: torch.Tensor | None  # [heads + kv_heads, head_dim]
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 intermediate, dim]
    down: torch.Tensor


@dataclass(frozen=True)
class DecoderShape:
    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    scale: float


class _LayerC(ctypes.Structure):
    _fields_ = [(name, _PTR) for name in _LAYER_FIELDS]


class _DecoderC(ctypes.Structure):
    _fields_ = [
        *((name, _I64) for name in ("num_layers", "dim", "heads", "kv_heads", "head_dim", "intermediate")),
        ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("layers", ctypes.POINTER(_LayerC)), ("cos", _PTR), ("sin", _PTR),
    ]


def _decoder_struct(shape: DecoderShape, layers: Sequence[LayerTensors], cos: torch.Tensor, sin: torch.Tensor) -> _DecoderC:
    """The C view of a decoder (pointers into the tensors, which must outlive it; the layer array is kept on it)."""
    s = shape
    array = (_LayerC * len(layers))(
        *(_LayerC(*(None if getattr(layer, f) is None else getattr(layer, f).data_ptr() for f in _LAYER_FIELDS)) for layer in layers)
    )
    decoder = _DecoderC(len(layers), s.dim, s.heads, s.kv_heads, s.head_dim, s.intermediate, s.eps, s.scale, array, cos.data_ptr(), sin.data_ptr())
    decoder._array = array  # ctypes keeps only the pointer
    return decoder


def _invoke(fn, decoder: _DecoderC, h: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, kv_cache: torch.Tensor,
            block_tables: torch.Tensor, context_lens: torch.Tensor, max_len: int, threads: int) -> int:
    """The C call itself (0, or -1 when out of memory), on arguments already checked."""
    return fn(ctypes.byref(decoder), h.data_ptr(), h.shape[0], positions.data_ptr(), slots.data_ptr(), kv_cache.data_ptr(), kv_cache.shape[3],
              block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(), max_len, threads)


def _layer_ok(layer: LayerTensors, s: DecoderShape) -> bool:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    shapes = {
        "input_norm": (s.dim,), "qkv": (q + 2 * kv, s.dim), "qkv_bias": (q + 2 * kv,), "o_proj": (s.dim, q), "o_proj_bias": (s.dim,),
        "qk_norm": (s.heads + s.kv_heads, s.head_dim), "post_norm": (s.dim,), "gate_up": (2 * s.intermediate, s.dim),
        "down": (s.dim, s.intermediate),
    }
    for name, shape in shapes.items():
        t = getattr(layer, name)
        if t is None and name in ("qkv_bias", "o_proj_bias", "qk_norm"):
            continue
        if t is None or t.device.type != "cpu" or t.dtype != torch.bfloat16 or tuple(t.shape) != shape or not t.is_contiguous():
            return False
    return True


class DecodeStep:
    """Runs a step of decodes through every layer: ``h`` [m, dim] bf16 (the embedded tokens) becomes the residual
    stream after the last layer, and each token's K and V land in the cache. Bound to the model's weights and rotary
    tables, which must outlive it."""

    def __init__(self, shape: DecoderShape, layers: Sequence[LayerTensors], cos: torch.Tensor, sin: torch.Tensor):
        if not supports(shape, layers, cos, sin):
            raise ValueError(f"the native decode step cannot serve this decoder ({shape})")
        self._fn = _kernel()
        self._keep = (list(layers), cos, sin)
        self._decoder = _decoder_struct(shape, layers, cos, sin)
        self._shape = shape

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, kv_cache: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor, max_len: int) -> None:
        """``positions`` must lie within the rotary tables and ``block_tables`` [m, max_blocks] (int64, rows padded with
        valid block ids) cover ``context_lens`` (each at most ``max_len``): the caller's step metadata; the rest is
        checked here, as the C code trusts it."""
        s, m = self._shape, h.shape[0]
        num_layers = len(self._keep[0])
        if (h.dtype != torch.bfloat16 or h.shape != (m, s.dim) or not h.is_contiguous() or m == 0
                or kv_cache.dtype != torch.bfloat16 or not kv_cache.is_contiguous()
                or kv_cache.shape[1:] != (num_layers, 2, kv_cache.shape[3], s.kv_heads, s.head_dim)):
            raise ValueError(f"decode step: h {tuple(h.shape)} {h.dtype}, cache {tuple(kv_cache.shape)} {kv_cache.dtype}")
        for name, t in (("positions", positions), ("slots", slots), ("context_lens", context_lens)):
            if t.dtype != torch.int64 or t.shape != (m,) or not t.is_contiguous():
                raise ValueError(f"decode step: {name} {tuple(t.shape)} {t.dtype} for {m} tokens")
        block_size = kv_cache.shape[3]
        if (block_tables.dtype != torch.int64 or block_tables.dim() != 2 or block_tables.shape[0] != m
                or not block_tables.is_contiguous() or block_tables.shape[1] * block_size < max_len):
            raise ValueError(f"decode step: block tables {tuple(block_tables.shape)} for {m} tokens of up to {max_len}")
        if _invoke(self._fn, self._decoder, h, positions, slots, kv_cache, block_tables, context_lens, max_len, torch.get_num_threads()):
            raise MemoryError(f"decode step: no memory for {m} tokens of up to {max_len}")


def supports(shape: DecoderShape, layers: Sequence[LayerTensors], cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether ``DecodeStep`` serves this decoder: the kernel built and checked here, and weights and tables in its layout."""
    s = shape
    if s.head_dim % 16 or s.head_dim > MAX_HEAD_DIM or s.heads % s.kv_heads or not layers:
        return False
    for table in (cos, sin):
        if table.device.type != "cpu" or table.dtype != torch.bfloat16 or table.dim() != 2 or table.shape[1] != s.head_dim or not table.is_contiguous():
            return False
    return all(_layer_ok(layer, s) for layer in layers) and _kernel() is not None


# ---- the reference it is checked against ------------------------------------------------------------------------


@dataclass
class _RandomLayer:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor
    o_proj_bias: torch.Tensor | None
    qk_norm: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


def random_layers(shape: DecoderShape, num_layers: int, gen: torch.Generator, biases: bool, qk_norm: bool) -> list[_RandomLayer]:
    s = shape
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim

    def rand(*size: int, scale: float = 0.2, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * scale + shift).to(torch.bfloat16)

    return [
        _RandomLayer(
            input_norm=rand(s.dim, shift=1.0), qkv=rand(q + 2 * kv, s.dim), qkv_bias=rand(q + 2 * kv) if biases else None,
            o_proj=rand(s.dim, q), o_proj_bias=rand(s.dim) if biases else None,
            qk_norm=rand(s.heads + s.kv_heads, s.head_dim, shift=1.0) if qk_norm else None, post_norm=rand(s.dim, shift=1.0),
            gate_up=rand(2 * s.intermediate, s.dim), down=rand(s.dim, s.intermediate),
        )
        for _ in range(num_layers)
    ]


def reference_step(shape: DecoderShape, layers: Sequence[LayerTensors], cos: torch.Tensor, sin: torch.Tensor, h: torch.Tensor,
                   positions: torch.Tensor, slots: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                   context_lens: torch.Tensor) -> torch.Tensor:
    """What ``DecodeStep`` computes, in torch ops (float64 attention): the residual stream after the last layer, with
    the K and V written into ``kv_cache``."""
    s, m = shape, h.shape[0]
    h = h.clone()
    pending = None
    for i, layer in enumerate(layers):
        x = add_rms_norm(h, pending, layer.input_norm, s.eps, torch.bfloat16)
        qkv = F.linear(x.float(), layer.qkv.float(), None if layer.qkv_bias is None else layer.qkv_bias.float()).to(torch.bfloat16)
        q_end, k_end = s.heads * s.head_dim, (s.heads + s.kv_heads) * s.head_dim
        qk = qkv[:, :k_end].reshape(m, s.heads + s.kv_heads, s.head_dim)
        if layer.qk_norm is not None:
            qk = rms_norm(qk, layer.qk_norm, s.eps)
        qk = apply_rotary(qk, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
        v = qkv[:, k_end:].reshape(m, s.kv_heads, s.head_dim)
        write_kv(kv_cache, i, qk[:, s.heads :], v, slots)
        attn = torch.empty(m, s.heads, s.head_dim, dtype=torch.float64)
        for r in range(m):
            keys, values = gather_kv(kv_cache, i, block_tables[r], int(context_lens[r]))
            keys = keys.double().repeat_interleave(s.heads // s.kv_heads, dim=1)
            values = values.double().repeat_interleave(s.heads // s.kv_heads, dim=1)
            probs = torch.softmax(torch.einsum("hd,nhd->hn", qk[r, : s.heads].double(), keys) * s.scale, dim=-1)
            attn[r] = torch.einsum("hn,nhd->hd", probs, values)
        o_bias = None if layer.o_proj_bias is None else layer.o_proj_bias.float()
        o = F.linear(attn.reshape(m, q_end).to(torch.bfloat16).float(), layer.o_proj.float(), o_bias).to(torch.bfloat16)
        x = add_rms_norm(h, o, layer.post_norm, s.eps, torch.bfloat16)
        gate, up = F.linear(x.float(), layer.gate_up.float()).to(torch.bfloat16).chunk(2, dim=-1)
        pending = F.linear((F.silu(gate) * up).float(), layer.down.float()).to(torch.bfloat16)
    return h + pending


def random_case(shape: DecoderShape, lengths: Sequence[int], gen: torch.Generator, block_size: int = 16, num_layers: int = 2,
                biases: bool = False, qk_norm: bool = False) -> dict:
    """A random decoder, cache and step of decodes (sequence r at ``lengths[r]`` tokens with its new one): the
    arguments of ``DecodeStep`` and ``reference_step``."""
    s, m = shape, len(lengths)
    max_blocks = -(-max(lengths) // block_size) + 1  # one padding column, as the runner pads
    num_blocks = m * max_blocks + 2
    cache = torch.randn(kv_cache_shape(num_blocks, num_layers, block_size, s.kv_heads, s.head_dim), generator=gen).to(torch.bfloat16)
    tables = torch.randperm(num_blocks, generator=gen)[: m * max_blocks].view(m, max_blocks).contiguous()
    lens = torch.tensor(lengths, dtype=torch.int64)
    positions = lens - 1
    slots = tables.gather(1, (positions // block_size).unsqueeze(1)).squeeze(1) * block_size + positions % block_size
    cos = torch.randn(max(lengths) + 4, s.head_dim, generator=gen).to(torch.bfloat16)
    sin = torch.randn(max(lengths) + 4, s.head_dim, generator=gen).to(torch.bfloat16)
    return {
        "layers": random_layers(s, num_layers, gen, biases, qk_norm), "cos": cos, "sin": sin,
        "h": torch.randn(m, s.dim, generator=gen).to(torch.bfloat16), "positions": positions, "slots": slots, "kv_cache": cache,
        "block_tables": tables, "context_lens": lens,
    }


def run_both(fn, shape: DecoderShape, case: dict, threads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(native h, reference h, native cache, reference cache) for one ``random_case``, the native call through ``fn``."""
    c = case
    ref_cache, ours_cache, h = c["kv_cache"].clone(), c["kv_cache"].clone(), c["h"].clone()
    ref = reference_step(shape, c["layers"], c["cos"], c["sin"], c["h"], c["positions"], c["slots"], ref_cache, c["block_tables"], c["context_lens"])
    decoder = _decoder_struct(shape, c["layers"], c["cos"], c["sin"])
    lens = c["context_lens"]
    status = _invoke(fn, decoder, h, c["positions"], c["slots"], ours_cache, c["block_tables"], lens, int(lens.max()), threads)
    assert status == 0, "decode step: out of memory"
    return h, ref, ours_cache, ref_cache


CHECK_SHAPES = (
    DecoderShape(dim=64, heads=4, kv_heads=2, head_dim=16, intermediate=96, eps=1e-5, scale=0.25),
    DecoderShape(dim=96, heads=3, kv_heads=1, head_dim=64, intermediate=80, eps=1e-6, scale=0.125),  # values in two slices
)


def check_kernel(fn) -> None:
    """Raise ``AssertionError`` unless ``fn`` agrees with ``reference_step``: the cache it writes within a bf16 step
    and the residual stream within 2% of its scale, after two layers (one and several sequences, lengths around block
    edges, with and without biases and q/k norms, one and two threads)."""
    gen = torch.Generator().manual_seed(0)
    cases = ((0, [1], False, False, 1), (0, [16, 17, 40], True, False, 2), (0, [5, 33], False, True, 2), (1, [3, 50], True, True, 2))
    for shape_index, lengths, biases, qk_norm, threads in cases:
        shape = CHECK_SHAPES[shape_index]
        ours, ref, ours_cache, ref_cache = run_both(fn, shape, random_case(shape, lengths, gen, biases=biases, qk_norm=qk_norm), threads)
        cache_err = (ours_cache.float() - ref_cache.float()).abs().max().item()
        assert cache_err <= ref_cache.float().abs().max().item() * 2.0**-7, f"cache differs by {cache_err:.3g} ({lengths})"
        err = (ours.float() - ref.float()).abs().max().item()
        assert err <= 0.02 * ref.float().abs().max().item(), f"residual stream differs by {err:.3g} ({lengths})"


@functools.cache
def _kernel():
    def bind(lib: ctypes.CDLL):
        argtypes = [_PTR] * 2 + [_I64] + [_PTR] * 3 + [_I64, _PTR, _I64, _PTR, _I64, ctypes.c_int]
        return cpu_native.entry_point(lib, "splitserve_decode_step_bf16", argtypes, ctypes.c_int)

    return cpu_native.checked_kernels(bind, check_kernel, "native decode step", "decode steps run op by op")


def available() -> bool:
    return _kernel() is not None

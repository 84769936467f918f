"""The Llama-family decoder (Llama, Qwen2, Qwen3, Mistral) over a paged KV cache.

One ``forward`` runs a packed step: decodes and prefill chunks of many sequences
flattened into one token batch. Each layer writes its new K/V into the cache by
slot, then attends through the selected kernel. Only the rows that need a next
token go through the final norm and the LM head.

CPU speed (bf16 weights; see docs/benchmarks.md): each weight matrix is also kept
prepacked in oneDNN's blocked layout, which skips the per-call weight reorder
that ``F.linear`` does and roughly doubles the speed of few-row (decode) GEMMs.
Which kernel is faster for a step of many tokens (prefill) depends on the CPU, so
the model measures it once at load, on its own MLP weight: where an fp32 GEMM over
upcast bf16 weights wins (an Intel Xeon with avx512_bf16 but no AMX: 248 against
149 GFLOP/s), such steps run their activations and residual stream in float32 and
pay no bf16 round trips between ops; where oneDNN's bf16 kernel wins (an AMD EPYC
with avx512_bf16: 392 against 165 GFLOP/s; any AMX CPU) they stay bf16. The
weights and the KV cache stay in the model dtype.

bf16 steps on a CPU (not deterministic mode) run each residual add + RMSNorm and each
rotary embedding as one native call (``kernels.cpu_layer_ops``) instead of a dozen small
torch ops: the same bf16 roundings, 4-16% off a SmolLM2 decode step on a 2-core AVX2 CPU.
Steps of decodes only (no prefill chunk; up to as many rows as the native GEMV serves) go
further: every layer in one native call (``kernels.cpu_decode_step``), 1.1-1.6x faster than
op by op there; only the embedding, the final norm and the LM head stay outside it.

Deterministic mode (``deterministic=True``) makes a token's numbers independent of
the batch it is computed in: one activation dtype for every step size, GEMMs whose
rows do not depend on the number of rows (``kernels.invariant_linear``, probed at
start-up), the tiled attention of ``kernels.invariant_attention`` for decodes and
prefill chunks alike, and SiLU through ``exp`` (float32 ``F.silu`` takes a scalar
code path for a tensor's tail, so its result depended on the tensor's size).
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from splitserve.engine.model_config import ModelConfig
from splitserve.engine.norm import add_rms_norm, rms_norm
from splitserve.engine.rope import RotaryEmbedding, apply_rotary
from splitserve.engine.weights import ModelWeights, load_weights
from splitserve.kernels import AttentionFn, AttentionMetadata, cpu_decode_step, cpu_gemv, cpu_layer_ops
from splitserve.kernels.cache_ops import cache_rows, write_kv_rows
from splitserve.kernels.invariant_linear import LinearFn, invariant_linear

logger = logging.getLogger(__name__)

# Steps with at least this many tokens compute in float32 on CPUs without AMX
# (measured crossover of fp32-over-upcast-weights vs packed bf16: 64-96 rows).
FP32_MIN_TOKENS = 128


def _can_prepack(weight: torch.Tensor) -> bool:
    """oneDNN prepacking (a private but long-standing torch op, used by inductor's CPU backend)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def float32_steps_are_faster(weight: torch.Tensor, rows: int = FP32_MIN_TOKENS * 2, repeats: int = 5) -> bool:
    """Whether ``rows`` float32 rows over the upcast bf16 ``weight`` beat the prepacked bf16 kernel on this CPU
    (best of ``repeats`` each, after a warm-up; a clear margin is required, as a tie favours bf16's lower memory traffic)."""
    if not _can_prepack(weight):
        return True  # no bf16 kernel to use: bf16 GEMMs would be emulated
    bf16 = Linear(weight)
    x = torch.randn(rows, weight.shape[1]).to(torch.bfloat16)
    xf = x.float()

    def best(fn, arg) -> float:
        fn(arg)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(arg)
            times.append(time.perf_counter() - start)
        return min(times)

    fp32_s, bf16_s = best(bf16, xf), best(bf16, x)
    logger.info("big-step GEMM probe (%d x %d x %d): float32 %.2f ms, bf16 %.2f ms", rows, weight.shape[1], weight.shape[0], fp32_s * 1e3, bf16_s * 1e3)
    return fp32_s * 1.15 < bf16_s


class StepAbandoned(Exception):
    """The step was given up between two layers: every request in it is being aborted (its partial KV rows lie past
    the sequences' computed tokens, in blocks not yet hashed, so nothing reads them)."""


class Linear:
    """``y = x @ weight.T + bias`` through the fastest kernel for the input's dtype and rows.

    bf16 rows on the CPU go through ``kernels/cpu_gemv`` where it built on this machine: up to
    three (a decode step of up to three sequences) beside oneDNN's bf16 kernel, which it
    outruns 1.2-1.8x there; any number where oneDNN has no bf16 kernel (CPUs without AVX-512),
    as torch's own bf16 GEMM is 1.1-3.5x slower. Other low-precision rows use the oneDNN-prepacked
    weight (same kernel and result as ``F.linear``, without re-laying-out the weight on
    every call); float32 rows over low-precision weights upcast the weight for that call.
    """

    __slots__ = ("weight", "bias", "packed", "gemv_rows", "gemv")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight
        self.bias = bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 8) if _can_prepack(weight) else None
        self.gemv = cpu_gemv.PreparedGemv(weight, bias) if cpu_gemv.can_use(weight, bias) else None
        # the most rows the native kernel takes (0: none)
        self.gemv_rows = 0 if self.gemv is None else cpu_gemv.GEMV_MAX_ROWS if self.packed is not None else sys.maxsize

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if 0 < x.shape[0] <= self.gemv_rows and x.dtype == torch.bfloat16:  # the decode steps' path, first
            return self.gemv(x)
        if x.dtype != self.weight.dtype:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), bias)
        if self.packed is not None and x.shape[0] > 0:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class LayerLinears:
    """The four GEMMs of one decoder layer."""

    __slots__ = ("qkv", "o_proj", "gate_up", "down")

    def __init__(self, qkv: LinearFn, o_proj: LinearFn, gate_up: LinearFn, down: LinearFn):
        self.qkv, self.o_proj, self.gate_up, self.down = qkv, o_proj, gate_up, down


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate).mul_(up)


def silu_mul_invariant(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up through ``exp``, whose vectorised and scalar paths agree bit for bit."""
    return gate.neg().exp_().add_(1).reciprocal_().mul_(gate).mul_(up)


class LlamaModel:
    """Weights plus the forward pass; stateless between steps (state lives in the KV cache)."""

    def __init__(
        self, config: ModelConfig, weights: ModelWeights, attention: AttentionFn, max_positions: int, device: torch.device,
        dtype: torch.dtype, deterministic: bool = False,
    ):
        self.config = config
        self.weights = weights
        self.attention = attention
        self.dtype = dtype
        self.device = device
        self.rope = RotaryEmbedding(config.rope_inv_freq, config.rope_attention_factor, max_positions, device, dtype)
        self.scale = config.head_dim**-0.5
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        linear = invariant_linear if deterministic else Linear
        self.linears = [
            LayerLinears(linear(lw.qkv, lw.qkv_bias), linear(lw.o_proj, lw.o_proj_bias), linear(lw.gate_up), linear(lw.down))
            for lw in weights.layers
        ]
        self.lm_head = linear(weights.lm_head)
        self.silu_mul = silu_mul_invariant if deterministic else silu_mul
        # bf16 steps on a CPU: the residual adds, norms and rotations as native calls (kernels/cpu_layer_ops)
        self.native_layer_ops = device.type == "cpu" and dtype == torch.bfloat16 and not deterministic and cpu_layer_ops.available()
        # and steps of decodes only, up to as many as the GEMV serves, as one native call through every layer
        self.decode_step, self.decode_step_rows = None, 0
        if self.native_layer_ops:
            shape = cpu_decode_step.DecoderShape(
                config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, config.intermediate_size, config.rms_norm_eps, self.scale
            )
            rows = min(lin.gemv_rows for layer in self.linears for lin in (layer.qkv, layer.o_proj, layer.gate_up, layer.down))
            if rows and cpu_decode_step.supports(shape, weights.layers, self.rope.cos, self.rope.sin):
                self.decode_step, self.decode_step_rows = cpu_decode_step.DecodeStep(shape, weights.layers, self.rope.cos, self.rope.sin), rows
        # float32 activations for big steps only where the bf16 GEMM is the slow one (measured here); never in
        # deterministic mode, where a token's numbers must not depend on the size of its step
        self.fp32_big_steps = (
            device.type == "cpu" and dtype == torch.bfloat16 and not deterministic and float32_steps_are_faster(weights.layers[0].gate_up)
        )

    @classmethod
    def load(
        cls, path: str, config: ModelConfig, attention: AttentionFn, max_positions: int, device: torch.device, dtype: torch.dtype,
        deterministic: bool = False,
    ) -> "LlamaModel":
        return cls(config, load_weights(path, config, dtype, device), attention, max_positions, device, dtype, deterministic)

    def activation_dtype(self, num_tokens: int) -> torch.dtype:
        return torch.float32 if self.fp32_big_steps and num_tokens >= FP32_MIN_TOKENS else self.dtype

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
        logits_indices: torch.Tensor,
        interrupt: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """Run one packed step; returns float32 logits [len(logits_indices), vocab]. ``interrupt`` is asked before each
        layer (of the op-by-op path): True gives the step up (``StepAbandoned``)."""
        cfg, w = self.config, self.weights
        num_tokens = input_ids.shape[0]
        eps = cfg.rms_norm_eps
        act_dtype = self.activation_dtype(num_tokens)
        num_qk_heads = cfg.num_heads + cfg.num_kv_heads
        if self.decode_step is not None and not meta.prefills and num_tokens <= self.decode_step_rows and kv_cache.dtype == torch.bfloat16:
            return self._native_decode_step(input_ids, positions, meta, kv_cache, logits_indices)
        native = self.native_layer_ops and act_dtype == torch.bfloat16
        if native:  # the native rotation reads the tables' rows unchecked
            positions = self.rope.checked_positions(positions)
            add_norm = cpu_layer_ops.add_rms_norm
        else:
            cos, sin = self.rope.tables(positions)
            add_norm = functools.partial(add_rms_norm, out_dtype=act_dtype)
        h = w.embed[input_ids].to(act_dtype)  # float32 steps keep the residual stream in float32 too
        rows = cache_rows(kv_cache, meta.slot_mapping)  # where the step's K/V go, the same for every layer
        pending = None  # the MLP's output, added to h by the next norm
        for i, (layer, lin) in enumerate(zip(w.layers, self.linears)):
            if interrupt is not None and interrupt():
                raise StepAbandoned(f"given up before layer {i}")
            qkv = lin.qkv(add_norm(h, pending, layer.input_norm, eps))
            # q and k sit side by side in qkv: (normalise and) rotate both heads' worth in one pass
            qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, num_qk_heads, cfg.head_dim)
            if layer.qk_norm is not None:
                qk = rms_norm(qk, layer.qk_norm, eps)
            qk = cpu_layer_ops.rotary_(qk, positions, self.rope.cos, self.rope.sin) if native else apply_rotary(qk, cos, sin)
            q, k = qk[:, : cfg.num_heads], qk[:, cfg.num_heads :]
            v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            write_kv_rows(kv_cache, i, k, v, rows)
            attn = self.attention(q, k, v, kv_cache, i, meta, self.scale)
            gate, up = lin.gate_up(add_norm(h, lin.o_proj(attn.reshape(num_tokens, self.q_size)), layer.post_norm, eps)).chunk(2, dim=-1)
            pending = lin.down(self.silu_mul(gate, up))
        if pending is not None:
            h += pending
        h = rms_norm(h[logits_indices], w.final_norm, eps)
        return self.lm_head(h).float()

    def _native_decode_step(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor, logits_indices: torch.Tensor
    ) -> torch.Tensor:
        """``forward`` for a step of decodes only, its layers in one native call (``kernels.cpu_decode_step``)."""
        h = self.weights.embed[input_ids]
        n = meta.num_decode_tokens
        self.decode_step(
            h, self.rope.checked_positions(positions), meta.slot_mapping, kv_cache, meta.decode_block_tables[:n].contiguous(),
            meta.decode_context_lens[:n].contiguous(), meta.max_decode_context_len,
        )
        h = rms_norm(h[logits_indices], self.weights.final_norm, self.config.rms_norm_eps)
        return self.lm_head(h).float()

"""The Llama-family decoder (Llama, Qwen2, Mistral) over a paged KV cache.

One ``forward`` runs a packed step: decodes and prefill chunks of many sequences
flattened into one token batch. Each layer writes its new K/V into the cache by
slot, then attends through the selected kernel. Only the rows that need a next
token go through the final norm and the LM head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitserve.engine.model_config import ModelConfig
from splitserve.engine.rope import RotaryEmbedding, apply_rotary
from splitserve.engine.weights import ModelWeights, load_weights
from splitserve.kernels import AttentionFn, AttentionMetadata, write_kv


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class LlamaModel:
    """Weights plus the forward pass; stateless between steps (state lives in the KV cache)."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, attention: AttentionFn, max_positions: int, device: torch.device, dtype: torch.dtype):
        self.config = config
        self.weights = weights
        self.attention = attention
        self.dtype = dtype
        self.device = device
        self.rope = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling, device, dtype)
        self.scale = config.head_dim**-0.5
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim

    @classmethod
    def load(cls, path: str, config: ModelConfig, attention: AttentionFn, max_positions: int, device: torch.device, dtype: torch.dtype) -> "LlamaModel":
        return cls(config, load_weights(path, config, dtype, device), attention, max_positions, device, dtype)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """Run one packed step; returns float32 logits [len(logits_indices), vocab]."""
        cfg, w = self.config, self.weights
        num_tokens = input_ids.shape[0]
        eps = cfg.rms_norm_eps
        cos, sin = self.rope.tables(positions)
        h = w.embed[input_ids]
        for i, layer in enumerate(w.layers):
            x = rms_norm(h, layer.input_norm, eps)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias)
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = apply_rotary(q.view(num_tokens, cfg.num_heads, cfg.head_dim), cos, sin)
            k = apply_rotary(k.view(num_tokens, cfg.num_kv_heads, cfg.head_dim), cos, sin)
            v = v.view(num_tokens, cfg.num_kv_heads, cfg.head_dim)
            write_kv(kv_cache, i, k, v, meta.slot_mapping)
            attn = self.attention(q, k, v, kv_cache, i, meta, self.scale)
            h = h + F.linear(attn.reshape(num_tokens, self.q_size), layer.o_proj)
            x = rms_norm(h, layer.post_norm, eps)
            gate, up = F.linear(x, layer.gate_up).chunk(2, dim=-1)
            h = h + F.linear(F.silu(gate) * up, layer.down)
        h = rms_norm(h[logits_indices], w.final_norm, eps)
        return F.linear(h, w.lm_head).float()

"""Read a Hugging Face checkpoint's safetensors into fused per-layer weights.

Single-file (``model.safetensors``) and sharded (``model.safetensors.index.json``)
checkpoints are both read. Q/K/V projections are fused into one matrix and gate/up
into another, so each layer runs four matmuls. Anything missing or unexpected is
a ``ValueError`` naming the tensor and the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from splitserve.engine.model_config import ModelConfig


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor  # [q + 2*kv, hidden]
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2*intermediate, hidden]
    down: torch.Tensor


@dataclass(slots=True)
class ModelWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in a stable order."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"checkpoint {str(path)!r} index names shard(s) that are missing: {missing}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(path.glob("*.safetensors"))
    if others:
        return others
    raise ValueError(
        f"checkpoint {str(path)!r} has no safetensors weights (model.safetensors or model.safetensors.index.json); "
        "convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True)"
    )


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def load_weights(path: str | Path, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> ModelWeights:
    """Load and fuse the checkpoint's tensors, cast to ``dtype`` on ``device``."""
    path = Path(path)
    raw = _read_all(path)

    def take(name: str) -> torch.Tensor:
        if name not in raw:
            raise ValueError(f"checkpoint {str(path)!r} is missing tensor {name!r}")
        return raw.pop(name).to(device=device, dtype=dtype)

    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        qkv = torch.cat([take(p + "self_attn.q_proj.weight"), take(p + "self_attn.k_proj.weight"), take(p + "self_attn.v_proj.weight")])
        bias = None
        if config.attention_bias:
            bias = torch.cat([take(p + "self_attn.q_proj.bias"), take(p + "self_attn.k_proj.bias"), take(p + "self_attn.v_proj.bias")])
        layers.append(
            LayerWeights(
                input_norm=take(p + "input_layernorm.weight"),
                qkv=qkv.contiguous(),
                qkv_bias=bias,
                o_proj=take(p + "self_attn.o_proj.weight"),
                post_norm=take(p + "post_attention_layernorm.weight"),
                gate_up=torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]).contiguous(),
                down=take(p + "mlp.down_proj.weight"),
            )
        )
    embed = take("model.embed_tokens.weight")
    if "lm_head.weight" in raw and not config.tie_word_embeddings:
        lm_head = take("lm_head.weight")
    else:
        raw.pop("lm_head.weight", None)
        lm_head = embed
    final_norm = take("model.norm.weight")
    leftovers = [n for n in raw if not n.endswith("rotary_emb.inv_freq")]
    if leftovers:
        raise ValueError(f"checkpoint {str(path)!r} has tensors this architecture does not use: {leftovers[:5]}")
    if embed.shape != (config.vocab_size, config.hidden_size):
        raise ValueError(f"embed_tokens has shape {tuple(embed.shape)}, config says ({config.vocab_size}, {config.hidden_size})")
    return ModelWeights(embed=embed, layers=layers, final_norm=final_norm, lm_head=lm_head)

"""Read a Hugging Face checkpoint's safetensors into fused per-layer weights.

Single-file (``model.safetensors``) and sharded (``model.safetensors.index.json``)
checkpoints are both read. Q/K/V projections are fused into one matrix and gate/up
into another, so each layer runs four matmuls. Anything missing, unexpected or of
a shape the config does not predict (e.g. a ``head_dim`` that disagrees with the
projections) is a ``ValueError`` naming the tensor and the file.
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
    o_proj_bias: torch.Tensor | None
    qk_norm: torch.Tensor | None  # Qwen3: per-head RMSNorm weights, q_norm per q head then k_norm per kv head [H + KVH, head_dim]
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


def expected_tensors(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the engine reads from a checkpoint of this config, with its shape."""
    q, kv, h, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size, c.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    for i in range(c.num_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            a + "q_proj.weight": (q, h), a + "k_proj.weight": (kv, h), a + "v_proj.weight": (kv, h), a + "o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h), p + "mlp.down_proj.weight": (h, inter),
        })
        if c.qkv_bias:
            shapes.update({a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,)})
        if c.o_proj_bias:
            shapes[a + "o_proj.bias"] = (h,)
        if c.qk_norm:
            shapes.update({a + "q_norm.weight": (c.head_dim,), a + "k_norm.weight": (c.head_dim,)})
    return shapes


def _ignored(name: str, config: ModelConfig) -> bool:
    """Tensors transformers itself ignores: rotary caches, and a stored head when embeddings are tied."""
    return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")


def check_tensor_shapes(shapes: dict[str, tuple[int, ...]], config: ModelConfig, path: Path) -> None:
    """ValueError naming the first tensor that is missing, unexpected or of the wrong shape."""
    expected = expected_tensors(config)
    missing = [n for n in expected if n not in shapes]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} is missing tensor {missing[0]!r} ({len(missing)} missing)")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            c = config
            raise ValueError(
                f"checkpoint {str(path)!r}: tensor {name!r} has shape {tuple(shapes[name])} but config.json implies {shape} "
                f"(hidden_size={c.hidden_size}, num_attention_heads={c.num_heads}, num_key_value_heads={c.num_kv_heads}, "
                f"head_dim={c.head_dim}, intermediate_size={c.intermediate_size}, vocab_size={c.vocab_size})"
            )
    leftovers = [n for n in shapes if n not in expected and not _ignored(n, config)]
    if leftovers:
        raise ValueError(f"checkpoint {str(path)!r} has tensors this architecture does not use: {leftovers[:5]}")


def check_checkpoint(path: str | Path, config: ModelConfig) -> None:
    """Check tensor names and shapes from the safetensors headers alone (no weight is read)."""
    path = Path(path)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    check_tensor_shapes(shapes, config, path)


def _stacked_qk_norm(q_norm: torch.Tensor, k_norm: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    """One weight row per head of the fused q|k block, so a single RMSNorm call covers both."""
    return torch.cat([q_norm.expand(c.num_heads, -1), k_norm.expand(c.num_kv_heads, -1)]).contiguous()


def load_weights(path: str | Path, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> ModelWeights:
    """Load and fuse the checkpoint's tensors, cast to ``dtype`` on ``device``."""
    path = Path(path)
    raw = _read_all(path)
    c = config
    check_tensor_shapes({name: tuple(t.shape) for name, t in raw.items()}, c, path)

    def take(name: str) -> torch.Tensor:
        return raw.pop(name).to(device=device, dtype=dtype)

    layers = []
    for i in range(c.num_layers):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        qkv = torch.cat([take(a + "q_proj.weight"), take(a + "k_proj.weight"), take(a + "v_proj.weight")])
        qkv_bias = torch.cat([take(a + "q_proj.bias"), take(a + "k_proj.bias"), take(a + "v_proj.bias")]) if c.qkv_bias else None
        layers.append(
            LayerWeights(
                input_norm=take(p + "input_layernorm.weight"),
                qkv=qkv.contiguous(),
                qkv_bias=qkv_bias,
                o_proj=take(a + "o_proj.weight"),
                o_proj_bias=take(a + "o_proj.bias") if c.o_proj_bias else None,
                qk_norm=_stacked_qk_norm(take(a + "q_norm.weight"), take(a + "k_norm.weight"), c) if c.qk_norm else None,
                post_norm=take(p + "post_attention_layernorm.weight"),
                gate_up=torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]).contiguous(),
                down=take(p + "mlp.down_proj.weight"),
            )
        )
    embed = take("model.embed_tokens.weight")
    lm_head = embed if c.tie_word_embeddings else take("lm_head.weight")
    return ModelWeights(embed=embed, layers=layers, final_norm=take("model.norm.weight"), lm_head=lm_head)


def inspect_checkpoint(path: str | Path) -> ModelConfig:
    """The checkpoint's ``ModelConfig`` after checking its config and its tensors' names and shapes
    (headers only): the fast, complete refusal to run at start-up, before any worker starts."""
    config = ModelConfig.from_pretrained(path)
    check_checkpoint(path, config)
    return config

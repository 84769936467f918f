"""Model configuration read from a Hugging Face checkpoint directory, the way transformers reads it.

``ModelConfig.from_pretrained(path)`` loads ``config.json`` with ``transformers.AutoConfig``
(which knows every spelling: ``rope_parameters`` or ``rope_theta``/``rope_scaling``,
``dtype`` or ``torch_dtype``, legacy ``type`` keys) and maps it onto the shape the
engine runs. Anything that would change the model's math and that the engine does
not implement is refused with a ``ValueError`` naming the field, its value and what
is supported: the engine never runs a checkpoint approximately.

RoPE frequencies come from transformers' own initialisers, so every implemented
rope type (default, linear, dynamic, yarn, llama3) matches it bit for bit. Two
features are exact only up to a context length, which becomes the model's
``max_context_len``: a sliding window (no token is ever outside a window that is
at least as long as the context) and dynamic NTK scaling (identical to the
unscaled rope up to ``max_position_embeddings``, which already bounds the context).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
_SOFTCAP_FIELDS = ("final_logit_softcapping", "attn_logit_softcapping", "logit_softcapping")
_LAYER_TYPES = ("full_attention", "sliding_attention")

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a dtype name ('bfloat16', 'float32', ...) to ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(set(_DTYPES))}, got {dtype!r}")
    return _DTYPES[name]


@dataclass
class ModelConfig:
    """Resolved shape of a Llama-family decoder (Llama, Qwen2, Qwen3, Mistral)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    checkpoint_dtype: str
    rope_type: str = "default"
    rope_theta: float = 10000.0
    rope_inv_freq: tuple[float, ...] = field(default=(), repr=False)  # transformers' own, float32 values
    rope_attention_factor: float = 1.0  # yarn's scale on cos/sin
    qkv_bias: bool = False
    o_proj_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k, before rope
    max_context_len: int = 0  # longest context run exactly (0: max_position_embeddings)
    context_limit_reason: str = ""  # why max_context_len is below max_position_embeddings
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    def __post_init__(self) -> None:
        if not self.max_context_len:
            self.max_context_len = self.max_position_embeddings
        if not self.rope_inv_freq:
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
            self.rope_inv_freq = tuple((1.0 / (self.rope_theta**exponents)).tolist())

    @property
    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
        per_layer += (q + 2 * kv) * self.qkv_bias + h * self.o_proj_bias + 2 * self.head_dim * self.qk_norm
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"model path {str(path)!r} is not a directory (expected a Hugging Face checkpoint folder)")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"model path {str(path)!r} has no config.json")
        try:
            raw = json.loads(cfg_file.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{cfg_file} is not valid JSON: {e}") from e
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"unsupported architecture {archs!r} in {cfg_file}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        hf = _load_hf_config(path)
        return _from_hf(hf, arch, _eos_ids(hf, path), str(cfg_file))


def _load_hf_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers' own validation (bad rope parameters, unknown model_type, ...)
        raise ValueError(f"transformers cannot read {path / 'config.json'}: {e}") from e


def _eos_ids(hf: Any, path: Path) -> list[int]:
    """EOS ids from config.json and generation_config.json, in that order, without repeats."""
    ids: list[int] = []
    sources = [getattr(hf, "eos_token_id", None)]
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        try:
            sources.append(json.loads(gen_file.read_text()).get("eos_token_id"))
        except ValueError as e:
            raise ValueError(f"{gen_file} is not valid JSON: {e}") from e
    for source in sources:
        for e in source if isinstance(source, list) else [source]:
            if e is not None and int(e) not in ids:
                ids.append(int(e))
    return ids


def _refuse(where: str, name: str, value: Any, supported: str) -> ValueError:
    return ValueError(f"{where}: {name}={value!r} is not supported by the splitserve engine ({supported}); refusing to run it approximately")


def _from_hf(hf: Any, arch: str, eos_ids: list[int], where: str) -> ModelConfig:
    """Map a transformers config onto ``ModelConfig``, refusing what the engine does not implement."""
    quant = getattr(hf, "quantization_config", None)
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", quant)
        raise _refuse(where, "quantization_config.quant_method", str(method), "unquantized float32, bfloat16 or float16 weights only")
    act = getattr(hf, "hidden_act", "silu")
    if act != "silu":
        raise _refuse(where, "hidden_act", act, "silu")
    if getattr(hf, "mlp_bias", False):
        raise _refuse(where, "mlp_bias", hf.mlp_bias, "MLPs without bias")
    for name in _SOFTCAP_FIELDS:
        if getattr(hf, name, None) is not None:
            raise _refuse(where, name, getattr(hf, name), "no logit soft-capping")
    if float(getattr(hf, "partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise _refuse(where, "partial_rotary_factor", hf.partial_rotary_factor, "rotary embedding over the whole head (1.0)")

    num_heads = int(hf.num_attention_heads)
    num_kv_heads = int(getattr(hf, "num_key_value_heads", None) or num_heads)
    if num_heads % num_kv_heads:
        raise ValueError(f"{where}: num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}")
    head_dim = int(getattr(hf, "head_dim", None) or hf.hidden_size // num_heads)
    max_pos = int(hf.max_position_embeddings)
    rope_type, theta, inv_freq, attention_factor = _rope(hf, where)
    max_context, reason = _context_limit(hf, arch, max_pos, where)

    bias = bool(getattr(hf, "attention_bias", False))
    qkv_bias, o_bias = {
        "Qwen2ForCausalLM": (True, False),
        "MistralForCausalLM": (False, False),  # transformers' Mistral ignores attention_bias
    }.get(arch, (bias, bias))
    dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None) or "float32"
    return ModelConfig(
        architecture=arch,
        vocab_size=int(hf.vocab_size),
        hidden_size=int(hf.hidden_size),
        intermediate_size=int(hf.intermediate_size),
        num_layers=int(hf.num_hidden_layers),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rms_norm_eps=float(hf.rms_norm_eps),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        checkpoint_dtype=str(dtype).removeprefix("torch."),
        rope_type=rope_type,
        rope_theta=theta,
        rope_inv_freq=inv_freq,
        rope_attention_factor=attention_factor,
        qkv_bias=qkv_bias,
        o_proj_bias=o_bias,
        qk_norm=arch == "Qwen3ForCausalLM",
        max_context_len=max_context,
        context_limit_reason=reason,
        eos_token_ids=eos_ids,
        bos_token_id=getattr(hf, "bos_token_id", None),
    )


def _rope(hf: Any, where: str) -> tuple[str, float, tuple[float, ...], float]:
    """(rope type, theta, inverse frequencies, attention factor) computed by transformers itself."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(hf, "rope_parameters", None) or {}
    if set(params) & set(_LAYER_TYPES):  # per-layer-type rope (Gemma-style)
        raise _refuse(where, "rope_parameters", params, "one rope setting shared by every layer")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise _refuse(where, "rope_parameters.rope_type", rope_type, f"rope types {', '.join(SUPPORTED_ROPE_TYPES)}")
    if float(params.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        raise _refuse(where, "rope_parameters.partial_rotary_factor", params["partial_rotary_factor"], "rotary embedding over the whole head (1.0)")
    theta = float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
    if rope_type == "default":
        return rope_type, theta, (), 1.0  # ModelConfig computes the plain frequencies
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
    return rope_type, theta, tuple(inv_freq.float().tolist()), float(attention_factor)


def _context_limit(hf: Any, arch: str, max_pos: int, where: str) -> tuple[int, str]:
    """The longest context the engine runs exactly, and the reason when it is below ``max_position_embeddings``."""
    layer_types = list(getattr(hf, "layer_types", None) or [])
    unknown = sorted({t for t in layer_types if t not in _LAYER_TYPES})
    if unknown:
        raise _refuse(where, "layer_types", unknown, f"layer types {', '.join(_LAYER_TYPES)}")
    window = getattr(hf, "sliding_window", None)
    if arch == "MistralForCausalLM":
        sliding = window is not None
    elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        sliding = "sliding_attention" in layer_types
    else:
        sliding = False  # transformers' Llama has no sliding window
    if sliding and window is not None and int(window) < max_pos:
        return int(window), (
            f"sliding_window={int(window)} in {where}: the engine has no sliding-window attention, so it serves "
            f"at most {int(window)} tokens of context (where the window never drops a token)"
        )
    return max_pos, ""

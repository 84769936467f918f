"""Checkpoint configs read as transformers reads them; everything the engine does not implement refused by name.

The checkpoints here are written by transformers' own config classes (and, for the
end-to-end refusals, by ``build_checkpoint``, i.e. transformers' ``save_pretrained``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from splitserve.engine.model_config import ModelConfig
from splitserve.engine.rope import RotaryEmbedding
from tests.helpers import hf_greedy

pytestmark = pytest.mark.engine

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 1e6},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256, "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 5e5},
}


def _write_config(path: Path, config) -> Path:
    config.save_pretrained(path)
    return path


def _llama(path: Path, **kw) -> Path:
    from transformers import LlamaConfig

    return _write_config(path, LlamaConfig(architectures=["LlamaForCausalLM"], **{**BASE, **kw}))


@pytest.mark.parametrize("name", sorted(ROPES))
def test_rope_tables_match_transformers(tmp_path, name):
    """cos/sin of every implemented rope type equal transformers' own rotary embedding bit for bit."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_config = LlamaConfig(architectures=["LlamaForCausalLM"], max_position_embeddings=2048, rope_parameters=ROPES[name], **BASE)
    mc = ModelConfig.from_pretrained(_write_config(tmp_path, hf_config))
    assert mc.rope_type == ROPES[name]["rope_type"]
    positions = torch.arange(2048)
    ours = RotaryEmbedding(mc.rope_inv_freq, mc.rope_attention_factor, 2048, torch.device("cpu"), torch.float32)
    cos, sin = LlamaRotaryEmbedding(hf_config)(torch.zeros(1, dtype=torch.float32), positions.unsqueeze(0))
    half = mc.head_dim // 2
    assert torch.equal(ours.cos, cos[0])
    assert torch.equal(torch.cat([-ours.sin[:, :half], ours.sin[:, half:]], dim=-1), sin[0])
    if name.startswith("yarn"):
        assert mc.rope_attention_factor > 1.0


def test_sliding_window_caps_the_context_and_stays_exact(tmp_path):
    """A Mistral window shorter than max_position_embeddings: served up to the window (where it drops
    nothing) with the same greedy tokens as transformers; asking for more is refused by name."""
    from splitserve import LLM, SamplingParams
    from splitserve.engine.checkpoint_builder import build_checkpoint

    path = str(build_checkpoint(tmp_path / "mistral", architecture="MistralForCausalLM", sliding_window=64, seed=3, **{
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
    }))
    mc = ModelConfig.from_pretrained(path)
    assert mc.max_context_len == 64 and "sliding_window=64" in mc.context_limit_reason
    with pytest.raises(ValueError, match="max_model_len=128.*sliding_window=64"):
        LLM(path, max_model_len=128, num_kv_blocks=64)
    llm = LLM(path, dtype="float32", num_kv_blocks=64)
    assert llm.engine.max_model_len == 64
    prompt = list(range(5, 53))
    out = llm.generate([prompt], SamplingParams(max_tokens=15, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert out.token_ids == hf_greedy(path, prompt, 15)


def test_qwen2_sliding_layers_cap_the_context(tmp_path):
    from transformers import Qwen2Config

    cfg = Qwen2Config(architectures=["Qwen2ForCausalLM"], use_sliding_window=True, sliding_window=256, max_window_layers=0, **BASE)
    mc = ModelConfig.from_pretrained(_write_config(tmp_path, cfg))
    assert "sliding_attention" in cfg.layer_types and mc.max_context_len == 256


def test_dtype_and_eos_in_both_spellings(tmp_path):
    from transformers import GenerationConfig

    path = _llama(tmp_path / "new", dtype="bfloat16", eos_token_id=7)
    GenerationConfig(eos_token_id=[7, 9]).save_pretrained(path)
    legacy = tmp_path / "old"
    legacy.mkdir()
    raw = json.loads((path / "config.json").read_text())
    raw["torch_dtype"] = raw.pop("dtype")
    raw["eos_token_id"] = [7, 11]
    (legacy / "config.json").write_text(json.dumps(raw))
    assert ModelConfig.from_pretrained(path).checkpoint_dtype == ModelConfig.from_pretrained(legacy).checkpoint_dtype == "bfloat16"
    assert ModelConfig.from_pretrained(path).eos_token_ids == [7, 9]
    assert ModelConfig.from_pretrained(legacy).eos_token_ids == [7, 11]


# (field as named in the error, config overrides, transformers config class)
REFUSED = [
    ("rope_parameters.rope_type", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                                                       "long_factor": [2.0] * 8, "original_max_position_embeddings": 256}}, "llama"),
    ("partial_rotary_factor", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "llama"),
    ("mlp_bias", {"mlp_bias": True}, "llama"),
    ("hidden_act", {"hidden_act": "gelu"}, "llama"),
    ("final_logit_softcapping", {"final_logit_softcapping": 30.0}, "llama"),
    ("attn_logit_softcapping", {"attn_logit_softcapping": 50.0}, "llama"),
    ("quantization_config.quant_method", {"quantization_config": {"quant_method": "awq", "bits": 4}}, "llama"),
    ("layer_types", {"layer_types": ["chunked_attention"]}, "qwen3"),
]


def _config_for(kind: str, overrides: dict):
    from transformers import LlamaConfig, Qwen3Config

    cls, arch = (LlamaConfig, "LlamaForCausalLM") if kind == "llama" else (Qwen3Config, "Qwen3ForCausalLM")
    config = cls(architectures=[arch], **BASE)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@pytest.mark.parametrize("field,overrides,kind", REFUSED, ids=[r[0] for r in REFUSED])
def test_unsupported_fields_are_refused_by_name(tmp_path, field, overrides, kind):
    path = _write_config(tmp_path, _config_for(kind, overrides))
    with pytest.raises(ValueError, match=rf"{field}=.*not supported"):
        ModelConfig.from_pretrained(path)


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GemmaForCausalLM"], "model_type": "gemma"}))
    with pytest.raises(ValueError, match="GemmaForCausalLM.*supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        ModelConfig.from_pretrained(tmp_path)


def test_head_dim_inconsistent_with_weights_is_refused(checkpoints, tmp_path):
    """A config whose head_dim does not match the projections: refused from the headers, and at load."""
    from splitserve import LLM
    from splitserve.engine.weights import inspect_checkpoint

    src = Path(checkpoints["llama"])
    bad = tmp_path / "bad"
    bad.mkdir()
    for item in src.iterdir():
        if item.name != "config.json":
            os.symlink(item, bad / item.name)
    raw = json.loads((src / "config.json").read_text())
    raw["head_dim"] = 32
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"q_proj.weight' has shape \(64, 64\) but config.json implies \(128, 64\).*head_dim=32"):
        inspect_checkpoint(bad)
    with pytest.raises(ValueError, match="head_dim=32"):
        LLM(str(bad), num_kv_blocks=16)


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_cli_refuses_with_the_message_and_no_traceback(tmp_path, command):
    path = _write_config(tmp_path / "softcap", _config_for("llama", {"final_logit_softcapping": 30.0}))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "splitserve.cli", command, "--model", str(path)], cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "final_logit_softcapping=30.0" in proc.stderr and "Traceback" not in proc.stderr
    assert not any("ray" in line.lower() for line in proc.stderr.splitlines()[:3]), "Ray must not start for a refused model"

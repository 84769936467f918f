"""Shared fixtures: small checkpoints built once per session, engine factories with a
leak check (every KV block free again after each engine test), HF reference outputs.
"""

from __future__ import annotations

import os

import pytest

import splitserve  # noqa: F401  first: from here on the checkout's kernels/ cannot shadow Hugging Face's `kernels`
from tests.helpers import assert_no_leaks

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Shapes used by the correctness tests: one per architecture, each exercising a
# different loading feature. All are written by transformers' own classes and
# ``save_pretrained`` (the installed 5.x spelling: ``rope_parameters``, ``dtype``).
ARCH_CONFIGS = {
    "llama": dict(  # Llama 3.1 style: llama3 rope scaling, theta 5e5
        architecture="LlamaForCausalLM", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    ),
    "qwen2": dict(  # qkv bias, tied embeddings, theta 1e6
        architecture="Qwen2ForCausalLM", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=1000000.0,
    ),
    "qwen3": dict(  # per-head q/k RMSNorm, head_dim unrelated to hidden/heads, yarn rope (Qwen long-context style)
        architecture="Qwen3ForCausalLM", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1000000.0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    ),
    "mistral": dict(  # GQA 8:1, explicit head_dim, sharded safetensors
        architecture="MistralForCausalLM", hidden_size=128, intermediate_size=192, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=1, head_dim=16, max_shard_size="300KB",
    ),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    from splitserve.engine.checkpoint_builder import build_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {name: str(build_checkpoint(root / name, seed=i + 1, **kw)) for i, (name, kw) in enumerate(ARCH_CONFIGS.items())}


@pytest.fixture(scope="session")
def legacy_checkpoints(checkpoints, tmp_path_factory) -> dict[str, str]:
    """The same checkpoints with config.json in the transformers 4.x spelling (as Hub checkpoints carry it)."""
    from tests.helpers import legacy_copy

    root = tmp_path_factory.mktemp("legacy")
    return {name: str(legacy_copy(path, root / name)) for name, path in checkpoints.items()}


@pytest.fixture(scope="session")
def tiny_model(checkpoints) -> str:
    return checkpoints["llama"]


@pytest.fixture
def make_llm():
    """Factory for ``LLM`` instances; after the test, each one must hold no KV block."""
    from splitserve import LLM

    made = []

    def factory(model: str, **kwargs):
        kwargs.setdefault("num_kv_blocks", 512)
        kwargs.setdefault("dtype", "float32")
        llm = LLM(model, **kwargs)
        made.append(llm)
        return llm

    yield factory
    for llm in made:
        assert_no_leaks(llm.engine)

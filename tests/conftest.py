"""Shared fixtures: small checkpoints built once per session, engine factories with a
leak check (every KV block free again after each engine test), HF reference outputs.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers import assert_no_leaks

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Shapes used by the correctness tests: one per architecture, each exercising a
# different loading feature (llama3 rope scaling, qkv bias + tied embeddings, sharding).
ARCH_CONFIGS = {
    "llama": dict(
        architecture="LlamaForCausalLM", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    ),
    "qwen2": dict(
        architecture="Qwen2ForCausalLM", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=1000000.0,
    ),
    "mistral": dict(
        architecture="MistralForCausalLM", hidden_size=96, intermediate_size=192, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=16, max_shard_size="300KB",
    ),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    from splitserve.engine.checkpoint_builder import build_checkpoint

    root = tmp_path_factory.mktemp("ckpt")
    return {name: str(build_checkpoint(root / name, seed=i + 1, **kw)) for i, (name, kw) in enumerate(ARCH_CONFIGS.items())}


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

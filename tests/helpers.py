"""Helpers shared by tests: leak check and transformers reference outputs."""

from __future__ import annotations

import torch


def assert_no_leaks(engine) -> None:
    """Every KV block is free (prefix-cache blocks count as free) and no request is left."""
    assert not engine.has_unfinished_requests(), f"{engine.num_unfinished_requests} requests still queued or running"
    assert engine.pool.num_free_blocks == engine.pool.num_blocks, (
        f"KV leak: {engine.pool.num_used_blocks} of {engine.pool.num_blocks} blocks still referenced"
    )


_HF_CACHE: dict[tuple, list[int]] = {}


def hf_greedy(model_path: str, prompt_ids: list[int], max_new_tokens: int, dtype=torch.float32) -> list[int]:
    """transformers' own greedy ``generate`` (EOS ignored), cached per (model, prompt, length)."""
    key = (model_path, tuple(prompt_ids), max_new_tokens, str(dtype))
    if key not in _HF_CACHE:
        model = hf_model(model_path, dtype)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
            )
        _HF_CACHE[key] = out[0, len(prompt_ids):].tolist()
    return _HF_CACHE[key]


_HF_MODELS: dict[tuple, object] = {}


def hf_model(model_path: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    key = (model_path, str(dtype))
    if key not in _HF_MODELS:
        _HF_MODELS[key] = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    return _HF_MODELS[key]

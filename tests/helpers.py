"""Helpers shared by tests: leak check and transformers reference outputs."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` inside the block (the kernels read it per call)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def legacy_config(config: dict) -> dict:
    """A transformers-5 config.json rewritten the way transformers 4.x wrote it.

    ``rope_parameters`` becomes ``rope_theta`` plus ``rope_scaling`` (with the old
    ``type`` key for yarn/linear/dynamic, as Qwen2.5 and older checkpoints have it),
    ``dtype`` becomes ``torch_dtype``, Qwen's ``layer_types`` becomes
    ``use_sliding_window: false`` with an (inactive) window, as Qwen2.5 ships it.
    """
    old = dict(config)
    rope = dict(old.pop("rope_parameters"))
    old["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type", "default")
    old["rope_scaling"] = None if kind == "default" else ({"rope_type": kind, **rope} if kind == "llama3" else {"type": kind, **rope})
    old["torch_dtype"] = old.pop("dtype")
    if old.get("model_type") in ("qwen2", "qwen3"):
        old.pop("layer_types", None)
        old.update(use_sliding_window=False, sliding_window=4096, max_window_layers=old["num_hidden_layers"])
    old["transformers_version"] = "4.46.0"
    return old


def legacy_copy(src: str | Path, dst: Path) -> Path:
    """A checkpoint directory sharing ``src``'s files except config.json, which is in the 4.x spelling."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.name != "config.json":
            os.symlink(item, dst / item.name)
    (dst / "config.json").write_text(json.dumps(legacy_config(json.loads((src / "config.json").read_text())), indent=2))
    return dst


def _has_c_compiler() -> bool:
    from splitserve.kernels import cpu_native

    return cpu_native.find_compiler() is not None


# the native CPU kernels' tests: where no C compiler is found, the kernels are not built (their fallback is tested)
needs_compiler = pytest.mark.skipif(not _has_c_compiler(), reason="no C compiler on this machine")

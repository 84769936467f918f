"""Tests for the checkpoint / tokenizer generator and the cached random-weight models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from splitserve.engine import random_models
from splitserve.engine.checkpoint_builder import (
    BOS_TOKEN,
    EOS_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    PAD_TOKEN,
    build_checkpoint,
    train_tokenizer,
)
from splitserve.engine.random_models import (
    MODEL_SIZES,
    count_parameters,
    make_model,
    random_model_path,
    served_model_name,
)

pytestmark = pytest.mark.engine

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = {k: v for k, v in MODEL_SIZES["tiny"].items() if k != "torch_dtype"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny") / "model", "tiny")


def _load(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _greedy(model, input_ids: list[int], num_tokens: int) -> list[int]:
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=num_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(input_ids):].tolist()


def _file_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def test_tiny_loads_and_generates(tiny_dir):
    model, tok = _load(tiny_dir)
    assert model.config.vocab_size == len(tok) == 4096
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert model.config.max_position_embeddings == 4096
    prompt = tok("The weather tomorrow will be")["input_ids"]
    out = _greedy(model, prompt, 16)
    assert len(out) == 16 and all(0 <= t < len(tok) for t in out)

    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["dtype"] == "float32" and config["eos_token_id"] == tok.eos_token_id
    gen_config = json.loads((tiny_dir / "generation_config.json").read_text())
    assert gen_config["eos_token_id"] == [tok.eos_token_id, tok.convert_tokens_to_ids(IM_END_TOKEN)]
    assert gen_config["bos_token_id"] == tok.bos_token_id


def test_tokenizer_round_trip_and_special_tokens(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert [tok.convert_tokens_to_ids(t) for t in (BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN)] == [0, 1, 2, 3, 4]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    texts = [
        "Hello, world!",
        "  leading spaces, tabs\tand\nnew lines  ",
        "def f(x):\n    return x ** 2  # café, naïve, 東京 🙂",
        "Numbers 3.14159 and $19.99; JSON {\"a\": [1, 2]}",
    ]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    # Common English compresses well: far fewer tokens than bytes.
    sentence = "The quick brown fox jumps over the lazy dog in the morning."
    assert len(tok(sentence, add_special_tokens=False)["input_ids"]) < len(sentence) / 3


def test_chat_template(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert "<|im_start|>" in json.loads((tiny_dir / "tokenizer_config.json").read_text())["chat_template"]
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Bye."}]},
    ]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|begin_of_text|><|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not tok.apply_chat_template(messages[:2], tokenize=False).endswith("assistant\n")
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids.count(tok.convert_tokens_to_ids(IM_START_TOKEN)) == 5


def test_logits_are_spread_and_greedy_text_varies(tiny_dir):
    """The init recipe: clear argmax margins, and greedy decoding does not collapse."""
    model, tok = _load(tiny_dir)
    prompt = tok("Once upon a time, in a small village")["input_ids"]
    out = _greedy(model, prompt, 48)
    assert len(set(out)) > 32
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out])).logits[0].float()
    top2 = logits.topk(2, dim=-1).values
    gaps = top2[:, 0] - top2[:, 1]
    assert logits.std(dim=-1).mean() > 3.0
    assert gaps.median() > 0.3 and gaps.min() > 1e-4
    assert not set(out) & {0, 1, 2, 3, 4}  # special-token rows of the head are shrunk


def test_builds_are_deterministic(tiny_dir, tmp_path):
    again = build_checkpoint(tmp_path / "again", seed=0, tokenizer=train_tokenizer(), **TINY)
    assert _file_bytes(again) == _file_bytes(tiny_dir)
    other_seed = build_checkpoint(tmp_path / "seed1", seed=1, **TINY)
    assert (other_seed / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    assert (other_seed / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_random_model_path_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path))
    path = random_model_path("tiny")
    assert path == tmp_path / "models" / "splitserve-tiny-v2"
    mtime = (path / "model.safetensors").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(random_models, "make_model", fail)
    start = time.perf_counter()
    assert random_model_path("tiny") == path
    assert time.perf_counter() - start < 0.05
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime


def test_random_model_path_concurrent_processes(tiny_dir, tmp_path):
    """Two processes race (released together after their imports): one build, no debris."""
    go = tmp_path / "go"
    code = (
        "import os, sys, time\n"
        "from splitserve.engine.random_models import random_model_path\n"
        "import transformers, torch\n"
        f"print('ready', flush=True)\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        "print(random_model_path('tiny'), flush=True)\n"
    )
    env = {**os.environ, "SPLITSERVE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    go.touch()
    paths = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        paths.append(out.strip())
    models_dir = tmp_path / "cache" / "models"
    assert paths[0] == paths[1] == str(models_dir / "splitserve-tiny-v2")
    assert sorted(p.name for p in models_dir.iterdir()) == [".splitserve-tiny-v2.lock", "splitserve-tiny-v2"]
    # Built in other processes (other hash seeds): still the same bytes as this one.
    assert _file_bytes(Path(paths[0])) == _file_bytes(tiny_dir)


def test_qwen2_has_nonzero_qkv_bias(tmp_path):
    from safetensors import safe_open

    path = build_checkpoint(tmp_path / "qwen2", architecture="Qwen2ForCausalLM", seed=3, rope_theta=1e6, **TINY)
    with safe_open(path / "model.safetensors", "pt") as f:
        for name in ("q_proj", "k_proj", "v_proj"):
            bias = f.get_tensor(f"model.layers.0.self_attn.{name}.bias")
            assert bias.abs().min() > 0 and bias.abs().mean() > 0.05
    model, tok = _load(path)
    assert model.config.model_type == "qwen2"
    assert len(set(_greedy(model, tok("Hello there")["input_ids"], 24))) > 12


def test_mistral_sliding_window_and_padded_vocab(tmp_path):
    path = build_checkpoint(
        tmp_path / "mistral", architecture="MistralForCausalLM", sliding_window=16, vocab_size=4160, head_dim=32, **TINY
    )
    model, tok = _load(path)
    assert model.config.sliding_window == 16 and model.config.vocab_size == 4160 and model.config.head_dim == 32
    out = _greedy(model, tok("A journey of a thousand miles")["input_ids"], 24)
    assert max(out) < len(tok)  # padding ids past the tokenizer are shrunk in the head


def test_sharded_llama_matches_unsharded(tiny_dir, tmp_path):
    path = build_checkpoint(tmp_path / "sharded", max_shard_size="1MB", seed=0, **TINY)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((path / s).is_file() for s in shards)
    assert not (path / "model.safetensors").exists()
    sharded, tok = _load(path)
    whole, _ = _load(tiny_dir)
    ids = torch.tensor([tok("Sharding keeps the weights")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(sharded(ids).logits, whole(ids).logits, rtol=0, atol=0)


def test_tied_llama3_rope_scaling(tmp_path):
    rope_scaling = {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
    }
    path = build_checkpoint(tmp_path / "tied", tie_word_embeddings=True, rope_theta=5e5, rope_scaling=rope_scaling, **TINY)
    config = json.loads((path / "config.json").read_text())
    assert config["rope_parameters"] == {**rope_scaling, "rope_theta": 5e5}
    assert "rope_scaling" not in config and "rope_theta" not in config and "torch_dtype" not in config  # as transformers 5 writes it
    model, tok = _load(path)
    assert model.config.tie_word_embeddings and model.config.rope_parameters["rope_type"] == "llama3"
    assert len(set(_greedy(model, tok("The river hums")["input_ids"], 24))) > 12


def test_make_model_refuses_non_empty_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_model(tmp_path, "tiny")
    make_model(tmp_path, "tiny", overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me" and (tmp_path / "model.safetensors").is_file()


def test_unknown_size_lists_allowed_sizes(tmp_path):
    for call in (lambda: make_model(tmp_path, "huge"), lambda: random_model_path("huge"), lambda: served_model_name("huge")):
        with pytest.raises(ValueError, match="'huge'.*tiny, small"):
            call()


def test_small_size_by_config_arithmetic():
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = {k: v for k, v in MODEL_SIZES["small"].items() if k != "torch_dtype"}
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, **spec))
    num_params = sum(p.numel() for p in model.parameters())
    assert num_params == count_parameters("small")
    assert 80_000_000 < num_params < 90_000_000
    assert MODEL_SIZES["small"]["torch_dtype"] == "bfloat16" and served_model_name("small") == "splitserve-small"

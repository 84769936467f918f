"""Random-weight checkpoints of named sizes, for shape tests and offline use.

``tiny`` (about 0.6M parameters, float32) is for fast tests; ``small`` (about
82M parameters, bfloat16) is a benchmark shape. Both are LlamaForCausalLM with the
project tokenizer, random but deterministic weights (see ``checkpoint_builder``):
their text means nothing. The real default model is ``default_model``.

``random_model_path(size)`` returns a ready checkpoint directory under the cache
(``models/splitserve-<size>-v2``, see ``model_cache``); ``make_model`` writes one
anywhere (``splitserve make-model``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from splitserve.engine.checkpoint_builder import TOKENIZER_VOCAB_SIZE, build_checkpoint
from splitserve.engine.model_cache import cached_checkpoint

MODEL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "torch_dtype": "float32",
    },
    "small": {
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 4,
        "max_position_embeddings": 4096,
        "torch_dtype": "bfloat16",
    },
}
# Bump when the recipe (tokenizer corpus, init, sizes, config spelling) changes so caches rebuild.
CHECKPOINT_VERSION = "v2"

# Files a checkpoint directory may hold; `make_model(overwrite=True)` removes only these.
_CHECKPOINT_FILE_PATTERNS = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
_PROGRESS_MIN_PARAMS = 20_000_000


def served_model_name(size: str) -> str:
    """The name of a named-size checkpoint, e.g. ``splitserve-small``."""
    _check_size(size)
    return f"splitserve-{size}"


def count_parameters(size: str, vocab_size: int = TOKENIZER_VOCAB_SIZE) -> int:
    """Parameter count of a named size by config arithmetic (untied embeddings)."""
    spec = MODEL_SIZES[_check_size(size)]
    d, inter = spec["hidden_size"], spec["intermediate_size"]
    head_dim = d // spec["num_attention_heads"]
    q_width = spec["num_attention_heads"] * head_dim
    kv_width = spec["num_key_value_heads"] * head_dim
    per_layer = d * q_width + 2 * d * kv_width + q_width * d + 3 * d * inter + 2 * d
    return spec["num_hidden_layers"] * per_layer + 2 * vocab_size * d + d


def make_model(out_dir: str | Path, size: str = "small", *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the named-size checkpoint into ``out_dir`` and return its path.

    Refuses a non-empty ``out_dir`` unless ``overwrite`` is set, in which case
    only checkpoint files (weights, configs, tokenizer files) are replaced.
    """
    spec = MODEL_SIZES[_check_size(size)]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; pass a directory path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass overwrite=True to replace the checkpoint files in it")
        _remove_checkpoint_files(out)
    if count_parameters(size) < _PROGRESS_MIN_PARAMS:
        return build_checkpoint(out, seed=seed, **spec)

    from tqdm.auto import tqdm

    stages = ["config", "init", "save", "tokenizer"]
    with tqdm(total=len(stages), desc=f"building {served_model_name(size)}", unit="step", leave=False) as bar:

        def progress(stage: str) -> None:
            bar.set_postfix_str(stage)
            bar.update(1)

        return build_checkpoint(out, seed=seed, progress=progress, **spec)


def random_model_path(size: str) -> Path:
    """Path of the cached named-size checkpoint, building it once if missing (process-safe)."""
    _check_size(size)
    return cached_checkpoint(f"splitserve-{size}-{CHECKPOINT_VERSION}", lambda tmp: make_model(tmp, size, seed=0))


def _check_size(size: str) -> str:
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; allowed sizes: {', '.join(MODEL_SIZES)}")
    return size


def _remove_checkpoint_files(out: Path) -> None:
    for pattern in _CHECKPOINT_FILE_PATTERNS:
        for path in out.glob(pattern):
            if path.is_file():
                path.unlink()

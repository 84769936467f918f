"""The project's default checkpoints: named sizes, made on demand, cached once.

``tiny`` (about 0.6M parameters, float32) is for fast tests; ``small`` (about
82M parameters, bfloat16) is for benchmarks. Both are LlamaForCausalLM with the
project tokenizer, random but deterministic weights (see ``checkpoint_builder``).

``default_model_path(size)`` returns a ready checkpoint directory under
``$SPLITSERVE_CACHE`` (default ``~/.cache/splitserve``), ``models/splitserve-<size>-v1``.
The first caller builds it in a temporary directory beside the target and
renames it into place, holding an exclusive ``fcntl`` lock, so several processes
starting at once (Ray workers) build it once and never see a half-written
directory; later calls return at the cost of a ``stat``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from splitserve.engine.checkpoint_builder import TOKENIZER_VOCAB_SIZE, build_checkpoint

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
DEFAULT_MODEL_SIZE = "small"
# Bump when the recipe (tokenizer corpus, init, sizes) changes so caches rebuild.
CHECKPOINT_VERSION = "v1"
CACHE_ENV_VAR = "SPLITSERVE_CACHE"

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


def served_model_name(size: str = DEFAULT_MODEL_SIZE) -> str:
    """The name the server reports for a default checkpoint, e.g. ``splitserve-small``."""
    _check_size(size)
    return f"splitserve-{size}"


DEFAULT_SERVED_NAME = f"splitserve-{DEFAULT_MODEL_SIZE}"


def count_parameters(size: str, vocab_size: int = TOKENIZER_VOCAB_SIZE) -> int:
    """Parameter count of a named size by config arithmetic (untied embeddings)."""
    spec = MODEL_SIZES[_check_size(size)]
    d, inter = spec["hidden_size"], spec["intermediate_size"]
    head_dim = d // spec["num_attention_heads"]
    q_width = spec["num_attention_heads"] * head_dim
    kv_width = spec["num_key_value_heads"] * head_dim
    per_layer = d * q_width + 2 * d * kv_width + q_width * d + 3 * d * inter + 2 * d
    return spec["num_hidden_layers"] * per_layer + 2 * vocab_size * d + d


def make_model(out_dir: str | Path, size: str = DEFAULT_MODEL_SIZE, *, seed: int = 0, overwrite: bool = False) -> Path:
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


def cache_root() -> Path:
    """``$SPLITSERVE_CACHE``, or ``~/.cache/splitserve`` when unset or empty."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "splitserve"


def default_model_path(size: str = DEFAULT_MODEL_SIZE) -> Path:
    """Path of the cached named-size checkpoint, building it once if missing (process-safe)."""
    import fcntl

    _check_size(size)
    models_dir = cache_root() / "models"
    final = models_dir / f"splitserve-{size}-{CHECKPOINT_VERSION}"
    if _is_complete(final):
        return final
    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / f".{final.name}.lock", "a+") as lock_file:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        try:
            if _is_complete(final):  # another process built it while we waited
                return final
            _remove_leftovers(models_dir, final)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=models_dir))
            try:
                make_model(tmp, size, seed=0)
                _make_readable(tmp)
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
    return final


def _check_size(size: str) -> str:
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; allowed sizes: {', '.join(MODEL_SIZES)}")
    return size


def _is_complete(path: Path) -> bool:
    has_weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return has_weights and (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


def _remove_leftovers(models_dir: Path, final: Path) -> None:
    """Under the lock: drop temp dirs of crashed builders and a damaged final dir."""
    for stale in models_dir.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=models_dir))
        os.rename(final, aside / "damaged")
        shutil.rmtree(aside, ignore_errors=True)


def _make_readable(path: Path) -> None:
    """mkdtemp makes the directory 0700 and transformers may write 0600 files."""
    os.chmod(path, 0o755)
    for child in path.iterdir():
        os.chmod(child, 0o644)


def _remove_checkpoint_files(out: Path) -> None:
    for pattern in _CHECKPOINT_FILE_PATTERNS:
        for path in out.glob(pattern):
            if path.is_file():
                path.unlink()

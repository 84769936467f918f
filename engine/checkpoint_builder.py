"""Build small random checkpoints in real Hugging Face format, with no download.

No model can be fetched on the machines this project runs on, so the project
makes its own: a byte-level BPE tokenizer trained on an embedded English corpus
(``tokenizer_corpus.txt``), and a Llama, Qwen2, Qwen3 or Mistral model built with
transformers' own classes, filled with deterministic random weights, and saved
with ``save_pretrained`` (safetensors, optionally sharded). ``config.json`` is
exactly what the installed transformers writes (5.x: ``rope_parameters`` and
``dtype``), nothing added. The same arguments and seed give the same files byte
for byte.

Why a custom initialisation: the tests compare greedy decoding token for token
between our engine and ``transformers.generate``. With the usual init (std 0.02)
the next-token logits are nearly flat, so float rounding flips the argmax. Here
the residual stream starts at RMS 1 (embeddings N(0, 1)), each block adds a
contribution of RMS about ``_RESIDUAL_GAIN`` whatever the depth (pre-norm), the
attention scores have a spread of a few units so the context matters, and the
LM head gives logits with a standard deviation of about ``_LOGIT_STD``: the gap
between the top two logits is then usually far above float32 rounding, while
greedy text does not collapse into one repeated token and depends on the whole
context. (bfloat16 rounding is relative, so no scale fixes it: bf16 greedy runs
drift apart after some tens of tokens, as HF's own sdpa and eager paths do.)
With tied embeddings the blocks are scaled up, see ``init_weights_``.
The LM-head rows of special tokens and of padding ids past the tokenizer are
shrunk, so greedy decoding practically never emits EOS: generations run to
``max_tokens``, which keeps benchmark lengths predictable.

Token conventions (Llama 3 style): the tokenizer prepends ``<|begin_of_text|>``
when encoding with special tokens; the ChatML chat template writes it itself, so
tokenize a chat prompt with ``apply_chat_template(..., tokenize=True)`` or encode
the rendered text with ``add_special_tokens=False``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
# Order fixes the ids: bos 0, eos 1, im_start 2, im_end 3, pad 4.
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN)
TOKENIZER_VOCAB_SIZE = 4096
CORPUS_PATH = Path(__file__).with_name("tokenizer_corpus.txt")

# ChatML with a leading BOS; accepts OpenAI-style content given as a list of parts.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('Unsupported role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

ARCHITECTURES: tuple[str, ...] = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")

# Initialisation knobs (see the module docstring); measured, not derived.
_EMBED_STD = 1.0
_NORM_JITTER = 0.1  # RMSNorm weights ~ 1 + N(0, jitter)
_QK_GAIN = 1.4  # q/k entries ~ N(0, gain^2): attention scores std ~ gain^2
_RESIDUAL_GAIN = 0.7  # RMS each attention / MLP block adds to the residual
_LOGIT_STD = 6.0
_BIAS_STD = 0.2  # Qwen2 q/k/v biases: clearly non-zero, small enough not to dominate
_SUPPRESSED_ROW_SCALE = 0.1  # LM-head rows of special / padding ids
_TIED_GAIN = 2.0  # tied embeddings: residual blocks scaled up, see init_weights_
_SILU_GLU_RMS = 0.6  # RMS of silu(g) * u for g, u ~ N(0, 1), measured


def train_tokenizer(vocab_size: int = TOKENIZER_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer on the embedded corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = CORPUS_PATH.read_text(encoding="utf-8")
    backend.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, backend.token_to_id(BOS_TOKEN))],
    )
    return _wrap(backend.to_str())


@functools.lru_cache(maxsize=1)
def _default_tokenizer_json() -> str:
    return train_tokenizer().backend_tokenizer.to_str()


def default_tokenizer() -> PreTrainedTokenizerFast:
    """The project tokenizer; trained once per process, a fresh object each call."""
    return _wrap(_default_tokenizer_json())


def _wrap(tokenizer_json: str) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, IM_END_TOKEN],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def build_checkpoint(
    out_dir: str | Path,
    *,
    architecture: str = "LlamaForCausalLM",
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    head_dim: int | None = None,
    vocab_size: int | None = None,
    max_position_embeddings: int = 4096,
    rope_theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    tie_word_embeddings: bool = False,
    sliding_window: int | None = None,
    rms_norm_eps: float = 1e-5,
    max_shard_size: str | None = None,
    seed: int = 0,
    torch_dtype: str = "float32",
    tokenizer: PreTrainedTokenizerFast | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a random checkpoint with tokenizer into ``out_dir`` and return its path.

    ``vocab_size`` None means exactly ``len(tokenizer)``; a larger value pads the
    vocabulary. ``max_shard_size`` (e.g. "2MB") shards the safetensors with an
    index file. ``sliding_window`` is for Mistral only. ``progress`` is called
    after each stage ("config", "init", "save", "tokenizer").
    """
    import torch

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r} is not supported; use one of {list(ARCHITECTURES)}")
    if sliding_window is not None and architecture != "MistralForCausalLM":
        raise ValueError(f"sliding_window={sliding_window} is only supported for MistralForCausalLM")
    dtype = getattr(torch, torch_dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"torch_dtype={torch_dtype!r} is not a torch floating dtype; use float32, bfloat16 or float16")
    tokenizer = tokenizer if tokenizer is not None else default_tokenizer()
    num_tokens = len(tokenizer)
    if vocab_size is None:
        vocab_size = num_tokens
    if vocab_size < num_tokens:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({num_tokens} tokens)")

    special_ids = _special_token_ids(tokenizer)
    config = _make_config(
        architecture,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=tie_word_embeddings,
        sliding_window=sliding_window,
        rms_norm_eps=rms_norm_eps,
        bos_token_id=special_ids["bos"],
        eos_token_id=special_ids["eos"],
        pad_token_id=special_ids["pad"],
        dtype=torch_dtype,
    )
    model_cls = _model_class(architecture)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    report = progress or (lambda stage: None)
    report("config")
    suppressed = sorted(set(special_ids["all"]) | set(range(num_tokens, vocab_size)))
    init_weights_(model, seed=seed, suppressed_token_ids=suppressed)
    model.to(dtype)
    model.generation_config = _generation_config(special_ids)
    report("init")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **save_kwargs)
    report("save")
    save_tokenizer(tokenizer, out)
    report("tokenizer")
    return out


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> None:
    """Write tokenizer.json and a tokenizer_config.json readable by transformers 4.45+ and 5.x.

    The chat template goes into tokenizer_config.json (not a separate .jinja file)
    and the class is the portable ``PreTrainedTokenizerFast``.
    """
    out = Path(out_dir)
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    extra = [t for t in tokenizer.all_special_tokens if t not in {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token}]
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "additional_special_tokens": sorted(extra, key=tokenizer.convert_tokens_to_ids),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(min(tokenizer.model_max_length, 1 << 30)),
        "chat_template": tokenizer.chat_template if tokenizer.chat_template is not None else CHAT_TEMPLATE,
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    special_map = {k: tokenizer_config[k] for k in ("bos_token", "eos_token", "pad_token", "additional_special_tokens")}
    _write_json(out / "special_tokens_map.json", special_map)


def init_weights_(model: PreTrainedModel, *, seed: int, suppressed_token_ids: list[int] | None = None) -> None:
    """Overwrite every parameter of a Llama-family model with the recipe above, in place.

    Each tensor is drawn from its own generator seeded by (seed, name), so a
    tensor does not depend on the others (layer 0 is the same at any depth).
    """
    import torch

    config = model.config
    d = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    attn_width = config.num_attention_heads * head_dim
    logit_std = _LOGIT_STD
    tied = bool(getattr(config, "tie_word_embeddings", False))
    residual_gain = _RESIDUAL_GAIN
    head_suffix = "embed_tokens.weight" if tied else "lm_head.weight"
    if tied:
        # The head is the embedding, so the residual's own e_x scores ~d against its
        # own row but ~sqrt(d) against the others: greedy would repeat the input
        # token. Blocks that add up to RMS ~sqrt(d) make e_x one voice among many.
        residual_gain = max(residual_gain, _TIED_GAIN * (d / (2 * config.num_hidden_layers)) ** 0.5)
    # name suffix -> std; norms are handled separately.
    stds = {
        "embed_tokens.weight": _EMBED_STD,
        "lm_head.weight": logit_std / d**0.5,
        "q_proj.weight": _QK_GAIN / d**0.5,
        "k_proj.weight": _QK_GAIN / d**0.5,
        "v_proj.weight": 1.0 / d**0.5,
        "o_proj.weight": residual_gain / attn_width**0.5,
        "gate_proj.weight": 1.0 / d**0.5,
        "up_proj.weight": 1.0 / d**0.5,
        "down_proj.weight": residual_gain / (_SILU_GLU_RMS * config.intermediate_size**0.5),
        "q_proj.bias": _BIAS_STD,
        "k_proj.bias": _BIAS_STD,
        "v_proj.bias": _BIAS_STD,
    }
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                value = 1.0 + _NORM_JITTER * noise
                if tied and name == "model.norm.weight":
                    # Tied head: the N(0, 1) embedding doubles as LM head; scale here instead.
                    value = value * (logit_std / d**0.5)
            else:
                suffix = ".".join(name.split(".")[-2:])
                if suffix not in stds:
                    raise ValueError(f"init_weights_: no init rule for parameter {name!r}")
                value = noise * stds[suffix]
                if suffix == head_suffix and suppressed_token_ids:
                    value[suppressed_token_ids] *= _SUPPRESSED_ROW_SCALE
            param.copy_(value.to(param.dtype))


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
        "im_end": tokenizer.convert_tokens_to_ids(IM_END_TOKEN) if IM_END_TOKEN in tokenizer.get_vocab() else None,
    }
    ids["all"] = sorted(tokenizer.convert_tokens_to_ids(list(tokenizer.all_special_tokens)))
    return ids


def _make_config(
    architecture: str, *, head_dim: int | None, sliding_window: int | None, rope_theta: float, rope_scaling: dict[str, Any] | None, **kwargs: Any
) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    kwargs["rope_parameters"] = {**(rope_scaling or {"rope_type": "default"}), "rope_theta": float(rope_theta)}
    if head_dim is None and architecture == "Qwen3ForCausalLM":
        head_dim = kwargs["hidden_size"] // kwargs["num_attention_heads"]  # Qwen3Config would default to 128
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    if architecture == "LlamaForCausalLM":
        return LlamaConfig(architectures=[architecture], **kwargs)
    if architecture == "MistralForCausalLM":
        return MistralConfig(architectures=[architecture], sliding_window=sliding_window, **kwargs)
    qwen = Qwen3Config if architecture == "Qwen3ForCausalLM" else Qwen2Config
    return qwen(architectures=[architecture], use_sliding_window=False, sliding_window=None, **kwargs)


def _model_class(architecture: str) -> type[PreTrainedModel]:
    import transformers

    return getattr(transformers, architecture)


def _generation_config(special_ids: dict[str, Any]) -> Any:
    from transformers import GenerationConfig

    eos_ids = [i for i in (special_ids["eos"], special_ids["im_end"]) if i is not None]
    return GenerationConfig(
        bos_token_id=special_ids["bos"],
        eos_token_id=eos_ids,
        pad_token_id=special_ids["pad"],
        do_sample=False,
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")

"""Tokenizer loading from the checkpoint directory (local files only, never a hub)."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase | None:
    """The checkpoint's tokenizer, or None when the directory ships none (token-id prompts only)."""
    path = Path(path)
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        logger.warning("no tokenizer files in %s: only token-id prompts will work and outputs carry no text", path)
        return None
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)

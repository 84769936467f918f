"""Incremental detokenization and stop-string matching for one sequence.

Text is produced a few tokens at a time (for streaming) without re-decoding the
whole output each step: only the tokens since the last emitted boundary are
decoded, and text that ends in an incomplete UTF-8 character is held back.

Two decodes per token, so their cost counts: for a fast (Rust ``tokenizers``)
tokenizer that cleans up no spaces, the Rust tokenizer decodes directly, which is
what transformers' ``decode`` ends in after ~8 µs of argument conversion per call
(``decoder_for``); any other tokenizer goes through transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

Decode = Callable[[list[int], bool], str]


def decoder_for(tokenizer: PreTrainedTokenizerBase) -> Decode:
    """``decode(ids, skip_special_tokens)``, giving exactly what ``tokenizer.decode`` gives for a list of ids."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode") and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)


@dataclass(slots=True)
class IncrementalDetokenizer:
    tokenizer: PreTrainedTokenizerBase | None
    skip_special_tokens: bool = True
    stop: list[str] = field(default_factory=list)
    include_stop_str: bool = False
    text: str = ""
    _ids: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0
    _decode: Decode | None = None  # default: ``decoder_for(tokenizer)``; an engine passes one for all its sequences
    longest_stop: int = field(init=False, default=0)  # characters of the longest stop string (0: none)

    def __post_init__(self) -> None:
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        if self._decode is None and self.tokenizer is not None:
            self._decode = decoder_for(self.tokenizer)

    def update(self, token_id: int) -> tuple[str, str | None]:
        """Add one output token; returns (new text, matched stop string or None).

        When a stop string matches, ``text`` is cut at it (or just after it when
        ``include_stop_str``) and the returned delta respects that cut.
        """
        if self.tokenizer is None:
            return "", None
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset], self.skip_special_tokens)
        full = self._decode(self._ids[self._prefix_offset :], self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return "", None
        delta = full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        old_len = len(self.text)
        self.text += delta
        if self.stop:
            search_from = max(0, old_len - self.longest_stop + 1)
            best: tuple[int, str] | None = None
            for s in self.stop:
                idx = self.text.find(s, search_from)
                if idx != -1 and (best is None or idx < best[0]):
                    best = (idx, s)
            if best is not None:
                idx, s = best
                cut = idx + len(s) if self.include_stop_str else idx
                self.text = self.text[:cut]
                return self.text[old_len:] if cut > old_len else "", s
        return delta, None

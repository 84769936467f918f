"""The incremental detokenizer's direct decode gives exactly what transformers' ``tokenizer.decode`` gives.

The engine decodes twice per generated token; for a fast tokenizer that cleans up no spaces it calls
the Rust tokenizer directly (``decoder_for``). Checked on the tiny test tokenizer and on the real
default model's (SmolLM2, byte-level BPE): slices of real text with non-ASCII characters, split
UTF-8 sequences and special tokens, and random ids, with and without skipping special tokens.
"""

from __future__ import annotations

import random

import pytest

from splitserve.engine.default_model import default_model_path
from splitserve.engine.detokenizer import IncrementalDetokenizer, decoder_for
from splitserve.engine.tokenizer import load_tokenizer

pytestmark = pytest.mark.engine

TEXT = "Le café est très bon 🙂 — naïve façade; 東京は晴れ. Tabs\tand  double  spaces, \"quotes\" & <tags>.\n"


@pytest.fixture(scope="module", params=["tiny", "default"])
def tokenizer(request, tiny_model):
    return load_tokenizer(tiny_model if request.param == "tiny" else str(default_model_path()))


def _id_lists(tokenizer) -> list[list[int]]:
    rng = random.Random(3)
    text_ids = tokenizer.encode(TEXT * 3, add_special_tokens=False)
    special = sorted(set(tokenizer.all_special_ids))
    lists = [text_ids[i:j] for i in range(0, len(text_ids), 7) for j in (i + 1, i + 2, i + 5, len(text_ids))]
    lists += [[rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 12))] for _ in range(300)]
    lists += [special + text_ids[:9] + special, text_ids[3:9] + special[:1] + text_ids[9:15], []]
    return lists


@pytest.mark.parametrize("skip", [True, False])
def test_direct_decode_equals_transformers_decode(tokenizer, skip):
    decode = decoder_for(tokenizer)
    for ids in _id_lists(tokenizer):
        assert decode(ids, skip) == tokenizer.decode(ids, skip_special_tokens=skip), ids


def test_a_tokenizer_that_cleans_up_spaces_keeps_transformers_decode(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "clean_up_tokenization_spaces", True)
    calls = []
    original = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: calls.append(ids) or original(ids, **kw))
    assert decoder_for(tokenizer)([5, 6], True) == original([5, 6], skip_special_tokens=True) and calls == [[5, 6]]


def test_streamed_text_is_the_whole_decode(tokenizer):
    """Token by token, the deltas add up to one decode of all the ids (split multi-byte characters held back)."""
    ids = tokenizer.encode(TEXT * 2, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    streamed = "".join(detok.update(t)[0] for t in ids)
    assert streamed == detok.text == tokenizer.decode(ids, skip_special_tokens=True)

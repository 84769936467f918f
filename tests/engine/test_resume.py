"""LLMEngine.resume_request: a request continued on a fresh engine from prompt + the tokens already streamed
goes on exactly as the uninterrupted run (tokens, text, held-back text, a stop string across the seam, counts).

This is what a worker does when it takes over a stream whose decode worker died (request migration).
"""

from __future__ import annotations

import random

import pytest

from splitserve import SamplingParams

pytestmark = pytest.mark.engine

PROMPT = [random.Random(3).randrange(5, 4096) for _ in range(30)]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def drive(engine, req_id: str, max_outputs: int | None = None) -> list:
    """Step until ``req_id`` finishes (or has produced ``max_outputs`` outputs: then it is aborted, as if its worker died)."""
    outs = []
    while True:
        outs += [o for o in engine.step() if o.req_id == req_id]
        if outs and outs[-1].finished:
            return outs
        if max_outputs is not None and len(outs) >= max_outputs:
            engine.abort_request(req_id)
            return outs


@pytest.mark.parametrize("cut_after", [1, 7])
def test_resumed_request_continues_the_uninterrupted_run(tiny_model, make_llm, cut_after):
    whole_llm, other_llm = make_llm(tiny_model), make_llm(tiny_model)
    whole = whole_llm.engine
    whole.add_request(PROMPT, greedy(24), "whole")
    reference = drive(whole, "whole")

    first = other_llm.engine  # the worker that dies after ``cut_after`` outputs ...
    first.add_request(PROMPT, greedy(24), "a")
    sent = drive(first, "a", max_outputs=cut_after)
    sent_ids = [t for o in sent for t in o.new_token_ids]
    sent_text = "".join(o.new_text for o in sent)

    survivor = whole  # ... and another one takes over
    survivor.resume_request("a-m1", PROMPT, sent_ids, greedy(24), num_sent_chars=len(sent_text))
    rest = drive(survivor, "a-m1")
    assert sent_ids + [t for o in rest for t in o.new_token_ids] == reference[-1].token_ids
    assert sent_text + "".join(o.new_text for o in rest) == reference[-1].text
    last = rest[-1]
    assert last.finish_reason == "length" and last.token_ids == reference[-1].token_ids  # counts include the earlier tokens
    assert last.prompt_token_ids == PROMPT


def test_stop_string_across_the_seam_and_held_back_text(tiny_model, make_llm):
    llm = make_llm(tiny_model)
    engine = llm.engine
    engine.add_request(PROMPT, greedy(24), "probe")
    probe = drive(engine, "probe")
    text = probe[-1].text
    seam = len(probe[4].text)  # the text of the first five tokens
    stop = text[seam - 2: seam + 2]  # four characters around the end of token 5: spans the seam when cut there
    assert len(stop) == 4 and text.index(stop) == seam - 2, (text, seam)
    params = lambda: greedy(24, stop=[stop])  # noqa: E731
    engine.add_request(PROMPT, params(), "whole")
    reference = drive(engine, "whole")[-1]
    assert reference.finish_reason == "stop" and reference.text == text[: seam - 2]

    engine.add_request(PROMPT, params(), "a")
    sent = drive(engine, "a", max_outputs=4)  # cut before the stop: the text a stop could claim was held back
    assert not sent[-1].finished
    sent_ids = [t for o in sent for t in o.new_token_ids]
    sent_text = "".join(o.new_text for o in sent)
    assert len(sent_text) < len(sent[-1].text)  # something was held back, and must not be lost
    engine.resume_request("a-m1", PROMPT, sent_ids, params(), num_sent_chars=len(sent_text))
    rest = drive(engine, "a-m1")
    assert sent_text + "".join(o.new_text for o in rest) == reference.text
    assert sent_ids + [t for o in rest for t in o.new_token_ids] == reference.token_ids
    assert rest[-1].finish_reason == "stop"

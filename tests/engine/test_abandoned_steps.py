"""A step whose every request is being aborted is given up between layers (a client that left does not keep a long
prompt's chunk running to its end); a step with one live request runs whole; a given-up step leaves nothing that
would change a later answer."""

from __future__ import annotations

import random

import pytest

from tests.helpers import assert_no_leaks

from splitserve import SamplingParams

pytestmark = pytest.mark.engine


def prompt_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 4096) for _ in range(n)]


GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture
def llm(tiny_model, make_llm):
    # a 96-token budget: a 200-token prompt is prefilled in three chunks
    return make_llm(tiny_model, max_model_len=256, max_num_batched_tokens=96)


@pytest.fixture
def reference(tiny_model, make_llm):
    """Greedy answers from an engine of its own (no prefix cache shared with the engine under test)."""
    ref = make_llm(tiny_model, max_model_len=256, enable_prefix_caching=False)
    return lambda prompt: list(ref.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids)


def run_to_end(engine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.req_id, []).extend(out.new_token_ids)
    return tokens


def test_a_step_is_given_up_at_the_layer_after_its_only_request_is_marked(llm):
    engine = llm.engine
    engine.add_request(prompt_ids(200, 1), GREEDY, "gone")
    asked = []

    def interrupt():  # the abort is marked while the step runs, after its first layer
        asked.append(1)
        if len(asked) == 2:
            engine.stop_soon("gone")
        return real()

    real, engine.runner.interrupt = engine.runner.interrupt, interrupt
    assert engine.model_config.num_layers == 2
    assert engine.step() == []
    assert len(asked) == 2 and engine.num_abandoned_steps == 1  # layer 0 ran, layer 1 (of 2) did not
    assert engine.abort_request("gone")
    assert not engine.has_unfinished_requests()
    assert_no_leaks(engine)


def test_a_step_with_a_live_request_runs_whole_and_its_answer_is_unchanged(llm, reference):
    engine = llm.engine
    live, gone = prompt_ids(40, 2), prompt_ids(40, 3)  # both fit the step's budget
    expected = reference(live)
    engine.add_request(gone, GREEDY, "gone")
    engine.add_request(live, GREEDY, "live")
    engine.stop_soon("gone")
    outputs = engine.step()
    assert engine.num_abandoned_steps == 0
    engine.abort_request("gone")
    tokens = run_to_end(engine)
    assert [t for o in outputs if o.req_id == "live" for t in o.new_token_ids] + tokens.get("live", []) == expected


def test_a_given_up_step_changes_no_later_answer(llm, reference):
    """Were the abort never to come, the request computes the given-up chunk again: its KV rows past its computed
    tokens were never hashed into the prefix cache, so neither it nor a request sharing its prefix reads them."""
    engine = llm.engine
    prompt = prompt_ids(200, 4)
    engine.add_request(prompt, GREEDY, "again")
    assert engine.step() == []  # the first chunk runs (nothing sampled yet)
    engine.stop_soon("again")
    assert engine.step() == [] and engine.num_abandoned_steps == 1  # the second is given up
    engine._stopping.clear()  # the abort never came
    assert run_to_end(engine)["again"] == reference(prompt)
    # and the prompt's cached prefix serves a new request the same answer
    assert list(llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == reference(prompt)

"""What the in-process ingress tests share: prompts, the module-scoped workers, a Stack per mode, body and SSE helpers."""

from __future__ import annotations

import json
import random

import pytest

from tests.splitserve.conftest import Stack, make_decode, make_prefill, stop_workers

MAX_TOKENS = 24
_rng = random.Random(1234)
# lengths around the 16-token block: short, one block + 1, exactly two blocks, several blocks
PROMPTS = [[_rng.randrange(5, 4000) for _ in range(n)] for n in (5, 17, 32, 45)]
MODES = ["disaggregated", "aggregated"]
CHAT = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def workers(aio, tiny_model):
    made = {
        "prefill": make_prefill(tiny_model, "prefill-0"),
        "decode": make_decode(tiny_model, "decode-0"),
        "both": make_decode(tiny_model, "worker-0", role="both"),
    }
    yield made
    aio.run(stop_workers(made.values()))


def stack_for(workers, model: str, mode: str, **cfg) -> Stack:
    if mode == "disaggregated":
        return Stack(model, [workers["prefill"]], [workers["decode"]], **cfg)
    return Stack(model, [], [workers["both"]], **cfg)


def completion_body(prompt, max_tokens=MAX_TOKENS, **kw) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **kw}


def parse_sse(text: str) -> list:
    """``data: {...}`` events then ``data: [DONE]``; anything else fails the test."""
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text.split("\n\n")[:-1]:
        lines = block.split("\n")
        assert all(line.startswith("data: ") for line in lines), block
        payload = "\n".join(line[len("data: "):] for line in lines)
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events and events[-1] == "[DONE]", events[-3:]
    assert "[DONE]" not in events[:-1]
    return events[:-1]


def blocks_of(n: int, block_size: int = 16) -> int:
    return -(-n // block_size)

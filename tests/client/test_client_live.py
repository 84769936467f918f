"""The client against the real splitserve server (in-process, real HTTP): tokens, timings, batches, errors.

The offline ``LLM`` on the same checkpoint is the oracle: greedy token ids with
EOS ignored must match exactly, streamed or not, one request or a batch.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from splitserve import AsyncClient, Client
from splitserve.client import AIMDController, AuthenticationFailed, BadRequest, Completion, Request
from tests.client.conftest import API_KEY, SERVED_NAME, greedy_ids

pytestmark = pytest.mark.engine

MAX_TOKENS = 12
_rng = random.Random(7)
PROMPTS = [[_rng.randrange(5, 4000) for _ in range(n)] for n in (3, 17, 40)]
CHAT = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Tell me about the sea."}]
GREEDY = {"temperature": 0, "ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def client(live_server):
    with Client(live_server.url + "/v1", api_key=API_KEY, timeout=120) as c:
        yield c


def check_timings(result: Completion, num_tokens: int, streamed: bool) -> None:
    t = result.timings
    assert t.total_s > 0 and t.queue_s >= 0 and t.num_attempts == 1
    if not streamed:
        assert t.ttft_s is None and t.itl_s == []
        return
    assert 0 < t.ttft_s <= t.total_s
    assert len(t.itl_s) == num_tokens - 1 and all(g >= 0 for g in t.itl_s)
    assert t.ttft_s + sum(t.itl_s) <= t.total_s + 1e-6
    assert t.median_itl_s is not None and t.e2e_s >= t.total_s


def test_models_lists_the_served_name(client):
    assert SERVED_NAME in client.models()


def test_complete_matches_offline_greedy(client, offline_llm):
    expected = greedy_ids(offline_llm, [PROMPTS[1]], MAX_TOKENS)[0]
    out = client.complete(PROMPTS[1], max_tokens=MAX_TOKENS, **GREEDY)
    assert out.token_ids == expected
    assert out.prompt_token_ids == PROMPTS[1]
    assert out.finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(PROMPTS[1]), MAX_TOKENS)
    assert out.text and out.model == SERVED_NAME
    check_timings(out, MAX_TOKENS, streamed=False)


def test_stream_matches_offline_greedy(client, offline_llm):
    expected = greedy_ids(offline_llm, [PROMPTS[2]], MAX_TOKENS)[0]
    stream = client.stream(PROMPTS[2], max_tokens=MAX_TOKENS, **GREEDY)
    chunks = list(stream)
    assert [t for c in chunks for t in c.token_ids] == expected
    assert chunks[-1].finish_reason == "length"
    out = stream.completion
    assert out.token_ids == expected and out.text == "".join(c.text for c in chunks)
    assert out.usage.completion_tokens == MAX_TOKENS
    check_timings(out, MAX_TOKENS, streamed=True)
    # without return_token_ids (a plain OpenAI request) the text is the same
    plain = client.stream(PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True).collect()
    assert plain.text == out.text and plain.token_ids is None and plain.timings.ttft_s > 0


def test_chat_streamed_and_not_match_offline_greedy(client, offline_llm):
    whole = client.chat(CHAT, max_tokens=MAX_TOKENS, **GREEDY)
    assert whole.prompt_token_ids, "return_token_ids gives the templated prompt"
    expected = greedy_ids(offline_llm, [whole.prompt_token_ids], MAX_TOKENS)[0]
    assert whole.token_ids == expected
    stream = client.stream_chat(CHAT, max_tokens=MAX_TOKENS, **GREEDY)
    pieces = [c.text for c in stream]
    assert stream.completion.token_ids == expected
    assert "".join(pieces) == whole.text == stream.completion.text
    check_timings(stream.completion, MAX_TOKENS, streamed=True)


class RecordingController(AIMDController):
    """Remembers the most requests it ever let into flight."""

    max_seen = 0

    def on_start(self, now):
        ticket = super().on_start(now)
        self.max_seen = max(self.max_seen, self.in_flight)
        return ticket


def test_batch_of_40_in_order_with_progress_bar(client, offline_llm, capfd):
    rng = random.Random(11)
    prompts = [[rng.randrange(5, 4000) for _ in range(rng.randrange(2, 30))] for _ in range(40)]
    max_tokens = 6
    expected = greedy_ids(offline_llm, prompts, max_tokens)
    ctrl = RecordingController(4)
    results = client.batch(prompts, concurrency=4, progress=True, controller=ctrl, max_tokens=max_tokens,
                           tenant="team-a", priority=1, **GREEDY)
    assert [r.token_ids for r in results] == expected  # every result, in input order
    assert all(isinstance(r, Completion) and r.timings.num_attempts == 1 for r in results)
    for r in results:
        check_timings(r, max_tokens, streamed=True)
    assert 1 < ctrl.max_seen <= 4 and ctrl.in_flight == 0
    err = capfd.readouterr().err
    assert "40/40" in err, err[-500:]


def test_batch_chat_mixes_requests(client):
    reqs = [Request(messages=CHAT, max_tokens=4, tenant="t1"), Request(PROMPTS[0], max_tokens=5), Request(messages=CHAT[1:])]
    results = client.run_batch(reqs, concurrency=2, defaults={"max_tokens": 3, "temperature": 0, "ignore_eos": True})
    assert [r.usage.completion_tokens for r in results] == [4, 5, 3]


def test_bad_request_carries_the_servers_message(client):
    with pytest.raises(BadRequest) as e:
        client.complete("hello", n=2)
    assert e.value.status == 400 and "n=2" in e.value.message and "not supported" in e.value.message
    with pytest.raises(BadRequest, match="maximum context length"):
        client.complete("hello", max_tokens=10**6)
    with pytest.raises(BadRequest) as e:  # the same through a stream: before any chunk
        list(client.stream("hello", temperature=-1))
    assert e.value.param == "temperature"
    # in a batch: that item gets its error, the others their answers
    results = client.batch(["ok", Request("bad", top_p=5), "fine"], max_tokens=2)
    assert isinstance(results[1], BadRequest) and "top_p" in results[1].message
    assert all(isinstance(r, Completion) for r in (results[0], results[2]))


def test_wrong_or_missing_api_key(live_server):
    for key in ("wrong", ""):
        with Client(live_server.url, api_key=key) as c, pytest.raises(AuthenticationFailed) as e:
            c.complete("hello", max_tokens=2)
        assert e.value.status == 401 and "API key" in e.value.message


def test_async_client_streams_and_batches(live_server):
    async def main():
        async with AsyncClient(live_server.url, api_key=API_KEY) as c:
            stream = c.stream(PROMPTS[0], max_tokens=5, **GREEDY)
            ids = [t async for chunk in stream for t in chunk.token_ids]
            batch = await c.batch([PROMPTS[0]] * 3, concurrency=2, max_tokens=5, **GREEDY)
            # leaving a stream early closes the connection at once, and the server aborts the request
            early = c.stream(PROMPTS[1], max_tokens=3000, **GREEDY)
            async with early:
                await early.__anext__()
            return ids, [r.token_ids for r in batch]

    ids, batch_ids = asyncio.run(main())
    assert len(ids) == 5 and batch_ids == [ids] * 3
    engine = live_server.worker.engine
    deadline = time.monotonic() + 5  # 3000 tokens would take far longer than this
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.has_unfinished_requests(), "the abandoned stream's request is still running"

"""The OpenAI HTTP ingress over real in-process workers (no Ray): tokens, SSE, errors, auth, metrics.

Every test talks to ``build_http_app(IngressCore(...))`` through httpx's ASGI
transport; the workers are real ``PrefillWorker`` / ``DecodeWorker`` objects on
the tiny checkpoint, their KV moving over real NIXL agents in this process. The
offline ``LLM`` is the oracle for token ids and text. After each test every
worker must hold no KV block, reservation or NIXL request (``Stack.__aexit__``).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.splitserve.ingress_helpers import (  # noqa: F401 - workers is a fixture
    CHAT, MAX_TOKENS, MODES, PROMPTS, blocks_of, completion_body, parse_sse, stack_for, workers,
)


pytestmark = pytest.mark.engine



# ---- correctness against the offline engine ------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_completion_token_ids_match_offline_llm(aio, workers, tiny_model, reference, mode):
    P, D, A = workers["prefill"], workers["decode"], workers["both"]
    p_before = (P.num_requests, P.transfer_bytes)
    a_before = A.num_requests

    async def body():
        async with stack_for(workers, tiny_model, mode) as s, s.client() as c:
            for prompt in PROMPTS:
                r = await c.post("/v1/completions", json=completion_body(prompt, return_token_ids=True))
                assert r.status_code == 200, r.text
                out = r.json()
                choice = out["choices"][0]
                assert choice["token_ids"] == reference.tokens(prompt, MAX_TOKENS)
                assert choice["text"] == reference.text(prompt, MAX_TOKENS)
                assert choice["finish_reason"] == "length"
                assert out["prompt_token_ids"] == prompt
                assert out["object"] == "text_completion" and out["model"] == s.core.served_name
                assert out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": MAX_TOKENS, "total_tokens": len(prompt) + MAX_TOKENS}

    aio.run(body())
    if mode == "disaggregated":  # really prefilled on P and moved over NIXL, block for block
        assert P.num_requests - p_before[0] == len(PROMPTS)
        expected = sum(blocks_of(len(p)) for p in PROMPTS) * P.agent.layout.bytes_per_block
        assert P.transfer_bytes - p_before[1] == expected
        assert A.num_requests == a_before
    else:
        assert A.num_requests - a_before == len(PROMPTS)
        assert P.num_requests == p_before[0]


def test_text_prompt_is_tokenized_like_the_offline_engine(aio, workers, tiny_model, reference):
    text = "The quick brown fox jumps over the lazy dog"

    async def body():
        async with stack_for(workers, tiny_model, "disaggregated") as s, s.client() as c:
            ids = list(s.core.tokenizer.encode(text))
            r = await c.post("/v1/completions", json=completion_body(text, return_token_ids=True))
            assert r.status_code == 200, r.text
            assert r.json()["prompt_token_ids"] == ids
            assert r.json()["choices"][0]["token_ids"] == reference.tokens(ids, MAX_TOKENS)
            assert r.json()["choices"][0]["text"] == reference.text(ids, MAX_TOKENS)

    aio.run(body())


@pytest.mark.parametrize("mode", MODES)
def test_streaming_matches_non_streaming(aio, workers, tiny_model, reference, mode):
    # a partial last block: whole-block mix-ups in the transfer would not change decoding otherwise
    # (RoPE is applied before caching, so attention over fully visible blocks ignores their order)
    prompt = PROMPTS[3]

    async def body():
        async with stack_for(workers, tiny_model, mode) as s, s.client() as c:
            whole = await c.post("/v1/completions", json=completion_body(prompt))
            assert whole.status_code == 200, whole.text
            r = await c.post("/v1/completions", json=completion_body(
                prompt, stream=True, return_token_ids=True, stream_options={"include_usage": True}))
            assert r.status_code == 200, r.text
            assert r.headers["content-type"].startswith("text/event-stream")
            events = parse_sse(r.text)
            *content, usage = events
            assert len(content) >= 2
            assert len({e["id"] for e in events}) == 1 and all(e["object"] == "text_completion" for e in events)
            assert [e["choices"][0]["finish_reason"] for e in content] == [None] * (len(content) - 1) + ["length"]
            text = "".join(e["choices"][0]["text"] for e in content)
            assert text == whole.json()["choices"][0]["text"] == reference.text(prompt, MAX_TOKENS)
            assert [t for e in content for t in e["choices"][0]["token_ids"]] == reference.tokens(prompt, MAX_TOKENS)
            assert usage["choices"] == []
            assert usage["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": MAX_TOKENS, "total_tokens": len(prompt) + MAX_TOKENS}

            # without include_usage: no usage chunk, the last event carries the finish reason
            r = await c.post("/v1/completions", json=completion_body(prompt, stream=True))
            events = parse_sse(r.text)
            assert all("usage" not in e for e in events)
            assert events[-1]["choices"][0]["finish_reason"] == "length"
            assert "".join(e["choices"][0]["text"] for e in events) == text

    aio.run(body())


@pytest.mark.parametrize("mode", MODES)
def test_chat_completions(aio, workers, tiny_model, reference, mode):
    async def body():
        async with stack_for(workers, tiny_model, mode) as s, s.client() as c:
            tok = s.core.tokenizer
            ids = tok.encode(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False), add_special_tokens=False)
            req = {"messages": CHAT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            r = await c.post("/v1/chat/completions", json=req)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["object"] == "chat.completion"
            msg = out["choices"][0]["message"]
            assert msg["role"] == "assistant" and msg["content"] == reference.text(ids, 12)
            assert out["choices"][0]["finish_reason"] == "length"
            assert out["usage"]["prompt_tokens"] == len(ids) and out["usage"]["completion_tokens"] == 12

            r = await c.post("/v1/chat/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}})
            assert r.status_code == 200, r.text
            *chunks, usage = parse_sse(r.text)
            assert all(e["object"] == "chat.completion.chunk" for e in chunks + [usage])
            first, *rest = chunks
            assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert first["choices"][0]["finish_reason"] is None
            assert all("role" not in e["choices"][0]["delta"] for e in rest)
            assert [e["choices"][0]["finish_reason"] for e in rest] == [None] * (len(rest) - 1) + ["length"]
            assert "".join(e["choices"][0]["delta"].get("content", "") for e in rest) == msg["content"]
            assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == len(ids) and usage["usage"]["completion_tokens"] == 12

    aio.run(body())


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_requests_each_get_their_own_tokens(aio, workers, tiny_model, reference, mode):
    async def body():
        async with stack_for(workers, tiny_model, mode) as s, s.client() as c:
            async def one(prompt, stream):
                r = await c.post("/v1/completions", json=completion_body(prompt, return_token_ids=True, stream=stream))
                assert r.status_code == 200, r.text
                if stream:
                    return [t for e in parse_sse(r.text) for t in e["choices"][0]["token_ids"]]
                return r.json()["choices"][0]["token_ids"]

            jobs = [one(p, stream=i % 2 == 1) for i, p in enumerate(PROMPTS + PROMPTS[:2])]
            results = await asyncio.gather(*jobs)
            for prompt, got in zip(PROMPTS + PROMPTS[:2], results):
                assert got == reference.tokens(prompt, MAX_TOKENS)

    aio.run(body())


# ---- bad input: 4xx with OpenAI's error body, and the server keeps serving ------------------

LONG = list(range(5, 205))  # 200 tokens > max_model_len 128


async def _chunked(data: bytes):
    for i in range(0, len(data), 512):
        yield data[i : i + 512]


BAD = {
    # id: (path, httpx kwargs, status, param, words the message must contain)
    "malformed_json": ("/v1/completions", {"content": b'{"prompt": [1, 2', "headers": {"content-type": "application/json"}}, 400, None, "not valid JSON"),
    "not_utf8": ("/v1/completions", {"content": b"\xff\xfe{}", "headers": {"content-type": "application/json"}}, 400, None, "not valid JSON"),
    "json_array": ("/v1/completions", {"json": [{"prompt": [1, 2, 3]}]}, 400, None, "JSON object"),
    "json_string": ("/v1/chat/completions", {"json": "hello"}, 400, None, "JSON object"),
    "missing_prompt": ("/v1/completions", {"json": {"max_tokens": 4}}, 400, "prompt", "prompt"),
    "missing_messages": ("/v1/chat/completions", {"json": {"max_tokens": 4}}, 400, "messages", "messages"),
    "empty_messages": ("/v1/chat/completions", {"json": {"messages": []}}, 400, "messages", "messages"),
    "empty_prompt_ids": ("/v1/completions", {"json": {"prompt": []}}, 400, "prompt", "prompt"),
    "max_tokens_0": ("/v1/completions", {"json": {"prompt": [1, 2, 3], "max_tokens": 0}}, 400, "max_tokens", "max_tokens"),
    "temperature_negative": ("/v1/completions", {"json": {"prompt": [1, 2, 3], "temperature": -1}}, 400, "temperature", "temperature"),
    "top_p_over_1": ("/v1/chat/completions", {"json": {"messages": CHAT, "top_p": 1.5}}, 400, "top_p", "top_p"),
    "n_2": ("/v1/completions", {"json": {"prompt": [1, 2, 3], "n": 2}}, 400, "n", "n=2 is not supported"),
    "max_tokens_wrong_type": ("/v1/completions", {"json": {"prompt": [1, 2, 3], "max_tokens": "ten"}}, 400, "max_tokens", "max_tokens"),
    "prompt_over_context": ("/v1/completions", {"json": {"prompt": LONG, "max_tokens": 1}}, 400, "prompt", "maximum context length is 128"),
    "chat_over_context": ("/v1/chat/completions", {"json": {"messages": [{"role": "user", "content": "word " * 300}]}}, 400, "messages", "maximum context length is 128"),
    "prompt_plus_max_tokens": ("/v1/completions", {"json": {"prompt": LONG[:100], "max_tokens": 50}}, 400, "max_tokens", "150"),
    "token_outside_vocab": ("/v1/completions", {"json": {"prompt": [1, 4096, 2]}}, 400, "prompt", "[0, 4095]"),
    "negative_token": ("/v1/completions", {"json": {"prompt": [1, -3, 2]}}, 400, "prompt", ">= 0"),
    "stop_token_outside_vocab": ("/v1/completions", {"json": {"prompt": [1, 2], "stop_token_ids": [99999]}}, 400, "stop_token_ids", "stop_token_ids"),
    "unknown_model": ("/v1/completions", {"json": {"model": "gpt-17", "prompt": [1, 2, 3]}}, 404, "model", "gpt-17"),
    "body_over_limit": ("/v1/completions", {"json": {"prompt": "hello " * 600}}, 413, None, "2048"),
    "chunked_body_over_limit": ("/v1/completions", {"content": _chunked, "headers": {"content-type": "application/json"}}, 413, None, "2048"),
    "batched_token_prompts": ("/v1/completions", {"json": {"prompt": [[1, 2], [3, 4]]}}, 400, "prompt", "batched prompts"),
    "batched_text_prompts": ("/v1/completions", {"json": {"prompt": ["a", "b", "c"]}}, 400, "prompt", "batched prompts"),
    "unsupported_role_in_template": ("/v1/chat/completions", {"json": {"messages": [{"role": "tool", "content": "x"}]}}, 400, "messages", "chat template"),
    "stream_options_without_stream": ("/v1/completions", {"json": {"prompt": [1, 2], "stream_options": {"include_usage": True}}}, 400, None, "stream_options"),
    "logprobs_unsupported": ("/v1/completions", {"json": {"prompt": [1, 2], "logprobs": 1}}, 400, "logprobs", "not supported"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_openai_error_and_server_keeps_serving(aio, workers, tiny_model, reference, case):
    path, kwargs, status, param, words = BAD[case]
    kwargs = dict(kwargs)
    if kwargs.get("content") is _chunked:
        kwargs["content"] = _chunked(json.dumps({"prompt": "hello " * 600}).encode())
    P, D = workers["prefill"], workers["decode"]
    served_before = (P.num_requests, D.num_requests)

    async def body():
        cfg = {"engine": {"max_model_len": 128}, "http": {"max_request_bytes": 2048}}
        async with stack_for(workers, tiny_model, "disaggregated", **cfg) as s, s.client() as c:
            r = await c.post(path, **kwargs)
            assert r.status_code == status, r.text
            assert r.headers["content-type"].startswith("application/json")
            out = r.json()
            assert set(out) == {"error"} and set(out["error"]) == {"message", "type", "param", "code"}, out
            err = out["error"]
            assert words in err["message"], err
            assert err["param"] == param, err
            assert err["type"] == ("NotFoundError" if status == 404 else "invalid_request_error"), err
            assert err["code"] in (status, str(status)), err
            assert (P.num_requests, D.num_requests) == served_before, "a rejected request reached a worker"
            # the server still serves
            ok = await c.post("/v1/completions", json=completion_body(PROMPTS[0], max_tokens=4, return_token_ids=True))
            assert ok.status_code == 200, ok.text
            assert ok.json()["choices"][0]["token_ids"] == reference.tokens(PROMPTS[0], 4)

    aio.run(body())


# ---- auth, models, health --------------------------------------------------------------------


def test_api_key_guards_everything_but_health(aio, workers, tiny_model):
    async def body():
        async with stack_for(workers, tiny_model, "disaggregated", http={"api_key": "secret"}) as s, s.client() as c:
            req = completion_body(PROMPTS[0], max_tokens=3)
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "secret"}, {"authorization": "Bearer secret2"}):
                r = await c.post("/v1/completions", json=req, headers=headers)
                assert r.status_code == 401, (headers, r.text)
                assert r.json()["error"]["type"] == "AuthenticationError" and "API key" in r.json()["error"]["message"]
            for path in ("/v1/models", "/admin/workers", "/admin/requests", "/metrics", "/docs", "/openapi.json", "/redoc"):
                assert (await c.get(path)).status_code == 401, path  # tenant names and the API's shape are the operator's
            # an unauthenticated bad body is refused for the key, not parsed
            r = await c.post("/v1/completions", content=b"{not json")
            assert r.status_code == 401
            good = {"authorization": "Bearer secret"}
            r = await c.post("/v1/completions", json=req, headers=good)
            assert r.status_code == 200, r.text
            assert (await c.get("/v1/models", headers=good)).status_code == 200
            assert (await c.get("/admin/workers", headers=good)).status_code == 200
            assert (await c.get("/admin/requests", headers=good)).json() == {"num_in_flight": 0, "requests": []}
            assert (await c.get("/admin/requests?limit=-1", headers=good)).status_code == 400
            assert (await c.get("/health")).status_code == 200
            for path in ("/metrics", "/docs", "/openapi.json"):
                assert (await c.get(path, headers=good)).status_code == 200, path

        # http.public_metrics: a Prometheus without credentials may scrape; the rest stays closed
        async with stack_for(workers, tiny_model, "disaggregated", http={"api_key": "secret", "public_metrics": True}) as s, s.client() as c:
            assert (await c.get("/metrics")).status_code == 200
            assert (await c.get("/openapi.json")).status_code == 401

    aio.run(body())


def test_models_lists_only_the_served_name_and_accepts_the_path_too(aio, workers, tiny_model):
    async def body():
        async with stack_for(workers, tiny_model, "disaggregated", http={"served_model_name": "tiny-llama"}) as s, s.client() as c:
            r = await c.get("/v1/models")
            assert r.status_code == 200
            out = r.json()
            assert out["object"] == "list"
            assert [m["id"] for m in out["data"]] == ["tiny-llama"]  # no filesystem path in a response
            assert all(m["object"] == "model" for m in out["data"])
            for name in ("tiny-llama", tiny_model, None):
                req = completion_body(PROMPTS[0], max_tokens=2)
                if name is not None:
                    req["model"] = name
                r = await c.post("/v1/completions", json=req)
                assert r.status_code == 200, r.text
                assert r.json()["model"] == (name or "tiny-llama")
                r = await c.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 2, **({"model": name} if name else {})})
                assert r.status_code == 200, r.text
            r = await c.post("/v1/completions", json={**completion_body(PROMPTS[0], max_tokens=2), "model": "llama-other"})
            assert r.status_code == 404 and "tiny-llama" in r.json()["error"]["message"]

        # without served_model_name: the checkpoint folder's name
        async with stack_for(workers, tiny_model, "disaggregated") as s, s.client() as c:
            names = [m["id"] for m in (await c.get("/v1/models")).json()["data"]]
            assert names == [tiny_model.rstrip("/").split("/")[-1]]

    aio.run(body())


@pytest.mark.parametrize("mode", MODES)
def test_health_reports_the_workers(aio, workers, tiny_model, mode):
    async def body():
        async with stack_for(workers, tiny_model, mode) as s, s.client() as c:
            r = await c.get("/health")
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["status"] == "ok"
            if mode == "disaggregated":
                assert out == {"status": "ok", "healthy_decode": ["decode-0"], "healthy_prefill": ["prefill-0"]}
            else:
                assert out == {"status": "ok", "healthy_decode": ["worker-0"], "healthy_prefill": []}
            s.handles[next(iter(s.decode_workers))].kill()
            if mode == "disaggregated":  # the prefill worker stands in for the dead decode worker (degraded mode)
                deadline = time.monotonic() + 5
                while (r := await c.get("/health")).json()["status"] == "ok" and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                assert r.status_code == 200 and r.json()["status"] == "degraded", r.text
                assert "no healthy decode worker" in r.json()["detail"] and r.json()["healthy_decode"] == []
                s.handles["prefill-0"].kill()
            deadline = time.monotonic() + 5
            while (r := await c.get("/health")).status_code == 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert r.status_code == 503 and r.json()["status"] == "unavailable" and r.json()["healthy_decode"] == []
            # nothing can serve now: back-pressure, not a hang
            r = await c.post("/v1/completions", json=completion_body(PROMPTS[0], max_tokens=2))
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 1

    aio.run(body())

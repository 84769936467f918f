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
import random
import time

import pytest

from tests.splitserve.conftest import Stack, make_decode, make_prefill, metric_value, stop_workers

pytestmark = pytest.mark.engine

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
            for path in ("/v1/models", "/admin/workers", "/metrics", "/docs", "/openapi.json", "/redoc"):
                assert (await c.get(path)).status_code == 401, path  # tenant names and the API's shape are the operator's
            # an unauthenticated bad body is refused for the key, not parsed
            r = await c.post("/v1/completions", content=b"{not json")
            assert r.status_code == 401
            good = {"authorization": "Bearer secret"}
            r = await c.post("/v1/completions", json=req, headers=good)
            assert r.status_code == 200, r.text
            assert (await c.get("/v1/models", headers=good)).status_code == 200
            assert (await c.get("/admin/workers", headers=good)).status_code == 200
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


# ---- observability ---------------------------------------------------------------------------


async def _wait_reports_idle(s: Stack, timeout_s: float = 5.0) -> dict:
    """/admin/workers once every report shows all blocks free and nothing queued (bounded)."""
    deadline = time.monotonic() + timeout_s
    async with s.client() as c:
        while True:
            out = (await c.get("/admin/workers")).json()
            reps = out["workers"]
            idle = all(w["num_free_blocks"] == w["num_total_blocks"] and w["num_blocks_in_flight"] == 0
                       and w["num_waiting"] == 0 and w["num_running"] == 0 for w in reps)
            if idle or time.monotonic() > deadline:
                return out
            await asyncio.sleep(0.05)


def test_metrics_and_admin_workers_after_requests(aio, workers, tiny_model):
    P = workers["prefill"]
    prompts = PROMPTS[:3]

    async def body():
        # earlier tests left these prompts in the caches; a fully cached one would now (rightly) be
        # prefilled on the decode worker and move no KV, so start cold to count every transfer
        for w in workers.values():
            await w.reset_prefix_cache()
        async with stack_for(workers, tiny_model, "disaggregated") as s, s.client() as c:
            bytes_before = P.transfer_bytes
            r = await c.post("/v1/completions", json=completion_body(prompts[0]))
            assert r.status_code == 200
            r = await c.post("/v1/completions", json=completion_body(prompts[1], stream=True))
            assert r.status_code == 200 and parse_sse(r.text)
            r = await c.post("/v1/completions", json=completion_body(prompts[2], tenant="acme"))
            assert r.status_code == 200
            r = await c.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 0})
            assert r.status_code == 400

            admin = await _wait_reports_idle(s)
            reps = {w["worker_id"]: w for w in admin["workers"]}
            assert set(reps) == {"prefill-0", "decode-0"}
            for w in reps.values():
                assert w["healthy"] is True
                assert w["num_free_blocks"] == w["num_total_blocks"] == 256, w
                assert w["num_blocks_in_flight"] == 0 and w["num_running"] == 0 and w["num_waiting"] == 0, w
                assert w["share"] == {"in_flight": 1.0, "requests": 1.0}, w  # the only worker of its role
            assert admin["imbalance"] == {"prefill": {"in_flight": 1.0, "requests": 1.0}, "decode": {"in_flight": 1.0, "requests": 1.0}}

            text = (await c.get("/metrics")).text
            assert metric_value(text, "splitserve_worker_imbalance", role="decode", measure="requests") == 1.0
            for name in ("splitserve_time_to_first_token_seconds", "splitserve_inter_token_latency_seconds",
                         "splitserve_kv_transfer_bytes_total", "splitserve_requests_total", "splitserve_kv_blocks_used",
                         "splitserve_queue_depth"):
                assert name in text, name
            assert metric_value(text, "splitserve_time_to_first_token_seconds_count", mode="disaggregated") == 3
            itl = metric_value(text, "splitserve_inter_token_latency_seconds_count", mode="disaggregated")
            assert 3 <= itl <= 3 * (MAX_TOKENS - 1)
            moved = sum(blocks_of(len(p)) for p in prompts) * P.agent.layout.bytes_per_block
            assert P.transfer_bytes - bytes_before == moved
            assert metric_value(text, "splitserve_kv_transfer_bytes_total") == moved > 0
            assert metric_value(text, "splitserve_kv_transfer_seconds_count") == 3
            assert metric_value(text, "splitserve_requests_total", status="ok", tenant="default") == 2
            assert metric_value(text, "splitserve_requests_total", status="ok", tenant="acme") == 1
            assert metric_value(text, "splitserve_generation_tokens_total", tenant="default") == 2 * MAX_TOKENS
            assert metric_value(text, "splitserve_prompt_tokens_total", tenant="acme") == len(prompts[2])
            for wid, role in (("prefill-0", "prefill"), ("decode-0", "decode")):
                assert metric_value(text, "splitserve_kv_blocks_used", worker=wid) == 0
                assert metric_value(text, "splitserve_kv_blocks_total", worker=wid) == 256
                assert metric_value(text, "splitserve_queue_depth", role=role, worker=wid) == 0
                assert metric_value(text, "splitserve_worker_healthy", role=role, worker=wid) == 1
            assert metric_value(text, "splitserve_requests_routed_total", worker="prefill-0", role="prefill") == 3
            assert metric_value(text, "splitserve_requests_routed_total", worker="decode-0", role="decode") == 3

    aio.run(body())


# ---- a client that hangs up mid-stream ---------------------------------------------------------


async def _post_then_hang_up(app, path: str, body: dict, spec_version: str, after_events: int) -> list[bytes]:
    """Drive the ASGI app like a server would, and drop the connection after ``after_events`` SSE bodies.

    ASGI spec >= 2.4: the server's ``send`` raises ``OSError`` once the client is gone;
    before 2.4 the server's ``receive`` answers ``http.disconnect``. Starlette handles both.
    """
    raw = json.dumps(body).encode()
    gone = asyncio.Event()
    sent: list[bytes] = []
    received_request = False

    async def receive():
        nonlocal received_request
        if not received_request:
            received_request = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if gone.is_set():
            raise OSError("connection reset by peer")
        if message["type"] == "http.response.body" and message.get("body"):
            sent.append(message["body"])
            if len(sent) >= after_events:
                gone.set()

    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
        "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 50000), "server": ("test", 80),
        "headers": [(b"host", b"test"), (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
    }
    try:
        await app(scope, receive, send)
    except Exception:  # ClientDisconnect / OSError surface here, as they would to the server
        pass
    return sent


@pytest.mark.parametrize("spec_version", ["2.4", "2.3"])
def test_http_client_hanging_up_mid_stream_aborts_the_request(aio, workers, tiny_model, spec_version):
    D = workers["decode"]

    async def body():
        async with stack_for(workers, tiny_model, "disaggregated") as s:
            steps = D.aengine.num_steps
            req = completion_body(PROMPTS[3], max_tokens=2000, stream=True)
            sent = await _post_then_hang_up(s.app, "/v1/completions", req, spec_version, after_events=3)
            assert len(sent) >= 3 and all(b.startswith(b"data: {") for b in sent[:3])
            deadline = time.monotonic() + 5
            while D.engine.has_unfinished_requests() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert not D.engine.has_unfinished_requests(), "the request kept decoding after the client left"
            assert D.aengine.num_steps - steps < 500  # far from its 2000 tokens
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not metric_value(s.metrics_text(), "splitserve_requests_total", status="cancelled", tenant="default"):
                await asyncio.sleep(0.02)
            assert metric_value(s.metrics_text(), "splitserve_requests_total", status="cancelled", tenant="default") == 1

    aio.run(body())

"""End to end on a local Ray: the official ``openai`` client against every deployment shape.

Greedy output is token-identical across disaggregated 1P1D, 1P2D, aggregated and
the offline ``LLM``; 64 concurrent streams complete and leave every KV block
free; injected transfer failures and delays are retried without leaks; the processes on the
token path run at normal priority.
"""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import openai
import pytest

from splitserve import SamplingParams
from tests.e2e.conftest import wait_all_blocks_free

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPT_LENS = [1, 5, 16, 17, 100, 333, 1000, 2000]
MAX_TOKENS = 8
EXTRA = {"ignore_eos": True, "return_token_ids": True}


@pytest.fixture(scope="module")
def prompts(tiny_model) -> list[list[int]]:
    import json
    import os

    vocab = json.load(open(os.path.join(tiny_model, "config.json")))["vocab_size"]
    rng = random.Random(42)
    return [[rng.randrange(5, vocab) for _ in range(n)] for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def reference(tiny_model, prompts) -> list[list[int]]:
    from splitserve import LLM

    llm = LLM(tiny_model, dtype="float32", num_kv_blocks=512)
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True), use_tqdm=False)
    return [o.token_ids for o in outs]


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _stream_ids(client: openai.OpenAI, prompt: list[int]) -> tuple[list[int], str, str]:
    ids, text, finish = [], [], None
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True, extra_body=EXTRA)
    for chunk in stream:
        choice = chunk.choices[0]
        ids += choice.model_extra.get("token_ids") or []
        text.append(choice.text)
        finish = choice.finish_reason or finish
    return ids, "".join(text), finish


@pytest.mark.parametrize("app", ["d11", "d12", "agg"])  # 2 prefill workers: "faulty" (below) and tests/e2e/test_faults.py
def test_greedy_identical_across_modes(apps, app, prompts, reference):
    client = _client(apps[app])
    for prompt, ref in zip(prompts, reference):
        full = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body=EXTRA)
        assert full.choices[0].model_extra["token_ids"] == ref, f"{app}: prompt of {len(prompt)} tokens (non-streaming)"
        assert full.choices[0].finish_reason == "length"
        assert full.usage.prompt_tokens == len(prompt) and full.usage.completion_tokens == MAX_TOKENS
        ids, text, finish = _stream_ids(client, prompt)
        assert ids == ref, f"{app}: prompt of {len(prompt)} tokens (streaming)"
        assert text == full.choices[0].text and finish == "length"
    wait_all_blocks_free(apps[app])


def test_chat_same_text_in_every_mode(apps):
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What does disaggregated serving split?"}]
    texts = set()
    for app in ("d11", "d12", "agg"):
        client = _client(apps[app])
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True})
            if c.choices
        )
        assert streamed == r.choices[0].message.content
        texts.add(r.choices[0].message.content)
    assert len(texts) == 1 and texts.pop()


def test_64_concurrent_streams_complete_and_free_all_blocks(apps, prompts):
    url = apps["d12"]

    async def one(i: int, client: openai.AsyncOpenAI) -> int:
        prompt = prompts[i % 6]  # up to 333 tokens
        n = 0
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0, stream=True, extra_body=EXTRA)
        finish = None
        async for chunk in stream:
            n += len(chunk.choices[0].model_extra.get("token_ids") or [])
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "length"
        return n

    async def main() -> list[int]:
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(i, client) for i in range(64)))

    counts = asyncio.run(main())
    assert counts == [16] * 64
    # A report can show a worker idle before the last requests reached it (reports lag): wait for the count too.
    deadline = time.monotonic() + 30
    while True:
        reports = wait_all_blocks_free(url)
        served = sum(r["num_requests"] for r in reports if r["role"] == "decode")
        if served >= 64 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert served >= 64, reports
    metrics = httpx.get(f"{url}/metrics").text
    assert 'splitserve_requests_total{status="ok",tenant="default"}' in metrics


def test_injected_transfer_faults_are_retried_without_leaks(apps, prompts, reference):
    client = _client(apps["faulty"])
    for prompt, ref in list(zip(prompts, reference))[:6]:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body=EXTRA)
        assert r.choices[0].model_extra["token_ids"] == ref
    wait_all_blocks_free(apps["faulty"])
    metrics = httpx.get(f"{apps['faulty']}/metrics").text
    retried = [line for line in metrics.splitlines() if line.startswith("splitserve_request_retries_total")]
    assert retried and sum(float(line.rsplit(" ", 1)[1]) for line in retried) > 0, "faults were injected but nothing was retried"


def test_bad_requests_get_4xx_and_server_keeps_serving(apps, prompts, reference):
    url = apps["d11"]
    cases = [
        (b"{not json", 400),
        (b'{"model": "tiny"}', 400),
        (b'{"model": "tiny", "prompt": "hi", "max_tokens": -1}', 400),
        (b'{"model": "tiny", "prompt": "hi", "temperature": -0.5}', 400),
        (b'{"model": "nope", "prompt": "hi"}', 404),
        (b'{"model": "tiny", "prompt": [1, 2, 99999999]}', 400),
        (b'{"model": "tiny", "prompt": "' + b"word " * 5000 + b'"}', 400),
    ]
    for body, status in cases:
        r = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status, (body[:60], r.status_code, r.text[:200])
        err = r.json()["error"]
        assert err["message"] and err["type"]
    big = httpx.post(f"{url}/v1/completions", content=b"x" * (5 * 2**20), headers={"content-type": "application/json"}, timeout=30)
    assert big.status_code == 413
    r = _client(url).completions.create(model="tiny", prompt=prompts[3], max_tokens=MAX_TOKENS, temperature=0, extra_body=EXTRA)
    assert r.choices[0].model_extra["token_ids"] == reference[3]
    wait_all_blocks_free(url)


def test_the_token_path_runs_at_normal_priority_and_serves_housekeeping_below_it(apps):
    """Ray starts workers at nice 15; the engines and the ingress ask for 0 (else a client or any other process
    at 0 takes their cores first), while Serve's controller keeps Ray's low priority."""
    import os

    import ray

    from benchmarks.fault_drills import replica_pid

    workers = [w["worker_id"] for w in httpx.get(f"{apps['d11']}/admin/workers", timeout=5).json()["workers"]]
    assert sorted(w.split("-")[0] for w in workers) == ["decode", "prefill"]
    for name in [*workers, "Ingress"]:
        assert os.getpriority(os.PRIO_PROCESS, replica_pid("d11", name)) == 0, name
    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    controller_pid = ray.get(controller.__ray_call__.remote(lambda _self: os.getpid()), timeout=60)
    assert os.getpriority(os.PRIO_PROCESS, controller_pid) == 15


def test_engines_run_their_ops_on_llvm_openmp_where_installed(apps):
    """The engines' processes start with the LLVM OpenMP runtime preloaded (``engine.openmp``); the ingress does no
    tensor work and keeps its plain environment."""
    from benchmarks.fault_drills import replica_pid
    from splitserve.engine.openmp import llvm_openmp_library, llvm_openmp_loaded

    if llvm_openmp_library() is None:
        pytest.skip("no LLVM OpenMP runtime installed (the `cpu` extra)")
    workers = [w["worker_id"] for w in httpx.get(f"{apps['d11']}/admin/workers", timeout=5).json()["workers"]]
    assert len(workers) == 2
    for name in [*workers, "Ingress"]:
        assert llvm_openmp_loaded(f"/proc/{replica_pid('d11', name)}/maps") is (name != "Ingress"), name

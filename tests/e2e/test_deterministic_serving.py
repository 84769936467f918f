"""Deterministic mode served: 64 identical greedy requests amid 64 different ones all get the same
tokens, through 1P1D and aggregated, and those are the tokens the offline engine gives alone (bf16).
"""

from __future__ import annotations

import asyncio
import random

import openai
import pytest

from tests.e2e.conftest import wait_all_blocks_free, wait_healthy

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MAX_TOKENS = 24
EXTRA = {"ignore_eos": True, "return_token_ids": True}


async def _stream(client: openai.AsyncOpenAI, prompt: list[int]) -> list[int]:
    ids: list[int] = []
    stream = await client.completions.create(model="det", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True, extra_body=EXTRA)
    async for chunk in stream:
        ids += chunk.choices[0].model_extra.get("token_ids") or []
    return ids


def test_identical_requests_agree_amid_others(serve_port, tiny_model):
    from ray import serve

    from splitserve import LLM, SamplingParams
    from splitserve.app import build_app
    from splitserve.config import ServeConfig

    rng = random.Random(9)
    target = [rng.randrange(5, 4000) for _ in range(120)]
    others = [[rng.randrange(5, 4000) for _ in range(rng.choice([3, 30, 200, 400]))] for _ in range(64)]
    engine = {"model": tiny_model, "dtype": "bfloat16", "deterministic": True, "num_kv_blocks": 1200, "max_num_batched_tokens": 256}
    offline = LLM(**engine).generate([target], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    urls = {}
    for mode in ("disaggregated", "aggregated"):
        name = f"det-{mode[:3]}"
        cfg = ServeConfig.model_validate({
            "mode": mode, "num_prefill": 1 if mode == "disaggregated" else 0, "app_name": name, "engine": engine,
            "http": {"served_model_name": "det"}, "prefill_resources": {"num_cpus": 0.5}, "decode_resources": {"num_cpus": 0.5},
        })
        serve.run(build_app(cfg), name=name, route_prefix=f"/{name}", blocking=False)
        urls[name] = f"http://127.0.0.1:{serve_port}/{name}"
    try:
        for name, url in urls.items():
            wait_healthy(url)

            async def crowd() -> list[list[int]]:
                async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300) as client:
                    mixed = [target] * 64 + others
                    random.Random(3).shuffle(mixed)
                    results = await asyncio.gather(*(_stream(client, p) for p in mixed))
                    return [r for p, r in zip(mixed, results) if p is target]

            outputs = asyncio.run(crowd())
            assert len(outputs) == 64 and all(len(o) == MAX_TOKENS for o in outputs)
            distinct = {tuple(o) for o in outputs}
            assert distinct == {tuple(offline.token_ids)}, f"{name}: {len(distinct)} distinct outputs for one prompt"
            wait_all_blocks_free(url)
    finally:
        for name in urls:
            serve.delete(name)

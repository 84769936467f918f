"""Served greedy output equals transformers' ``generate`` on checkpoints transformers wrote itself,
and the real default model answers.

For Llama (llama3 rope), Qwen2 (qkv bias, tied, theta 1e6), Qwen3 (q/k norm, yarn)
and Mistral (GQA 8:1), prompts of 1 to 2,000 tokens through the official ``openai``
client, on a 1P1D app per architecture: the path whose KV transfer depends on the
architecture's KV shape. Llama and Qwen3 load the transformers 5 config spelling,
Qwen2 and Mistral the 4.x one. What is left out is covered elsewhere: the aggregated
path does not depend on the architecture (it is checked token for token against the
disaggregated ones in tests/e2e/test_serving.py), every architecture in both
spellings, all at once and chunked, is checked offline against transformers in
tests/engine/test_correctness.py, and the two spellings read into equal
``ModelConfig``s (``test_both_spellings_read_alike``). Each app is deleted before the
next one starts.
"""

from __future__ import annotations

import json
import os
import random

import openai
import pytest

from tests.e2e.conftest import wait_all_blocks_free, wait_healthy
from tests.helpers import hf_greedy

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPT_LENS = [1, 17, 300, 2000]
MAX_TOKENS = 6
EXTRA = {"ignore_eos": True, "return_token_ids": True}
PARIS_QUESTION = "What is the capital of France? Answer in one sentence."


def _deploy(serve_port: int, name: str, model: str, mode: str, **engine) -> str:
    from ray import serve

    from splitserve.app import build_app
    from splitserve.config import ServeConfig

    cfg = ServeConfig.model_validate({
        "mode": mode, "num_prefill": 1 if mode == "disaggregated" else 0, "num_decode": 1, "app_name": name,
        "engine": {"model": model, "num_kv_blocks": 400, "max_num_batched_tokens": 1024, **engine},
        "prefill_resources": {"num_cpus": 0.25}, "decode_resources": {"num_cpus": 0.25},
    })
    serve.run(build_app(cfg), name=name, route_prefix=f"/{name}", blocking=False)
    return f"http://127.0.0.1:{serve_port}/{name}"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_served_greedy_matches_transformers(serve_port, checkpoints, legacy_checkpoints, arch):
    from ray import serve

    reference = checkpoints[arch]
    vocab = json.load(open(os.path.join(reference, "config.json")))["vocab_size"]
    rng = random.Random(len(arch))
    prompts = [[rng.randrange(5, vocab) for _ in range(n)] for n in PROMPT_LENS]
    expected = [hf_greedy(reference, p, MAX_TOKENS) for p in prompts]
    spelling = "v5" if arch in ("llama", "qwen3") else "legacy"
    name = f"{arch}-{spelling}"
    url = _deploy(serve_port, name, reference if spelling == "v5" else legacy_checkpoints[arch], "disaggregated", dtype="float32")
    try:
        wait_healthy(url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        for prompt, ref in zip(prompts, expected):
            out = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body=EXTRA)
            assert out.choices[0].model_extra["token_ids"] == ref, f"{name}: prompt of {len(prompt)} tokens diverged"
        wait_all_blocks_free(url)
    finally:
        serve.delete(name)


def test_default_model_answers_through_1p1d(serve_port):
    """The real default (SmolLM2-135M-Instruct, bf16): served 1P1D greedy answer names Paris, as offline."""
    from ray import serve

    from splitserve import LLM, SamplingParams
    from splitserve.engine.default_model import DEFAULT_SERVED_NAME, default_model_path

    path = str(default_model_path())
    llm = LLM(num_kv_blocks=64)
    messages = [{"role": "user", "content": PARIS_QUESTION}]
    prompt_ids = llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    offline = llm.generate([prompt_ids], SamplingParams(max_tokens=32, temperature=0), use_tqdm=False)[0].text
    assert "Paris" in offline
    del llm

    from splitserve.app import build_app
    from splitserve.config import ServeConfig

    cfg = ServeConfig.model_validate({
        "app_name": "smol", "engine": {"num_kv_blocks": 128},
        "prefill_resources": {"num_cpus": 0.25}, "decode_resources": {"num_cpus": 0.25},
    })
    serve.run(build_app(cfg), name="smol", route_prefix="/smol", blocking=False)
    url = f"http://127.0.0.1:{serve_port}/smol"
    try:
        wait_healthy(url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [DEFAULT_SERVED_NAME]
        served = client.chat.completions.create(model=DEFAULT_SERVED_NAME, messages=messages, max_tokens=32, temperature=0)
        answer = served.choices[0].message.content
        assert "Paris" in answer and answer == offline, (answer, offline)
        assert served.choices[0].finish_reason == "stop"
        by_hub_id = client.chat.completions.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", messages=messages, max_tokens=8, temperature=0)
        assert answer.startswith(by_hub_id.choices[0].message.content)
        assert path not in str(client.models.list())
        wait_all_blocks_free(url)
    finally:
        serve.delete("smol")

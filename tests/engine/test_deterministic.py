"""Deterministic mode: a request's logits are the same bits whatever runs beside it.

The request of interest runs alone, then amid many others (arriving mid-run,
chunked prefill under a small token budget, a prefix-cache hit from an earlier
request, big mixed steps that would switch a bf16 model to float32 activations):
every step's logits for it must be bit-identical. Without the mode they are not,
which shows the test can fail. Greedy output still equals transformers' own.
"""

from __future__ import annotations

import random

import pytest
import torch

from splitserve import SamplingParams
from tests.helpers import assert_no_leaks, hf_greedy

pytestmark = pytest.mark.engine

TARGET_LEN, MAX_TOKENS = 300, 24
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def _record_logits(engine, req_id: str) -> list[torch.Tensor]:
    """Wrap the runner so every step's logits row for ``req_id`` is kept."""
    rows: list[torch.Tensor] = []
    execute = engine.runner.execute

    def recording(sched):
        logits = execute(sched)
        sampling = [c.seq.req_id for c in sched.chunks if c.samples]
        if req_id in sampling:
            rows.append(logits[sampling.index(req_id)].clone())
        return logits

    engine.runner.execute = recording
    return rows


def _target_logits(llm, prompt: list[int], others: list[list[int]], shared: list[int] | None) -> list[torch.Tensor]:
    engine = llm.engine
    if shared is not None:  # an earlier request leaves the target's leading blocks in the prefix cache
        llm.generate([shared + [7, 8, 9]], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), use_tqdm=False)
    rows = _record_logits(engine, "target")
    pending = list(others)
    for p in pending[: len(pending) // 2]:
        engine.add_request(p, GREEDY)
    engine.add_request(prompt, GREEDY, req_id="target")
    pending = pending[len(pending) // 2 :]
    while engine.has_unfinished_requests() or pending:
        if pending:
            engine.add_request(pending.pop(), GREEDY)  # arrivals while the target decodes
        engine.step()
    assert_no_leaks(engine)
    return rows


@pytest.mark.parametrize("arch,dtype", [("llama", "bfloat16"), ("qwen3", "float32"), ("qwen2", "bfloat16")])
def test_logits_do_not_depend_on_the_batch(checkpoints, make_llm, arch, dtype):
    path = checkpoints[arch]
    rng = random.Random(1)
    prompt = [rng.randrange(5, 4000) for _ in range(TARGET_LEN)]
    others = [[rng.randrange(5, 4000) for _ in range(rng.choice([1, 9, 40, 130, 333, 600]))] for _ in range(12)]

    def run(deterministic: bool, budget: int, crowd: list[list[int]], shared: list[int] | None) -> list[torch.Tensor]:
        llm = make_llm(path, dtype=dtype, deterministic=deterministic, max_num_batched_tokens=budget, num_kv_blocks=1024)
        return _target_logits(llm, prompt, crowd, shared)

    alone = run(True, 4096, [], None)
    assert len(alone) == MAX_TOKENS
    crowded = run(True, 160, others, prompt[:200])  # chunked, batched, arrivals, prefix-cache hit of 192 tokens
    assert all(torch.equal(a, b) for a, b in zip(alone, crowded)), "deterministic logits changed with the batch"
    plain_alone, plain_crowded = run(False, 4096, [], None), run(False, 160, others, prompt[:200])
    assert not all(torch.equal(a, b) for a, b in zip(plain_alone, plain_crowded)), "expected the default mode to differ (the test's control)"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_deterministic_greedy_matches_transformers(checkpoints, make_llm, arch):
    path = checkpoints[arch]
    rng = random.Random(4)
    prompts = [[rng.randrange(5, 4000) for _ in range(n)] for n in (1, 16, 17, 255, 256, 700, 2000)]
    llm = make_llm(path, deterministic=True, max_num_batched_tokens=512, num_kv_blocks=1024)
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(path, p, 8), f"{arch}: prompt of {len(p)} tokens diverged"


def test_invariant_linear_probe_accepts_this_machine():
    """The start-up probe finds a batch-invariant GEMM for the shapes the tests use (or refuses by name)."""
    from splitserve.kernels.invariant_linear import invariant_linear, is_row_invariant

    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(96, 1536).to(dtype)
        assert is_row_invariant(invariant_linear(weight), 1536, dtype, torch.device("cpu"))


def test_bf16_never_falls_back_to_one_row_at_a_time_where_a_fast_kernel_serves():
    """oneDNN's prepacked bf16 kernel, or where it has none (CPUs without AVX-512) the native GEMV, is the choice;
    the row-by-row fallback would make a deterministic decode step of 32 sequences 32 GEMV passes."""
    from splitserve.kernels import cpu_gemv
    from splitserve.kernels.invariant_linear import _choice

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported() and not cpu_gemv.can_use(torch.zeros(8, 16, dtype=torch.bfloat16), None):
        pytest.skip("neither oneDNN's bf16 kernel nor the native GEMV serves on this machine")
    assert _choice(200, 576, torch.bfloat16, torch.device("cpu"), True) in ("packed", "native")

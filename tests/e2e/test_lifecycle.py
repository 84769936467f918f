"""The life cycle on a real local Ray: clients that leave at any moment free everything at once, and a
decode replica killed (kill -9) mid-stream loses no stream: it resumes on the other decode replica.

Both are the fast parts of the fault suite (``benchmarks/faults.py``, whose drills
they use). The disconnect storm reproduces issue 9's finding: under Ray Serve every call the
ingress makes while serving an HTTP request is cancelled with it, including the
release/abort calls made *because* it was cancelled; blocks then stayed reserved
until the 300 s reaper. Here every block must be free within seconds and no
cleanup call may fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time

import httpx
import pytest

from benchmarks.fault_drills import disconnect_storm, replica_pid
from tests.e2e.conftest import wait_all_blocks_free, wait_healthy

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def admin(url: str) -> dict:
    return httpx.get(f"{url}/admin/workers", timeout=5).json()


def test_clients_leaving_at_every_moment_free_every_block_at_once(apps):
    url = apps["d11"]
    failed_before = admin(url)["cleanup"]["failed"]
    t0 = time.monotonic()
    asyncio.run(disconnect_storm(url, random.Random(9)))  # the fault suite's disconnect round
    reports = wait_all_blocks_free(url, timeout_s=10)  # the reaper would take 300 s
    assert all(r["num_blocks_in_flight"] == 0 for r in reports), reports
    state = admin(url)
    assert state["cleanup"]["failed"] == failed_before, f"cleanup calls failed: {state['cleanup']}"
    assert time.monotonic() - t0 < 60
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "still serving?", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text


def _serving_decode(url: str, req_id: str) -> str:
    """The decode worker streaming ``req_id`` now, as the ingress knows it (``/admin/requests``); the workers' load
    reports lag and cannot tell which of two workers runs it."""
    shown = {r["req_id"]: r for r in httpx.get(f"{url}/admin/requests", timeout=5).json()["requests"]}
    assert shown[req_id]["decode_worker_id"] is not None, shown[req_id]
    return shown[req_id]["decode_worker_id"]


def _reference(model: str, prompt: list[int], max_tokens: int) -> list[int]:
    from splitserve import LLM, SamplingParams

    llm = LLM(model, dtype="float32", num_kv_blocks=512)
    return llm.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), use_tqdm=False)[0].token_ids


def test_decode_replica_killed_mid_stream_resumes_on_the_other(apps, tiny_model):
    url = apps["d12"]
    # the tiny model decodes ~3,000 tokens a second: a shorter request can be finished on its worker (the rest of it
    # buffered on the way to the client) by the time the client has read a few tokens and the kill lands
    prompt, max_tokens = [random.Random(12).randrange(5, 4000) for _ in range(60)], 3000
    reference = _reference(tiny_model, prompt, max_tokens)
    decoders = [w["worker_id"] for w in admin(url)["workers"] if w["role"] == "decode"]
    assert len(decoders) == 2, decoders
    pids = {d: replica_pid("d12", d) for d in decoders}  # looked up before: the kill must be quick
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    ids, finish, victim = [], None, None
    with httpx.Client(timeout=120) as client, client.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            ids += event["choices"][0].get("token_ids") or []
            finish = event["choices"][0]["finish_reason"] or finish
            if victim is None and len(ids) >= 20:
                victim = _serving_decode(url, event["id"].removeprefix("cmpl-"))  # the response id is the request id
                os.kill(pids[victim], signal.SIGKILL)
                killed_at = len(ids)
    assert victim is not None and killed_at < max_tokens, "the stream ended before the kill"
    assert finish == "length" and ids == reference, "the resumed stream must continue the greedy run exactly"
    state = admin(url)
    assert state["migrations"] == 1 and state["fallbacks"].get("migration") == 1
    wait_healthy(url, timeout_s=120)  # Serve restarts the replica; the ingress pairs it again
    wait_all_blocks_free(url, timeout_s=30)

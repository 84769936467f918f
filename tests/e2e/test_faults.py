"""Faults on a real local Ray: a prefill replica killed mid-request, a client that hangs up mid-stream.

Either way the request ends (retried, or with an error) within a bounded time,
every KV block on every worker is free again, and the workers keep serving.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import wait_all_blocks_free, wait_healthy

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _replica_actor(app: str, worker_id: str):
    """The Serve replica actor of a worker (``prefill-<replica id>``)."""
    import ray

    deployment, _, replica = worker_id.partition("-")
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if name.startswith("SERVE_REPLICA::") and f"{app}#{deployment}#" in name and name.endswith(f"#{replica}"):
            return ray.get_actor(name, namespace=entry["namespace"])
    raise LookupError(f"no replica {worker_id} in {app}")


def _workers(url: str) -> dict[str, dict]:
    return {w["worker_id"]: w for w in httpx.get(f"{url}/admin/workers", timeout=5).json()["workers"]}


def test_prefill_replica_killed_during_request(apps):
    import ray

    url = apps["slowxfer"]
    before = {k: v["num_requests"] for k, v in _workers(url).items()}
    result: dict = {}

    def call() -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            r = client.completions.create(model="tiny", prompt=list(range(10, 400)), max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
            result["finish"] = r.choices[0].finish_reason
        except openai.APIError as e:  # an error is acceptable; a hang is not
            result["error"] = e

    t0 = time.monotonic()
    thread = threading.Thread(target=call)
    thread.start()
    victim = None
    while victim is None and time.monotonic() - t0 < 10:  # the transfer is held for 4 s: find who is doing it
        now = _workers(url)
        victim = next((w for w, r in now.items() if r["role"] == "prefill" and r["num_requests"] > before.get(w, 0)), None)
        time.sleep(0.1)
    assert victim is not None, "the request never reached a prefill worker"
    ray.kill(_replica_actor("slowxfer", victim), no_restart=False)
    thread.join(timeout=90)
    assert not thread.is_alive(), "request hung after its prefill worker died"
    assert time.monotonic() - t0 < 90
    assert result.get("finish") == "length", f"expected a retry on the other prefill worker, got {result}"
    wait_healthy(url, timeout_s=120)  # Serve restarts the replica; the ingress re-pairs it
    wait_all_blocks_free(url, timeout_s=30)


def test_client_disconnect_mid_stream_frees_blocks(apps):
    url = apps["d11"]
    body = {"model": "tiny", "prompt": list(range(10, 300)), "max_tokens": 3000, "temperature": 0, "ignore_eos": True, "stream": True}
    body["max_tokens"] = 4000 - len(body["prompt"]) - 10
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    json.loads(line[6:])
                    seen += 1
                if seen >= 3:
                    break
    # the connection is closed here, thousands of tokens before the end
    reports = wait_all_blocks_free(url, timeout_s=20)
    assert all(r["num_running"] == 0 for r in reports)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert client.completions.create(model="tiny", prompt="still serving?", max_tokens=4, temperature=0).choices[0].finish_reason in ("stop", "length")

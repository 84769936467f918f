"""``splitserve serve`` as a user runs it: its own local Ray, the ingress replica answering HTTP on the port itself
(Serve's direct ingress: no hop through the HTTP proxy), tokens through the workers' token feeds equal to the
offline engine's, a client that hangs up mid-stream freeing its KV at once, and SIGTERM stopping it all."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

pytestmark = [pytest.mark.slow]

PROMPTS = [[11, 42, 7, 99, 5], list(range(20, 57)), [3] * 9, list(range(300, 317))]
MAX_TOKENS = 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("local-server") / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_SERVE_")}
    cmd = [sys.executable, "-m", "splitserve.cli", "serve", "--model", tiny_model, "--port", str(port), "--dtype", "float32",
           "--mode", "disaggregated", "--prefill", "1", "--decode", "1", "--worker-cpus", "0.5"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while "splitserve ready" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        yield url, port, proc
    finally:
        tree = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=120)
        for p in psutil.wait_procs(tree, timeout=10)[1]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
    assert proc.returncode == 0, log.read_text()[-3000:]


def test_the_ingress_replica_itself_listens_on_the_port(server):
    _, port, _ = server
    listeners = {c.pid for c in psutil.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert len(listeners) == 1, listeners
    title = " ".join(psutil.Process(listeners.pop()).cmdline())
    assert "ServeReplica" in title and "Ingress" in title, title  # not Serve's ProxyActor


def test_concurrent_streams_equal_the_offline_engine(server, tiny_model):
    from splitserve import LLM, SamplingParams

    url, _, _ = server
    llm = LLM(tiny_model, dtype="float32", num_kv_blocks=256)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    expected = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS * 2, params, use_tqdm=False)]

    async def stream(client: httpx.AsyncClient, prompt: list[int]) -> list[int]:
        body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True}
        tokens = []
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    tokens += json.loads(line[6:])["choices"][0].get("token_ids") or []
        return tokens

    async def all_streams() -> list[list[int]]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(stream(client, p) for p in PROMPTS * 2))

    assert asyncio.run(all_streams()) == expected


def _cancelled(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "splitserve_requests_total" and s.labels.get("status") == "cancelled")


def test_a_client_that_hangs_up_mid_stream_frees_its_blocks(server):
    url, _, _ = server
    before = _cancelled(url)
    body = {"prompt": PROMPTS[1], "max_tokens": 1800, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}/v1/completions", json=body) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: {")
            if events == 3:
                break  # leaves the stream: the connection closes
    deadline = time.monotonic() + 10
    while True:
        workers = httpx.get(f"{url}/admin/workers", timeout=5).json()["workers"]
        if all(w["num_free_blocks"] == w["num_total_blocks"] and w["num_running"] == 0 for w in workers):
            break
        assert time.monotonic() < deadline, workers
        time.sleep(0.2)
    assert _cancelled(url) == before + 1  # aborted, not run to its 1,800 tokens

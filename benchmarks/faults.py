"""Fault suite: break a locally deployed splitserve on purpose, under load, and count what the clients saw.

Deploys two apps on a local Ray (tiny float32 checkpoint unless ``--model``):
``main`` (2 prefill + 2 decode workers) and ``faulty`` (1 + 1, with injected KV
transfer failures and timeouts), then runs, ``--rounds`` times each:

* kill -9 of a prefill / a decode replica's process while ``--concurrency``
  clients stream greedy requests (a worker of each role remains);
* transfer faults: the same load on ``faulty``;
* clients leaving at every moment: before the first token, after one and three
  events, non-streaming at 0.05 s (prefill) and 0.5 s (decode);
* hostile inputs: bodies that broke the server in issue 9 (no 5xx allowed);

then a soak at capacity for ``--soak-s`` seconds with the workers' RSS at start
and end. Every completed request's tokens are checked against the offline
greedy run (``wrong``: must be 0); a request with no answer after ``--hang-s``
is ``hung`` (must be 0); an error is ``clean`` when its body has a reason and no
traceback, address or pid; ``leaked`` counts KV blocks still in use 30 s after a
round (must be 0). Prints the tables for ``docs/reliability.md``.

    python benchmarks/faults.py                              # 3 rounds each, 180 s soak
    python benchmarks/faults.py --rounds 1 --soak-s 30       # a quick pass
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from fault_drills import disconnect_storm, kill_replica, replica_pid

UNCLEAN = re.compile(r"Traceback|\b\d{1,3}(?:\.\d{1,3}){3}\b|\bpid\b|actor_id|File \"/", re.IGNORECASE)
HOSTILE = [  # (path, raw body): each must get a 4xx, never a 5xx
    ("/v1/completions", b'{"prompt":"x","max_tokens":4,"temperature":1e-40}'),
    ("/v1/completions", b'{"prompt":"x","max_tokens":4,"top_k":9223372036854775808}'),
    ("/v1/completions", b'{"prompt":"x","max_tokens":4,"seed":18446744073709551616}'),
    ("/v1/completions", b'{"prompt":"x","max_tokens":4,"seed":-9223372036854775809}'),
    ("/v1/completions", b'{"prompt":"\\udc00","max_tokens":4}'),
    ("/v1/completions", b'{"prompt":"\xed\xa0\x80","max_tokens":4}'),
    ("/v1/completions", b'{"prompt":"x","tenant":"\\ud800","max_tokens":4}'),
    ("/v1/completions", b'{"prompt":' + b"[" * 1000 + b"]" * 1000 + b"}"),
    ("/v1/completions", b'{"prompt":"x","max_tokens":' + b"9" * 5000 + b"}"),
    ("/v1/completions", b"{not json"),
    ("/v1/chat/completions", b'{"messages":[{"role":"user","content":"hi"}],"chat_template_kwargs":{"chat_template":"{% for i in range(30000) %}{% for j in range(30000) %}x{% endfor %}{% endfor %}"}}'),
]


# ---- load with checked answers ------------------------------------------------------------------------------------
@dataclass
class Tally:
    scenario: str
    rounds: int = 0
    sent: int = 0
    completed: int = 0
    clean: int = 0
    unclean: int = 0
    hung: int = 0
    wrong: int = 0
    bad_input_5xx: int | None = None
    leaked: int = 0
    cleanup_failed: int = 0
    migrated: int = 0
    recover_s: list[float] = field(default_factory=list)

    def row(self) -> list[str]:
        rec = f"{min(self.recover_s):.1f}-{max(self.recover_s):.1f}" if self.recover_s else "-"
        bad = "-" if self.bad_input_5xx is None else str(self.bad_input_5xx)
        return [self.scenario, str(self.rounds), str(self.sent), str(self.completed), str(self.clean), str(self.unclean),
                str(self.hung), str(self.wrong), bad, str(self.leaked), str(self.cleanup_failed), str(self.migrated), rec]


HEADER = ["scenario", "rounds", "sent", "completed", "failed, clean error", "failed, unclean", "hung", "wrong tokens",
          "5xx on bad input", "blocks leaked", "cleanup calls failed", "streams migrated", "time to recover (s)"]


def _error_is_clean(message: Any) -> bool:
    return isinstance(message, str) and bool(message.strip()) and not UNCLEAN.search(message)


class Load:
    """``concurrency`` clients sending greedy requests (streaming and not, in turn) until stopped; tallies answers.

    A 503/429 is back-pressure: the client waits ``Retry-After`` and sends again (as ``splitserve.Client`` does),
    up to 5 times; only the final outcome counts.
    """

    def __init__(self, url: str, prompts: list[list[int]], refs: list[list[int]], tally: Tally, *, concurrency: int,
                 max_tokens: int, hang_s: float) -> None:
        self.url, self.prompts, self.refs, self.tally = url, prompts, refs, tally
        self.concurrency, self.max_tokens, self.hang_s = concurrency, max_tokens, hang_s
        self.num_refused = 0  # 503 answers, retried

    async def run(self, stop: asyncio.Event) -> None:
        limits = httpx.Limits(max_connections=self.concurrency * 2, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.hang_s, connect=10), limits=limits) as client:
            await asyncio.gather(*(self._client_loop(client, c, stop) for c in range(self.concurrency)))

    async def _client_loop(self, client: httpx.AsyncClient, c: int, stop: asyncio.Event) -> None:
        i = c
        while not stop.is_set():
            self.tally.sent += 1
            try:
                outcome = await asyncio.wait_for(self._one(client, i), self.hang_s)
            except asyncio.TimeoutError:
                outcome = "hung"
            except httpx.HTTPError:
                outcome = "unclean"  # connection reset, or no byte for hang_s
            setattr(self.tally, outcome, getattr(self.tally, outcome) + 1)
            i += self.concurrency

    async def _one(self, client: httpx.AsyncClient, i: int) -> str:
        k = i % len(self.prompts)
        body = {"model": "tiny", "prompt": self.prompts[k], "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True, "return_token_ids": True, "stream": i % 2 == 0}
        send = self._stream if body["stream"] else self._post
        for _ in range(5):
            status, ids, error, retry_after = await send(client, body)
            if status not in (429, 503):
                break
            self.num_refused += 1
            await asyncio.sleep(min(float(retry_after or 1), 30))
        if error is not None or status != 200:
            return "clean" if _error_is_clean(error) else "unclean"
        return "completed" if ids == self.refs[k] else "wrong"

    async def _post(self, client: httpx.AsyncClient, body: dict) -> tuple[int, list[int] | None, str | None, str | None]:
        r = await client.post(f"{self.url}/v1/completions", json=body)
        if r.status_code != 200:
            return r.status_code, None, _error_message(r), r.headers.get("retry-after")
        return 200, r.json()["choices"][0]["token_ids"], None, None

    async def _stream(self, client: httpx.AsyncClient, body: dict) -> tuple[int, list[int] | None, str | None, str | None]:
        ids: list[int] = []
        async with client.stream("POST", f"{self.url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, None, _error_message(r), r.headers.get("retry-after")
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        return 200, None, event["error"].get("message"), None
                    ids += event["choices"][0].get("token_ids") or []
        return 200, ids, None, None


def _error_message(r: httpx.Response) -> str | None:
    try:
        return r.json()["error"]["message"]
    except Exception:
        return None  # a body without the OpenAI error shape is not clean


# ---- the harness ----------------------------------------------------------------------------------------------------
def admin(url: str) -> dict:
    return httpx.get(f"{url}/admin/workers", timeout=10).json()


async def settle(url: str, timeout_s: float = 30.0) -> int:
    """KV blocks still in use (reserved, running or queued) on the workers after waiting up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        reports = (await asyncio.to_thread(admin, url))["workers"]
        used = sum(r["num_total_blocks"] - r["num_free_blocks"] for r in reports if r.get("healthy", True))
        busy = sum(r["num_running"] + r["num_waiting"] for r in reports if r.get("healthy", True))
        if (used == 0 and busy == 0) or time.monotonic() > deadline:
            return used
        await asyncio.sleep(0.5)


async def wait_recovered(url: str, role: str, killed: str, count: int, timeout_s: float = 180.0) -> float:
    """Seconds until ``role`` has ``count`` healthy workers again, none of them ``killed`` (a restarted replica
    is a new worker with a new name), and /health says "ok"."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            state = await asyncio.to_thread(admin, url)
            healthy = [w["worker_id"] for w in state["workers"] if w["role"] == role and w.get("healthy")]
            if killed not in healthy and len(healthy) >= count and state["serving"]["status"] == "ok":
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.25)
    raise TimeoutError(f"{role} did not get {count} healthy workers back within {timeout_s:.0f} s")


def worker_rss_mib(app: str, names: list[str]) -> dict[str, float]:
    out = {}
    for name in names:
        with open(f"/proc/{replica_pid(app, name)}/status") as f:
            out[name] = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    return out


@dataclass
class Suite:
    args: argparse.Namespace
    urls: dict[str, str]
    prompts: list[list[int]]
    refs: list[list[int]]

    def load(self, app: str, tally: Tally, concurrency: int | None = None) -> Load:
        a = self.args
        return Load(self.urls[app], self.prompts, self.refs, tally, concurrency=concurrency or a.concurrency,
                    max_tokens=a.max_tokens, hang_s=a.hang_s)

    async def under_load(self, app: str, tally: Tally, during) -> None:
        """Run ``during()`` while the load runs; then stop it, let it finish, and count leaks, cleanups and migrations."""
        url = self.urls[app]
        before = await asyncio.to_thread(admin, url)
        stop = asyncio.Event()
        load_task = asyncio.ensure_future(self.load(app, tally).run(stop))
        await asyncio.sleep(self.args.warmup_s)
        try:
            await during()
        finally:
            stop.set()
            await load_task
        tally.leaked += await settle(url)
        after = await asyncio.to_thread(admin, url)
        tally.cleanup_failed += after["cleanup"]["failed"] - before["cleanup"]["failed"]
        tally.migrated += after["migrations"] - before["migrations"]
        tally.rounds += 1

    async def kill_round(self, role: str, round_no: int, tally: Tally) -> None:
        url = self.urls["main"]

        async def during() -> None:
            workers = sorted(w["worker_id"] for w in (await asyncio.to_thread(admin, url))["workers"] if w["role"] == role)
            victim = workers[round_no % len(workers)]
            await asyncio.to_thread(kill_replica, "main", victim)
            tally.recover_s.append(await wait_recovered(url, role, victim, len(workers)))
            await asyncio.sleep(self.args.warmup_s)  # serving with the restarted replica too

        await self.under_load("main", tally, during)

    async def faults_round(self, tally: Tally) -> None:
        await self.under_load("faulty", tally, lambda: asyncio.sleep(self.args.fault_s))

    async def disconnect_round(self, round_no: int, tally: Tally) -> None:
        url = self.urls["main"]
        before = await asyncio.to_thread(admin, url)
        tally.sent += await disconnect_storm(url, random.Random(round_no))
        tally.leaked += await settle(url)
        tally.cleanup_failed += (await asyncio.to_thread(admin, url))["cleanup"]["failed"] - before["cleanup"]["failed"]
        tally.rounds += 1

    async def hostile_round(self, tally: Tally) -> None:
        url = self.urls["main"]
        tally.bad_input_5xx = tally.bad_input_5xx or 0
        async with httpx.AsyncClient(timeout=self.args.hang_s) as client:
            for path, raw in HOSTILE:
                tally.sent += 1
                try:
                    r = await client.post(f"{url}{path}", content=raw, headers={"content-type": "application/json"})
                except httpx.TimeoutException:
                    tally.hung += 1
                    continue
                tally.bad_input_5xx += r.status_code >= 500
                if r.status_code == 200:
                    tally.completed += 1
                else:
                    tally.clean += _error_is_clean(_error_message(r))
                    tally.unclean += not _error_is_clean(_error_message(r))
        tally.leaked += await settle(url)
        tally.rounds += 1

    async def soak(self, tally: Tally) -> tuple[dict[str, float], dict[str, float], int]:
        deployments = [w["worker_id"] for w in (await asyncio.to_thread(admin, self.urls["main"]))["workers"]] + ["Ingress"]
        rss_start = await asyncio.to_thread(worker_rss_mib, "main", deployments)
        load = self.load("main", tally, concurrency=self.args.soak_concurrency)
        stop = asyncio.Event()
        task = asyncio.ensure_future(load.run(stop))
        await asyncio.sleep(self.args.soak_s)
        stop.set()
        await task
        tally.leaked += await settle(self.urls["main"])
        tally.rounds = 1
        rss_end = await asyncio.to_thread(worker_rss_mib, "main", deployments)
        return rss_start, rss_end, load.num_refused


def deploy(model: str, port: int) -> dict[str, str]:
    import ray
    from ray import serve

    from splitserve.app import build_app
    from splitserve.config import ServeConfig

    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # every prompt through a prefill worker and NIXL (the tiny model prefills the drills' prompts within the default
    # local-prefill budget, so the decode workers would prefill most of them and the drills would miss the transfer path)
    remote = dict(local_prefill_budget_s=0.0)
    apps = {
        "main": dict(num_prefill=2, num_decode=2, routing=remote),
        "faulty": dict(num_prefill=1, num_decode=1, transfer_timeout_s=1.0,
                       faults=dict(fail_fraction=0.3, delay_fraction=0.2, delay_s=3.0, seed=7), routing=dict(max_attempts=4, **remote)),
    }
    urls = {}
    for name, spec in apps.items():
        cfg = ServeConfig.model_validate({
            **spec, "mode": "disaggregated", "app_name": name,
            "engine": {"model": model, "dtype": "float32", "num_kv_blocks": 400, "max_num_batched_tokens": 512},
            "http": {"served_model_name": "tiny"}, "prefill_resources": {"num_cpus": 0.5}, "decode_resources": {"num_cpus": 0.5},
        })
        serve.run(build_app(cfg), name=name, route_prefix=f"/{name}", blocking=False)
        urls[name] = f"http://127.0.0.1:{port}/{name}"
    for url in urls.values():
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).json()["status"] == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} never became healthy")
            time.sleep(0.5)
    return urls


async def run_suite(suite: Suite) -> tuple[list[Tally], tuple]:
    a = suite.args
    kills = {role: Tally(f"kill -9 {role} replica under load") for role in ("prefill", "decode")}
    faults, leaving, hostile = Tally("transfer failures + timeouts (faulty app)"), Tally("clients leave at every stage"), Tally("hostile inputs")
    for n in range(a.rounds):
        for role, tally in kills.items():
            print(f"round {n + 1}/{a.rounds}: kill {role}", flush=True)
            await suite.kill_round(role, n, tally)
        print(f"round {n + 1}/{a.rounds}: transfer faults, disconnects, hostile inputs", flush=True)
        await suite.faults_round(faults)
        await suite.disconnect_round(n, leaving)
        await suite.hostile_round(hostile)
    soak = Tally(f"soak at capacity, {a.soak_s:.0f} s x {a.soak_concurrency} clients")
    print(f"soak: {a.soak_s:.0f} s", flush=True)
    soak_info = await suite.soak(soak)
    return [kills["prefill"], kills["decode"], faults, leaving, hostile, soak], soak_info


def main() -> None:
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import free_port, machine_lines, markdown_table

    from splitserve import LLM, SamplingParams
    from splitserve.engine.random_models import make_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: a tiny random one, built in a temp dir)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8, help="clients during the kill and fault rounds")
    p.add_argument("--soak-s", type=float, default=180.0, help="soak duration")
    p.add_argument("--soak-concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--fault-s", type=float, default=10.0, help="load duration of one transfer-fault round")
    p.add_argument("--hang-s", type=float, default=120.0, help="a request with no answer after this is hung")
    args = p.parse_args()
    machine = machine_lines(1)  # the load average now, before the suite adds its own
    model = args.model or str(make_model(tempfile.mkdtemp(prefix="faults-ckpt-"), "tiny", seed=1))
    rng = random.Random(5)
    prompts = [[rng.randrange(5, 4000) for _ in range(n)] for n in (7, 16, 33, 64, 100, 150, 240, 300)]
    llm = LLM(model, dtype="float32", num_kv_blocks=512)
    refs = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True), use_tqdm=False)]
    del llm
    port = free_port()
    t0 = time.monotonic()
    urls = deploy(model, port)
    tallies, (rss_start, rss_end, refused) = asyncio.run(run_suite(Suite(args, urls, prompts, refs)))
    print("\n" + "\n".join(machine))
    print(f"- suite wall time {time.monotonic() - t0:.0f} s; 2 apps on one local Ray: main (2 prefill + 2 decode), faulty (1 + 1)\n")
    print(markdown_table(HEADER, [t.row() for t in tallies]))
    print(f"\nsoak: {refused} answers were 503 back-pressure (retried by the client after Retry-After)\n")
    print(markdown_table(["process", "RSS at soak start (MiB)", "RSS at soak end (MiB)"],
                         [[k, f"{rss_start[k]:.0f}", f"{rss_end[k]:.0f}"] for k in rss_start]))
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()

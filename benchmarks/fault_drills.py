"""The faults the fault suite (``benchmarks/faults.py``) inflicts, also used by its fast slice in the e2e tests.

``kill_replica`` kill -9s a Serve replica's process (its pid asked of the actor
itself); ``disconnect_storm`` sends requests whose clients leave at every stage:
before the first token, at once, mid-stream, and non-streaming ones cut
mid-prefill and mid-generation. No sibling imports: the tests import this as
``benchmarks.fault_drills``, the suite as a script's neighbour.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal

import httpx


def replica_pid(app: str, name: str) -> int:
    """The OS pid of a replica actor, asked of the actor itself. ``name``: a worker's name (``decode-<replica
    id>``, as ``/admin/workers`` lists it), or a deployment's name for its first replica (``Ingress``)."""
    import ray

    deployment, _, replica = name.partition("-")
    for entry in ray.util.list_named_actors(all_namespaces=True):
        actor_name = entry["name"]
        if actor_name.startswith("SERVE_REPLICA::") and f"{app}#{deployment}#" in actor_name and actor_name.endswith(f"#{replica}" if replica else ""):
            actor = ray.get_actor(actor_name, namespace=entry["namespace"])
            return ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=60)
    raise LookupError(f"no replica {name} in {app}")


def kill_replica(app: str, name: str) -> int:
    """kill -9 the replica's process; returns its pid."""
    pid = replica_pid(app, name)
    os.kill(pid, signal.SIGKILL)
    return pid


async def _stream_then_leave(client: httpx.AsyncClient, url: str, body: dict, after_events: int) -> None:
    async with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return  # back-pressure is a fine answer to a storm; it holds nothing
        seen = 0
        async for line in r.aiter_lines():
            if seen >= after_events:
                break  # leaving: the connection closes with the context
            if line.startswith("data: {"):
                seen += 1


async def _post_then_leave(client: httpx.AsyncClient, url: str, body: dict, after_s: float) -> None:
    try:
        await asyncio.wait_for(client.post(f"{url}/v1/completions", json=body), after_s)
    except asyncio.TimeoutError:
        pass  # cancelled: the client left


async def disconnect_storm(url: str, rng: random.Random, num_each: int = 8) -> int:
    """Clients leaving at every moment, all at once: streams cut before any token, at once and mid-stream;
    non-streaming requests cut mid-prefill (0.05 s) and mid-generation (0.5 s). Returns the number sent."""
    def body() -> dict:
        n = rng.randrange(20, 120)
        return {"model": "tiny", "prompt": [rng.randrange(5, 4000) for _ in range(n)], "max_tokens": 1500, "ignore_eos": True, "temperature": 0}

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=128, max_keepalive_connections=0)) as client:
        leaving = [_stream_then_leave(client, url, body(), after_events=k) for k in (0, 1, 3) * num_each]
        leaving += [_post_then_leave(client, url, body(), after_s=s) for s in (0.05, 0.5) * (num_each * 5 // 8 or 1)]
        rng.shuffle(leaving)
        await asyncio.gather(*leaving)
    return len(leaving)

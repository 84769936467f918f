"""Open-loop streaming load generator: send a workload's requests on schedule, time every token.

``run_load(url, model, specs, vocab_size)`` sends each ``RequestSpec`` at its
arrival time (Poisson or constant gaps, from the workload) as a streaming
``POST /v1/completions`` whose prompt is a list of random token ids of the
requested length, with ``max_tokens`` = the requested output length and
``ignore_eos: true`` (so every output has exactly that length) and
``return_token_ids: true`` (so every token is visible in the SSE chunks, even
ones whose text is held back). Arrivals never wait for earlier responses (open
loop), so an overloaded server shows as growing latency, as it would in production.

Per request: TTFT from the moment it was sent to the first chunk carrying a
token; the arrival time of every later token (a chunk with k tokens spreads them
evenly over the gap since the previous chunk, as the ingress metrics do).
Every wait is bounded by ``request_timeout_s``; a failure is recorded, not raised.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx

from splitserve.tune.workload import RequestRecord, RequestSpec, record_from_token_times


def make_prompts(specs: list[RequestSpec], vocab_size: int, seed: int) -> list[list[int]]:
    """Random token ids (never the first few special ids), distinct per seed so runs do not share prefixes."""
    rng = random.Random(f"prompts-{seed}")
    low = min(5, vocab_size - 1)
    return [[rng.randrange(low, vocab_size) for _ in range(s.prompt_len)] for s in specs]


async def _one(client: httpx.AsyncClient, model: str, spec: RequestSpec, prompt: list[int], t0: float,
               request_timeout_s: float) -> RequestRecord:
    body = {"model": model, "prompt": prompt, "max_tokens": spec.output_len, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    delay = t0 + spec.arrival_s - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    sent = time.monotonic() - t0
    times: list[float] = []
    error = None

    async def consume() -> None:
        nonlocal error
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    error = f"stream error: {event['error']}"
                    return
                now = time.monotonic() - t0
                choices = event.get("choices") or []
                k = len(choices[0].get("token_ids") or []) if choices else 0
                if k:
                    last = times[-1] if times else now
                    times.extend(last + (now - last) * (i + 1) / k for i in range(k))

    try:
        await asyncio.wait_for(consume(), request_timeout_s)
    except asyncio.TimeoutError:
        error = f"timed out after {request_timeout_s:g} s with {len(times)} of {spec.output_len} tokens"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        error = f"{type(e).__name__}: {e}"
    if error is None and len(times) < spec.output_len:
        error = f"stream ended after {len(times)} of {spec.output_len} tokens"
    actual = RequestSpec(spec.index, sent, spec.prompt_len, spec.output_len)
    return record_from_token_times(actual, times, error)


async def run_load_async(url: str, model: str, specs: list[RequestSpec], prompts: list[list[int]], *,
                         request_timeout_s: float = 600.0, api_key: str | None = None, on_done=None,
                         transport: httpx.AsyncBaseTransport | None = None) -> list[RequestRecord]:
    """Send every request on schedule; one record per spec, in order. ``on_done(record)`` is called as each ends."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=len(specs) + 4, max_keepalive_connections=len(specs) + 4)
    timeout = httpx.Timeout(request_timeout_s, connect=30.0)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout, transport=transport) as client:
        t0 = time.monotonic()

        async def tracked(spec: RequestSpec, prompt: list[int]) -> RequestRecord:
            rec = await _one(client, model, spec, prompt, t0, request_timeout_s)
            if on_done is not None:
                on_done(rec)
            return rec

        return list(await asyncio.gather(*(tracked(s, p) for s, p in zip(specs, prompts))))


def run_load(url: str, model: str, specs: list[RequestSpec], vocab_size: int, *, seed: int = 0,
             request_timeout_s: float = 600.0, api_key: str | None = None, on_done=None) -> list[RequestRecord]:
    """Synchronous wrapper: prompts from ``seed``, then ``run_load_async`` on a fresh event loop."""
    prompts = make_prompts(specs, vocab_size, seed)
    return asyncio.run(run_load_async(url, model, specs, prompts, request_timeout_s=request_timeout_s, api_key=api_key,
                                      on_done=on_done))

"""The floor under ``stream_cpu.py``: CPU a bare Python HTTP server spends per SSE event, with nothing else.

One event per streamed token is what an OpenAI client asks for. This serves the same
event bytes splitserve's ingress writes (a ~210-byte completion chunk) from uvicorn
(httptools, uvloop: what Ray Serve's direct ingress runs) with no model, no Ray and
no routing: a ticker releases one event on every open stream each ``--step-ms`` (an
"engine step"), each request streams ``--events`` of them. Two servers, alternated
``--repeats`` times: a raw ASGI app (``await send`` per event) and Starlette's
``StreamingResponse`` (what FastAPI apps, splitserve's included, return). Prints the
server process's user+system CPU per event (request set-up included, as in
``stream_cpu.py``'s per-token numbers). The client runs in this process and is not
counted.

    python benchmarks/sse_floor.py
    python benchmarks/sse_floor.py --streams 64 --events 256 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time

import aiohttp
import psutil
from common import free_port, machine_lines, markdown_table

SERVER = r'''
import asyncio, sys
import uvicorn
from starlette.responses import StreamingResponse

kind, port, events, step_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
EVENT = (b'data: {"id":"cmpl-0123456789abcdef0123456789abcdef","object":"text_completion","created":1764000000,'
         b'"model":"SmolLM2-135M-Instruct","choices":[{"index":0,"text":" token","logprobs":null,"finish_reason":null}]}\n\n')
tick = None

async def ticker():
    global tick
    while True:
        await asyncio.sleep(step_s)
        released, tick = tick, asyncio.Event()
        released.set()

async def body():
    for _ in range(events):
        await tick.wait()
        yield EVENT
    yield b"data: [DONE]\n\n"

async def app(scope, receive, send):
    global tick
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            tick = asyncio.Event()
            asyncio.get_running_loop().create_task(ticker())
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if kind == "starlette":
        await StreamingResponse(body(), media_type="text/event-stream")(scope, receive, send)
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    async for event in body():
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})

uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", loop="uvloop", http="httptools", lifespan="on")
'''


async def drive(url: str, streams: int, seconds: float, server: psutil.Process) -> tuple[int, float, float]:
    """(events received, server CPU seconds, wall seconds) over ``seconds`` of ``streams`` back-to-back streams."""
    count = 0

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal count
        async with session.get(url) as resp:
            async for line in resp.content:
                count += line.startswith(b"data: {")

    async def loop(session: aiohttp.ClientSession, deadline: float) -> None:
        while time.monotonic() < deadline:
            await one(session)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=streams + 4)) as session:
        await asyncio.gather(*(one(session) for _ in range(min(streams, 4))))  # warm-up
        count, cpu0, t0 = 0, sum(server.cpu_times()[:2]), time.monotonic()
        await asyncio.gather(*(loop(session, t0 + seconds) for _ in range(streams)))
        return count, sum(server.cpu_times()[:2]) - cpu0, time.monotonic() - t0


def measure(kind: str, args: argparse.Namespace) -> tuple[float, float]:
    """(server µs of CPU per event, events per second) for one server kind."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, kind, str(port), str(args.events), str(args.step_ms / 1000)])
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        events, cpu, wall = asyncio.run(drive(f"http://127.0.0.1:{port}/", args.streams, args.seconds, psutil.Process(proc.pid)))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return 1e6 * cpu / max(events, 1), events / wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--events", type=int, default=64, help="events per request (tokens per request)")
    ap.add_argument("--step-ms", type=float, default=10.0, help="every stream gets one event per step")
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    runs: dict[str, list[tuple[float, float]]] = {"raw ASGI": [], "starlette": []}
    for _ in range(args.repeats):
        for label, kind in (("raw ASGI", "raw"), ("starlette", "starlette")):
            runs[label].append(measure(kind, args))
            print(f"{label}: {runs[label][-1][0]:.1f} µs per event, {runs[label][-1][1]:.0f} events/s", flush=True)
    print("\n" + "\n".join(machine_lines(1, openmp=False)))
    print(f"- uvicorn (httptools, uvloop), {args.streams} streams, {args.events} events per request, one event per stream "
          f"every {args.step_ms:g} ms, {args.seconds:g} s per run, {args.repeats} runs each (medians)\n")
    print(markdown_table(["server", "µs CPU per event", "events/s"],
                         [[k, f"{statistics.median(r[0] for r in v):.1f}", f"{statistics.median(r[1] for r in v):.0f}"] for k, v in runs.items()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

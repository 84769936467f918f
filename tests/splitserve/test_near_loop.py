"""``near_loop``: short jobs run on the event loop's own thread, long ones in an edge thread (``request_prep``)."""

from __future__ import annotations

import asyncio
import threading

from splitserve.request_prep import INLINE_MAX_CHARS, near_loop


def _thread_name() -> str:
    return threading.current_thread().name


def test_a_short_job_runs_inline_and_a_long_one_in_an_edge_thread():
    async def body() -> tuple[str, str, str]:
        short = await near_loop(INLINE_MAX_CHARS, _thread_name)
        long = await near_loop(INLINE_MAX_CHARS + 1, _thread_name)
        return threading.current_thread().name, short, long

    loop_thread, short, long = asyncio.run(body())
    assert short == loop_thread
    assert long != loop_thread and long.startswith("ingress-edge")


def test_errors_come_back_from_either_path():
    def fail(n: int) -> None:
        raise ValueError(f"bad {n}")

    async def body(size: int) -> str:
        try:
            await near_loop(size, fail, size)
        except ValueError as e:
            return str(e)
        return "no error"

    assert asyncio.run(body(10)) == "bad 10"
    assert asyncio.run(body(INLINE_MAX_CHARS * 2)) == f"bad {INLINE_MAX_CHARS * 2}"

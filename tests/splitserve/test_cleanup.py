"""Janitor: a cleanup call survives the cancellation that caused it; failures.describe: clean one-line reasons."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from splitserve.cleanup import Janitor
from splitserve.failures import describe, is_worker_death, scrub
from tests.fakes import ReplicaDied

pytestmark = pytest.mark.unit

PARENT = contextvars.ContextVar("parent_request", default=None)


def test_cleanup_survives_repeated_cancellation_of_its_caller():
    """The caller is cancelled twice (as a cancelled handler's ``cancel_and_wait`` does): the release still lands."""
    async def body():
        landed = []
        janitor = Janitor(grace_s=5.0)

        async def slow_release():
            await asyncio.sleep(0.2)
            landed.append("released")

        async def caller():
            try:
                await asyncio.sleep(10)
            finally:  # cleaning up because we were cancelled
                await janitor.run("release", "r1", slow_release)

        task = asyncio.create_task(caller())
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0.01)
        task.cancel()  # a second cancellation while the cleanup is awaited
        with pytest.raises(asyncio.CancelledError):
            await task
        assert landed == [] and janitor.num_pending == 1
        assert await janitor.drain(5)
        assert landed == ["released"] and janitor.num_failed == 0

    asyncio.run(body())


def test_cleanup_runs_outside_the_callers_request_context():
    """Ray Serve cancels every call made under a cancelled request's context; a cleanup must carry none."""
    async def body():
        seen = []
        janitor = Janitor()

        async def release():
            seen.append(PARENT.get())

        PARENT.set("http-request-1")
        await janitor.run("release", "r1", release)
        assert seen == [None]

    asyncio.run(body())


def test_failed_and_timed_out_cleanups_are_counted_and_bounded():
    async def body():
        failures = []
        janitor = Janitor(timeout_s=0.1, grace_s=0.01, on_failure=failures.append)

        async def dead():
            raise ReplicaDied("replica is dead")

        async def hangs():
            await asyncio.sleep(60)

        await janitor.run("abort", "r1", dead)
        await janitor.run("release", "r2", hangs)  # the caller waits grace_s only
        assert await janitor.drain(2)
        assert failures == ["abort", "release"] and janitor.num_failed == 2 and janitor.num_started == 2

    asyncio.run(body())


class RayTaskError(RuntimeError):
    """Shaped like Ray's wrapper: a traceback-laden text and the worker's exception in ``cause``."""

    def __init__(self, cause: BaseException):
        super().__init__(
            "ray::ServeReplica:splitserve:decode-0.handle_request() (pid=4242, ip=10.1.2.3, actor_id=0123456789abcdef0123456789abcdef)\n"
            'Traceback (most recent call last):\n  File "/home/u/splitserve/decode/worker.py", line 9, in f\n'
        )
        self.cause = cause


class ActorDiedError(RuntimeError):
    pass


@pytest.mark.parametrize(
    "error, expected",
    [
        (RayTaskError(ValueError("prompt token ids must be in the vocabulary")), "ValueError: prompt token ids must be in the vocabulary"),
        (ActorDiedError("The actor died unexpectedly.\n\tpid: 4242\n\tip: 10.1.2.3"), "ActorDiedError: the worker died or is unreachable"),
        (asyncio.TimeoutError(), "no answer within 10 s"),
        (RuntimeError(""), "RuntimeError"),
        (RuntimeError("call to 10.0.0.7:6379 (pid=99) at /opt/x/y/z.py failed"), "RuntimeError: call to <address> (pid=<pid>) at <file> failed"),
    ],
)
def test_describe_gives_one_clean_line(error, expected):
    assert describe(error, timeout_s=10) == expected


def test_worker_death_is_recognised_by_class_name():
    assert is_worker_death(ActorDiedError()) and is_worker_death(ReplicaDied())
    assert not is_worker_death(ValueError()) and not is_worker_death(asyncio.TimeoutError())
    assert "<id>" in scrub("actor_id=abcdef0123456789abcdef0123456789")

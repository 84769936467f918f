"""In-process stand-ins for Ray Serve handles, so router and ingress tests run without Ray.

``LocalHandle(worker)`` mimics ``DeploymentHandle``: ``handle.method.remote(*args)``
returns an awaitable, and ``handle.options(stream=True).method.remote(*args)``
returns the method's async iterator. ``kill()`` makes every later call fail the way
a dead replica's would (an exception), and every stream already running fail at
its next chunk (its work on the worker is dropped, as a dead process's would be),
to test failover and migration.
"""

from __future__ import annotations

from typing import Any


class ReplicaDied(RuntimeError):
    pass


class LocalHandle:
    def __init__(self, target: Any, stream: bool = False, state: dict | None = None):
        self._target = target
        self._stream = stream
        self._state = state if state is not None else {"dead": False}

    def options(self, stream: bool = False) -> "LocalHandle":
        return LocalHandle(self._target, stream, self._state)

    def kill(self) -> None:
        self._state["dead"] = True

    def __getattr__(self, name: str) -> "_Method":
        return _Method(self, name)


class _Method:
    def __init__(self, handle: LocalHandle, name: str):
        self._handle = handle
        self._name = name

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        h = self._handle
        if h._state["dead"]:
            if h._stream:
                return _dead_stream(self._name)
            return _dead_call(self._name)
        result = getattr(h._target, self._name)(*args, **kwargs)
        return _mortal_stream(h._state, self._name, result) if h._stream else result


async def _dead_call(name: str) -> Any:
    raise ReplicaDied(f"replica is dead (call {name})")


async def _dead_stream(name: str):
    raise ReplicaDied(f"replica is dead (stream {name})")
    yield  # pragma: no cover


async def _mortal_stream(state: dict, name: str, chunks: Any):
    """The worker's stream, until the replica is killed: then the next chunk is an error, and the work is dropped."""
    try:
        async for chunk in chunks:
            if state["dead"]:
                raise ReplicaDied(f"replica died mid-stream (stream {name})")
            yield chunk
    finally:
        await chunks.aclose()

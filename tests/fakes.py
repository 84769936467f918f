"""In-process stand-ins for Ray Serve handles, so router and ingress tests run without Ray.

``LocalHandle(worker)`` mimics ``DeploymentHandle``: ``handle.method.remote(*args)``
returns an awaitable, and ``handle.options(stream=True).method.remote(*args)``
returns the method's async iterator. ``kill()`` makes every later call fail the way
a dead replica's would (an exception), to test failover.
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
        return getattr(h._target, self._name)(*args, **kwargs)


async def _dead_call(name: str) -> Any:
    raise ReplicaDied(f"replica is dead (call {name})")


async def _dead_stream(name: str):
    raise ReplicaDied(f"replica is dead (stream {name})")
    yield  # pragma: no cover

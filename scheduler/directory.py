"""Where the registry learns which workers exist, how to call each one, and their latest load.

Two sources give the same ``Member`` records:

* ``ServeDirectory`` (production): the ``prefill`` and ``decode`` deployments'
  request routers publish their live replicas with metadata and routing stats
  (``replica_directory``); a member's handle is the deployment handle steered to
  that replica (``options(session_id=<replica id>)``). Serve collects the stats
  from the replicas (``record_routing_stats``); nothing here polls.
* ``LocalDirectory`` (in-process tests, no Serve): a fixed set of worker handles,
  whose ``record_replica_metadata`` is read once and ``record_routing_stats``
  every ``poll_interval_s``, as Serve's controller would.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any, Protocol

from splitserve.engine.aio import cancel_and_wait
from splitserve.scheduler import replica_directory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    worker_id: str
    role: str  # "prefill", "decode" or "both"
    handle: Any
    agent_info: bytes
    stats: dict[str, Any] | None  # the latest WorkerStats.to_dict(); None until the first report
    info: dict[str, Any] | None = None  # static facts from its metadata: Ray node, cold-start phases


class Directory(Protocol):
    def members(self) -> dict[str, Member]: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def _result(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _member(meta: dict[str, Any], handle: Any, stats: dict[str, Any] | None) -> Member:
    info = {k: meta[k] for k in ("node_id", "startup") if k in meta}
    return Member(meta["worker_id"], meta["role"], handle, base64.b64decode(meta["agent_info"]), stats or None, info)


class ServeDirectory:
    """Members from the request routers of this process (one per deployment handle)."""

    def __init__(self, handles: dict[str, Any], app_name: str) -> None:
        """``handles``: deployment name -> its ``DeploymentHandle`` (``prefill``, ``decode``, or ``worker``)."""
        from splitserve.serve_router import deployment_key

        self._handles = handles
        self._keys = {name: deployment_key(app_name, name) for name in handles}
        self._cache: tuple[int, dict[str, Member]] = (-1, {})

    async def start(self) -> None:
        """Serve creates a handle's router on its first call: make one call per deployment so the routers run."""
        for name, handle in self._handles.items():
            try:
                await asyncio.wait_for(handle.check_health.remote(), 60)
            except Exception as e:  # no replica yet: the router exists anyway and will publish when one starts
                logger.info("first call to %s: %r", name, e)

    async def stop(self) -> None:
        pass

    def members(self) -> dict[str, Member]:
        version = replica_directory.version()
        if self._cache[0] == version:
            return self._cache[1]
        members: dict[str, Member] = {}
        for name, handle in self._handles.items():
            for entry in replica_directory.snapshot(self._keys[name]).values():
                if "worker_id" in entry.metadata:
                    steered = handle.options(session_id=entry.replica_id, _by_reference=not _GRPC)
                    members[entry.metadata["worker_id"]] = _member(dict(entry.metadata), steered, dict(entry.stats))
        self._cache = (version, members)
        return members


# Serve's gRPC channel between replicas instead of a Ray object per streamed item: half the CPU per token on both
# ends (benchmarks/stream_cpu.py). On unless the environment Ray started with says otherwise (as Serve's own
# RAY_SERVE_USE_GRPC_BY_DEFAULT, whose default is the other way).
_GRPC = os.environ.get("RAY_SERVE_USE_GRPC_BY_DEFAULT", "1") == "1"


class LocalDirectory:
    """A fixed set of in-process workers behind handle stand-ins, polled as Serve's controller would."""

    def __init__(self, handles: dict[str, Any], poll_interval_s: float = 0.1, call_timeout_s: float = 5.0) -> None:
        self._handles = handles
        self.poll_interval_s = poll_interval_s
        self.call_timeout_s = call_timeout_s
        self._metadata: dict[str, dict[str, Any]] = {}
        self._stats: dict[str, dict[str, Any]] = {}
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        if self._task is None:
            await self.poll_once()
            self._task = asyncio.get_running_loop().create_task(self._poll_forever(), name="local-directory")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(name) for name in self._handles))

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            await self.poll_once()

    async def _poll(self, name: str) -> None:
        handle = self._handles[name]
        try:
            if name not in self._metadata:
                self._metadata[name] = await asyncio.wait_for(_result(handle.record_replica_metadata.remote()), self.call_timeout_s)
            self._stats[name] = await asyncio.wait_for(_result(handle.record_routing_stats.remote()), self.call_timeout_s)
        except Exception:  # a dead worker leaves the membership, as Serve drops a dead replica; back when it answers
            self._metadata.pop(name, None)
            self._stats.pop(name, None)

    def members(self) -> dict[str, Member]:
        return {
            meta["worker_id"]: _member(meta, self._handles[name], self._stats.get(name))
            for name, meta in self._metadata.items()
        }

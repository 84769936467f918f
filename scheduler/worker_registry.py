"""The thin I/O glue around the pure policy: keep the load view fresh, keep NIXL peers paired.

Lifecycle: ``start()`` launches a poll loop that asks every worker for its
``load()`` every ``poll_interval_s`` (each call bounded by a timeout). A report
with a new ``instance_id`` (first contact, or a restarted replica) triggers the
handshake: every decode worker's ``agent_info`` goes to every prefill worker
(``add_peers``), which checks layout and protocol version. Failed polls mark the
worker unhealthy in the ``LoadView`` so the policy routes around it.

Handles are Ray Serve ``DeploymentHandle``s in production; any object with the
same ``handle.method.remote(...)`` shape works (tests use in-process workers).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from splitserve.engine.aio import cancel_and_wait
from splitserve.scheduler.load_view import LoadView
from splitserve.scheduler.types import WorkerLoad, WorkerRole

logger = logging.getLogger(__name__)


def load_from_report(rep: dict[str, Any], prefix_hashes: frozenset[int] = frozenset()) -> WorkerLoad:
    return WorkerLoad(
        worker_id=rep["worker_id"],
        role=WorkerRole(rep["role"]),
        num_waiting=rep["num_waiting"],
        num_running=rep["num_running"],
        num_free_blocks=rep["num_free_blocks"],
        num_total_blocks=rep["num_total_blocks"],
        block_size=rep["block_size"],
        num_queued_tokens=rep["num_queued_tokens"],
        prefix_hashes=prefix_hashes,
    )


class WorkerRegistry:
    """Worker handles by id, their latest load reports, and the NIXL pairing state.

    ``track_prefixes``: ask workers for a summary of their prefix caches (sent
    only when it changed since the version held here) so the policy can route a
    request to the worker that already holds most of its prompt.
    """

    def __init__(
        self, prefill: dict[str, Any], decode: dict[str, Any], *, poll_interval_s: float = 0.1, max_age_s: float = 5.0,
        call_timeout_s: float = 5.0, track_prefixes: bool = True,
    ):
        self.prefill = prefill
        self.decode = decode
        self.view = LoadView(max_age_s=max_age_s)
        self.reports: dict[str, dict[str, Any]] = {}
        self.poll_interval_s = poll_interval_s
        self.call_timeout_s = call_timeout_s
        self._instances: dict[str, str] = {}
        self._paired: set[tuple[str, str, str, str]] = set()  # (prefill id, its instance, decode id, its instance)
        self.track_prefixes = track_prefixes
        self._prefixes: dict[str, tuple[str, int, frozenset[int]]] = {}  # worker id -> (instance, version, hashes)
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()

    def handle(self, worker_id: str) -> Any:
        return self.prefill.get(worker_id) or self.decode[worker_id]

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll_forever(), name="worker-registry")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def wait_ready(self, timeout_s: float) -> bool:
        """True once every worker has reported and been paired (or until the timeout)."""
        self.start()
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # never let the loop die
                logger.exception("worker poll failed")
            await asyncio.sleep(self.poll_interval_s)

    async def poll_once(self) -> None:
        ids = list(self.prefill) + list(self.decode)
        results = await asyncio.gather(*(self._load(w) for w in ids), return_exceptions=True)
        for worker_id, rep in zip(ids, results):
            if isinstance(rep, BaseException):
                self.view.mark_unhealthy(worker_id)
                continue
            self._take_prefixes(worker_id, rep)
            self.reports[worker_id] = rep
            self._instances[worker_id] = rep["instance_id"]
        await self._pair()
        for worker_id, rep in zip(ids, results):
            if not isinstance(rep, BaseException) and self._is_paired(worker_id):
                self.view.update(load_from_report(rep, self.prefix_hashes(worker_id)))
        if all(self._is_paired(w) for w in ids) and len(self.reports) == len(ids):
            self._ready.set()

    async def _load(self, worker_id: str) -> dict[str, Any]:
        method = self.handle(worker_id).load
        if not self.track_prefixes:
            return await asyncio.wait_for(_call(method), self.call_timeout_s)
        known = self._prefixes.get(worker_id)
        version = known[1] if known is not None and known[0] == self._instances.get(worker_id) else -1
        return await asyncio.wait_for(_call(method, version), self.call_timeout_s)

    def _take_prefixes(self, worker_id: str, rep: dict[str, Any]) -> None:
        """Keep the prefix summary a report carries (kept out of ``reports``: it can be large)."""
        hashes = rep.pop("prefix_hashes", None)
        if hashes is not None:
            self._prefixes[worker_id] = (rep["instance_id"], rep["prefix_version"], frozenset(hashes))
        elif "prefix_version" not in rep:
            self._prefixes.pop(worker_id, None)  # prefix caching off there, or an older worker

    def prefix_hashes(self, worker_id: str) -> frozenset[int]:
        """The latest prefix summary of a worker (empty when unknown or from an earlier instance)."""
        known = self._prefixes.get(worker_id)
        if known is None or known[0] != self._instances.get(worker_id):
            return frozenset()
        return known[2]

    def _is_paired(self, worker_id: str) -> bool:
        """A prefill worker is usable once paired with every live decode worker; decode workers always are."""
        if worker_id in self.decode:
            return worker_id in self._instances
        inst = self._instances.get(worker_id)
        return inst is not None and all(
            (worker_id, inst, d, self._instances[d]) in self._paired for d in self.decode if d in self._instances
        )

    async def _pair(self) -> None:
        for p in self.prefill:
            if p not in self._instances:
                continue
            missing = [d for d in self.decode if d in self._instances and (p, self._instances[p], d, self._instances[d]) not in self._paired]
            if not missing:
                continue
            try:
                infos = await asyncio.gather(*(asyncio.wait_for(_call(self.decode[d].agent_info), self.call_timeout_s) for d in missing))
                await asyncio.wait_for(_call(self.prefill[p].add_peers, list(infos)), self.call_timeout_s)
            except Exception as e:
                logger.warning("pairing prefill %s with %s failed: %r", p, missing, e)
                continue
            for d in missing:
                self._paired.add((p, self._instances[p], d, self._instances[d]))
            logger.info("paired prefill %s with decode %s", p, missing)

    def healthy_ids(self) -> set[str]:
        return {w.worker_id for w in self.view.snapshot() if w.is_healthy}

    def loads(self) -> list[WorkerLoad]:
        return self.view.snapshot()


async def _call(method: Any, *args: Any) -> Any:
    """``await handle.method.remote(*args)`` for Ray handles and in-process stand-ins alike."""
    return await method.remote(*args)

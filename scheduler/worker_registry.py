"""The thin I/O glue around the pure policy: keep the load view fresh, keep NIXL peers paired.

Lifecycle: ``start()`` launches one poll loop *per worker*, each asking its
worker for ``load()`` every ``poll_interval_s`` (bounded by a timeout), so a dead
or slow worker never delays the reports of the others (one shared loop let a
dead prefill worker's timeouts age a healthy decode worker's report past
``max_age_s``, and every request got 503). A report with a new ``instance_id``
(first contact, or a restarted replica) wakes the pairing task, which runs the
handshake: every decode worker's ``agent_info`` goes to every prefill worker
(``add_peers``), which checks layout and protocol version. A failed poll, or a
call the router saw fail because the worker died (``mark_dead``), marks the
worker unhealthy in the ``LoadView`` until its next report, so the policy routes
around it at once. ``report_hooks`` see every fresh report (the admission
estimator measures queue drain rates from them).

Handles are Ray Serve ``DeploymentHandle``s in production; any object with the
same ``handle.method.remote(...)`` shape works (tests use in-process workers).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
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
        self._pair_wanted = asyncio.Event()
        self._answered: set[str] = set()  # workers whose latest poll was answered
        self.report_hooks: list[Callable[[str, dict[str, Any]], None]] = []
        self.num_deaths_seen: dict[str, int] = {}  # worker id -> calls that found it dead
        self._death_signals: dict[str, asyncio.Future] = {}

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
        ids = list(self.prefill) + list(self.decode)
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self._poll_worker_forever(w), name=f"poll-{w}") for w in ids]
        tasks.append(loop.create_task(self._pair_forever(), name="pair-workers"))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _poll_worker_forever(self, worker_id: str) -> None:
        while True:
            try:
                await self.poll_worker(worker_id)
            except Exception:  # never let the loop die
                logger.exception("poll of %s failed", worker_id)
            await asyncio.sleep(self.poll_interval_s)

    async def _pair_forever(self) -> None:
        while True:
            await self._pair_wanted.wait()
            self._pair_wanted.clear()
            try:
                await self._pair()
            except Exception:
                logger.exception("pairing failed")
            for worker_id in self.prefill:  # a newly paired prefill worker is usable now, not at its next poll
                if worker_id in self._answered:
                    self._publish(worker_id)

    async def poll_once(self) -> None:
        """Poll every worker once, pair whoever needs it, then publish the reports (tests, start-up)."""
        ids = list(self.prefill) + list(self.decode)
        answered = await asyncio.gather(*(self.poll_worker(w, publish=False) for w in ids))
        await self._pair()
        for worker_id, ok in zip(ids, answered):
            if ok:
                self._publish(worker_id)

    async def poll_worker(self, worker_id: str, publish: bool = True) -> bool:
        """Ask one worker for its load; an answer updates the view (once paired), a failure marks it unhealthy."""
        try:
            rep = await self._load(worker_id)
        except Exception:
            self._answered.discard(worker_id)
            self.view.mark_unhealthy(worker_id)
            return False
        self._answered.add(worker_id)
        self._take_prefixes(worker_id, rep)
        self.reports[worker_id] = rep
        if self._instances.get(worker_id) != rep["instance_id"]:
            self._instances[worker_id] = rep["instance_id"]
            self._pair_wanted.set()
        elif not self._is_paired(worker_id):
            self._pair_wanted.set()
        if publish:
            self._publish(worker_id)
        return True

    def _publish(self, worker_id: str) -> None:
        rep = self.reports.get(worker_id)
        if rep is None or not self._is_paired(worker_id):
            return
        self.view.update(load_from_report(rep, self.prefix_hashes(worker_id)))
        for hook in self.report_hooks:
            hook(worker_id, rep)
        ids = list(self.prefill) + list(self.decode)
        if len(self.reports) == len(ids) and all(self._is_paired(w) for w in ids):
            self._ready.set()

    def mark_dead(self, worker_id: str) -> None:
        """A call found ``worker_id`` dead: route around it until it reports again (a restarted replica does),
        and wake the calls still waiting on it (``death_signal``): their answer will never come."""
        self._answered.discard(worker_id)
        self.view.mark_unhealthy(worker_id)
        self.num_deaths_seen[worker_id] = self.num_deaths_seen.get(worker_id, 0) + 1
        self.reports.get(worker_id, {})["seen_dead_at"] = time.time()
        signal = self._death_signals.pop(worker_id, None)
        if signal is not None and not signal.done():
            signal.set_result(None)

    def death_signal(self, worker_id: str) -> asyncio.Future:
        """A future resolved the next time a call finds ``worker_id`` dead (``mark_dead``)."""
        signal = self._death_signals.get(worker_id)
        if signal is None or signal.done():
            signal = self._death_signals[worker_id] = asyncio.get_running_loop().create_future()
        return signal

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

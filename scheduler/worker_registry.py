"""The thin I/O glue around the pure policy: follow the workers a directory reports, keep them paired.

Lifecycle: ``start()`` runs one loop that, every ``tick_s``, takes the
directory's members (``scheduler/directory.py``: Serve's live replicas with
their published stats, or in-process stand-ins in tests) and
  - forgets workers that left (the policy stops seeing them at once; prefill
    workers are told to drop the peer);
  - hands every new decode worker's NIXL agent info to every prefill worker
    (``add_peers``, which checks layout and protocol version) and every decode
    worker's to a new prefill worker; a prefill worker is offered to the policy
    only once paired with every live decode worker, so no request is sent to a
    prefill worker that could not write to its decode worker;
  - moves each fresh stats report into the ``LoadView`` the policy reads (a report
    older than ``max_age_s`` makes its worker unhealthy there) and to the
    ``report_hooks`` (the admission estimator measures drain rates from them);
    a worker whose newest report is older than ``refresh_after_s`` is asked
    directly (Serve's broadcast of the stats can lag; see ``_maybe_refresh``);
  - fetches a worker's prefix-cache summary when its ``prefix_version`` changed.
A call that finds a worker dead (``mark_dead``) routes around it at once and wakes
every call still waiting on it (``death_signal``).

Worker names are ``<role>-<replica id>``: a restarted replica is a new worker
with a new name, so a new handshake follows from the same diff.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from splitserve.engine.aio import cancel_and_wait
from splitserve.failures import WorkerLeft
from splitserve.scheduler.directory import Directory, Member
from splitserve.scheduler.load_view import LoadView
from splitserve.scheduler.types import WorkerLoad, WorkerRole

logger = logging.getLogger(__name__)

_PREFILL_ROLES = ("prefill",)


def load_from_stats(stats: dict[str, Any], prefix_hashes: frozenset[int] = frozenset()) -> WorkerLoad:
    return WorkerLoad(
        worker_id=stats["worker_id"], role=WorkerRole(stats["role"]), num_waiting=stats["num_waiting"],
        num_running=stats["num_running"], num_free_blocks=stats["num_free_blocks"], num_total_blocks=stats["num_total_blocks"],
        block_size=stats["block_size"], num_queued_tokens=stats["num_queued_tokens"], prefix_hashes=prefix_hashes,
        decode_step_s=stats.get("decode_step_s", 0.0), prompt_s_per_token=stats.get("prompt_s_per_token", 0.0),
    )


class WorkerRegistry:
    """The live workers by name, their latest stats, and the NIXL pairing state.

    ``track_prefixes``: fetch prefix-cache summaries so the policy can route a request to
    the worker that already holds most of its prompt.
    """

    def __init__(
        self, directory: Directory, *, tick_s: float = 0.05, max_age_s: float = 5.0, call_timeout_s: float = 5.0,
        track_prefixes: bool = True, refresh_after_s: float = 1.0,
    ):
        self.directory = directory
        self.view = LoadView(max_age_s=max_age_s)
        self.reports: dict[str, dict[str, Any]] = {}
        self.tick_s = tick_s
        self.call_timeout_s = call_timeout_s
        self.track_prefixes = track_prefixes
        self._members: dict[str, Member] = {}
        self._seen_seq: dict[str, tuple[int, float]] = {}  # worker -> (stats seq, stats time) last moved into the view
        self._paired: set[tuple[str, str]] = set()  # (prefill worker, decode worker)
        self._prefixes: dict[str, tuple[int, frozenset[int]]] = {}  # worker -> (version, hashes)
        self._fetching: set[str] = set()
        self.refresh_after_s = refresh_after_s
        self._last_new_at: dict[str, float] = {}  # worker -> when (monotonic) its newest report arrived
        self._refreshing: set[str] = set()
        self._task: asyncio.Task | None = None
        self._ready = asyncio.Event()
        self.report_hooks: list[Callable[[str, dict[str, Any]], None]] = []
        self.num_deaths_seen: dict[str, int] = {}  # worker id -> calls that found it dead
        self._death_signals: dict[str, asyncio.Future] = {}

    # ---- membership ------------------------------------------------------------------
    @property
    def prefill(self) -> dict[str, Any]:
        return {w: m.handle for w, m in self._members.items() if m.role in _PREFILL_ROLES}

    @property
    def decode(self) -> dict[str, Any]:
        return {w: m.handle for w, m in self._members.items() if m.role not in _PREFILL_ROLES}

    def handle(self, worker_id: str) -> Any:
        """The worker's handle; ``WorkerLeft`` once it left (a pairing made before it left may still name it)."""
        member = self._members.get(worker_id)
        if member is None:
            raise WorkerLeft(f"{worker_id} is no longer serving")
        return member.handle

    def role(self, worker_id: str) -> str:
        """A worker's role ("prefill", "decode", "both"); "unknown" once it left."""
        member = self._members.get(worker_id)
        return member.role if member is not None else "unknown"

    def info(self, worker_id: str) -> dict[str, Any]:
        """A worker's static facts (Ray node, cold-start phases); {} for one not (or no longer) known."""
        member = self._members.get(worker_id)
        return dict(member.info or {}) if member is not None else {}

    # ---- life cycle --------------------------------------------------------------------
    def start(self) -> None:
        """Start the loop, in a fresh ``contextvars`` context: the first HTTP request calls this, and its calls
        to the workers must not carry that request's Serve context (its cancellation, and its internal id,
        which Serve's routing uses to tell apart the calls being routed)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="worker-registry", context=contextvars.Context())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self.directory.stop()

    async def wait_ready(self, timeout_s: float) -> bool:
        """True once at least one worker reported and every known one is paired, with its prefix summary
        fetched (or until the timeout)."""
        self.start()
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    async def _run(self) -> None:
        await self.directory.start()
        while True:
            try:
                await self.sync()
            except Exception:  # never let the loop die
                logger.exception("registry sync failed")
            await asyncio.sleep(self.tick_s)

    async def sync(self) -> None:
        """One pass: membership diff, pairing, fresh stats into the view (tests call it directly)."""
        members = self.directory.members()
        for worker_id in [w for w in self._members if w not in members]:
            self._forget(worker_id, members)
        self._members = dict(members)
        await self._pair()
        for worker_id, member in members.items():
            self._take_stats(member)
            self._maybe_refresh(member)
        if (self._members and all(self._is_paired(w) for w in self._members) and self.reports.keys() >= self._members.keys()
                and not self._fetching):  # ready with every prefix summary in hand too
            self._ready.set()

    def _forget(self, worker_id: str, remaining: dict[str, Member]) -> None:
        gone = self._members[worker_id]
        logger.info("%s worker %s left", gone.role, worker_id)
        self.view.remove(worker_id)
        for table in (self.reports, self._seen_seq, self._prefixes, self._last_new_at):
            table.pop(worker_id, None)
        self._paired = {pair for pair in self._paired if worker_id not in pair}
        if gone.role not in _PREFILL_ROLES:
            for p, m in remaining.items():
                if m.role in _PREFILL_ROLES:
                    asyncio.get_running_loop().create_task(_quietly(m.handle.forget_peers.remote([worker_id])))

    async def _pair(self) -> None:
        decoders = [m for m in self._members.values() if m.role not in _PREFILL_ROLES]
        for p in [m for m in self._members.values() if m.role in _PREFILL_ROLES]:
            missing = [d for d in decoders if (p.worker_id, d.worker_id) not in self._paired]
            if not missing:
                continue
            try:
                await asyncio.wait_for(_call(p.handle.add_peers, [d.agent_info for d in missing]), self.call_timeout_s)
            except Exception as e:
                logger.warning("pairing prefill %s with %s failed: %r", p.worker_id, [d.worker_id for d in missing], e)
                continue
            self._paired.update((p.worker_id, d.worker_id) for d in missing)
            logger.info("paired prefill %s with decode %s", p.worker_id, [d.worker_id for d in missing])

    def _is_paired(self, worker_id: str) -> bool:
        """A prefill worker is usable once paired with every live decode worker; decode workers always are."""
        if self._members[worker_id].role not in _PREFILL_ROLES:
            return True
        return all((worker_id, d) in self._paired for d in self.decode)

    def _take_stats(self, member: Member) -> None:
        stats = member.stats
        if stats is None:
            return
        key = (stats.get("seq", 0), stats.get("time", 0.0))
        if self._seen_seq.get(member.worker_id) == key:
            return  # nothing new: the view's timestamp keeps ageing, so a worker that stops reporting turns unhealthy
        self._seen_seq[member.worker_id] = key
        self._last_new_at[member.worker_id] = time.monotonic()
        self.reports[member.worker_id] = stats
        self._maybe_fetch_prefixes(member, stats.get("prefix_version", -1))
        if self._is_paired(member.worker_id):
            self.view.update(load_from_stats(stats, self.prefix_hashes(member.worker_id)))
            for hook in self.report_hooks:
                hook(member.worker_id, stats)

    def _maybe_refresh(self, member: Member) -> None:
        """Serve's broadcast of routing stats can lag (Ray 2.60 delivered them every ~10 s during a deployment's
        first ~20 s here): a report older than ``refresh_after_s`` is fetched from the replica directly, one call
        in flight per worker. In steady state Serve's reports are fresh and nothing is called."""
        w = member.worker_id
        last = self._last_new_at.get(w)
        if w in self._refreshing or (last is not None and time.monotonic() - last < self.refresh_after_s):
            return
        self._refreshing.add(w)
        asyncio.get_running_loop().create_task(self._refresh(member))

    async def _refresh(self, member: Member) -> None:
        w = member.worker_id
        try:
            stats = await asyncio.wait_for(_call(member.handle.record_routing_stats), self.call_timeout_s)
            if w in self._members and isinstance(stats, dict):
                self._take_stats(replace(member, stats=stats))
        except Exception as e:  # a dead worker: its reports stay old and the view ages it out
            logger.debug("direct stats of %s failed: %r", w, e)
            self._last_new_at[w] = time.monotonic()  # try again in refresh_after_s, not at once
        finally:
            self._refreshing.discard(w)

    # ---- prefix summaries --------------------------------------------------------------
    def _maybe_fetch_prefixes(self, member: Member, version: int) -> None:
        known = self._prefixes.get(member.worker_id)
        if not self.track_prefixes or version < 0 or (known is not None and known[0] == version) or member.worker_id in self._fetching:
            return
        self._fetching.add(member.worker_id)
        asyncio.get_running_loop().create_task(self._fetch_prefixes(member, known[0] if known else -1))

    async def _fetch_prefixes(self, member: Member, known_version: int) -> None:
        try:
            summary = await asyncio.wait_for(_call(member.handle.prefix_summary, known_version), self.call_timeout_s)
            w = member.worker_id
            if summary is not None and w in self._members:
                self._prefixes[w] = (summary[0], frozenset(summary[1]))
                if w in self.reports and self._is_paired(w):  # the policy sees the new summary now, not at the next report
                    self.view.update(load_from_stats(self.reports[w], self._prefixes[w][1]))
        except Exception as e:
            logger.debug("prefix summary of %s failed: %r", member.worker_id, e)
        finally:
            self._fetching.discard(member.worker_id)

    def prefix_hashes(self, worker_id: str) -> frozenset[int]:
        """The latest prefix summary of a worker (empty when unknown)."""
        known = self._prefixes.get(worker_id)
        return known[1] if known is not None else frozenset()

    # ---- failures ----------------------------------------------------------------------
    def mark_dead(self, worker_id: str) -> None:
        """A call found ``worker_id`` dead: route around it until it reports again, and wake the calls still
        waiting on it (``death_signal``): their answer will never come."""
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

    def healthy_ids(self) -> set[str]:
        return {w.worker_id for w in self.view.snapshot() if w.is_healthy}

    def loads(self) -> list[WorkerLoad]:
        return self.view.snapshot()


async def _call(method: Any, *args: Any) -> Any:
    """``await handle.method.remote(*args)`` for Ray handles and in-process stand-ins alike."""
    result = method.remote(*args)
    return await result if asyncio.iscoroutine(result) or hasattr(result, "__await__") else result


async def _quietly(call: Any) -> None:
    try:
        await call
    except Exception:
        pass

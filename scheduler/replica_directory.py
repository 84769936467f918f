"""What the request routers of this process know about each worker deployment's replicas.

Ray Serve gives a deployment's request router (``splitserve.serve_router``) the
live replica set with each replica's metadata and latest routing stats, every
time either changes. The router runs on Serve's router thread and in a copy of
its own module (Serve pickles the router class by value), so it publishes here,
in a module imported by reference, and the ingress's ``ServeDirectory`` reads
from here on its own event loop. Each publish swaps one immutable snapshot under
a lock; readers never see a half-updated set.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping


@dataclass(frozen=True)
class ReplicaEntry:
    """One replica as Serve reports it: its id (for steering calls), static metadata and latest stats."""

    replica_id: str
    metadata: Mapping[str, Any]
    stats: Mapping[str, Any]


_lock = threading.Lock()
_snapshots: dict[str, Mapping[str, ReplicaEntry]] = {}
_version = 0


def publish(deployment: str, entries: list[ReplicaEntry]) -> None:
    """Replace ``deployment``'s replica set (called by its request router)."""
    global _version
    with _lock:
        _snapshots[deployment] = MappingProxyType({e.replica_id: e for e in entries})
        _version += 1


def remove(deployment: str, replica_id: str) -> None:
    """Drop one replica at once (its actor died; the next full publish would drop it too)."""
    global _version
    with _lock:
        current = dict(_snapshots.get(deployment, {}))
        if current.pop(replica_id, None) is not None:
            _snapshots[deployment] = MappingProxyType(current)
            _version += 1


def snapshot(deployment: str) -> Mapping[str, ReplicaEntry]:
    with _lock:
        return _snapshots.get(deployment, MappingProxyType({}))


def version() -> int:
    """Grows with every change; a reader compares it to skip unchanged snapshots."""
    return _version

"""``replica_directory``: the per-process board where request routers publish each deployment's replica set.

A publish replaces a deployment's whole set with a fresh read-only mapping and
bumps the version; ``remove`` drops one replica (bumping the version only when it
was there); a reader's earlier snapshot never changes under it. The module keeps
global state, so each test starts from an empty board (patched) and the version
is compared relative to its value at the start.
"""

from __future__ import annotations

import threading

import pytest

from splitserve.scheduler import replica_directory as rd
from splitserve.scheduler.replica_directory import ReplicaEntry

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def empty_board(monkeypatch):
    monkeypatch.setattr(rd, "_snapshots", {})


def entry(rid: str, **stats) -> ReplicaEntry:
    return ReplicaEntry(rid, {"role": "decode"}, stats)


def test_unknown_deployment_is_empty_and_read_only():
    snap = rd.snapshot("nobody")
    assert dict(snap) == {}
    with pytest.raises(TypeError):
        snap["x"] = entry("x")  # type: ignore[index]


def test_publish_replaces_the_whole_set_and_bumps_the_version():
    v0 = rd.version()
    rd.publish("decode", [entry("a", load=1), entry("b")])
    first = rd.snapshot("decode")
    assert set(first) == {"a", "b"} and first["a"].stats == {"load": 1}
    assert rd.version() == v0 + 1
    rd.publish("decode", [entry("c")])  # a replacement, not a merge
    assert set(rd.snapshot("decode")) == {"c"}
    assert set(first) == {"a", "b"}  # the earlier snapshot is untouched
    assert rd.version() == v0 + 2
    with pytest.raises(TypeError):
        first["z"] = entry("z")  # type: ignore[index]


def test_publish_with_a_repeated_id_keeps_the_last_and_empty_clears():
    rd.publish("decode", [entry("a", load=1), entry("a", load=2)])
    assert rd.snapshot("decode")["a"].stats == {"load": 2}
    v = rd.version()
    rd.publish("decode", [])
    assert dict(rd.snapshot("decode")) == {} and rd.version() == v + 1


def test_remove_drops_one_replica_and_bumps_only_on_change():
    rd.publish("decode", [entry("a"), entry("b")])
    before = rd.snapshot("decode")
    v = rd.version()
    rd.remove("decode", "a")
    assert set(rd.snapshot("decode")) == {"b"} and rd.version() == v + 1
    assert set(before) == {"a", "b"}  # readers keep their view
    rd.remove("decode", "a")  # already gone
    rd.remove("decode", "zzz")
    rd.remove("prefill", "b")  # unknown deployment: nothing created
    assert rd.version() == v + 1
    assert "prefill" not in rd._snapshots


def test_deployments_are_independent():
    rd.publish("prefill", [entry("p1")])
    rd.publish("decode", [entry("d1"), entry("d2")])
    rd.remove("decode", "p1")
    rd.remove("prefill", "d1")
    assert set(rd.snapshot("prefill")) == {"p1"} and set(rd.snapshot("decode")) == {"d1", "d2"}


def test_concurrent_publishes_count_every_change():
    v = rd.version()

    def worker(name: str) -> None:
        for i in range(200):
            rd.publish(name, [entry(f"{name}-{i}")])

    threads = [threading.Thread(target=worker, args=(f"dep{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rd.version() == v + 800
    assert all(set(rd.snapshot(f"dep{k}")) == {f"dep{k}-199"} for k in range(4))

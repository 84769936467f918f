"""``PinnedReplicaRouter`` inside Ray Serve's own routing loop (the installed Serve's ``RequestRouter``, with
stand-in replicas): a call goes to the replica it names; a call naming a replica that left fails at once; and
the next call of the same HTTP request (Serve gives every call made for one HTTP request the same internal
id) is still routed. That last one hung for ``prefill_timeout_s`` (120 s) after a scale-down, when a request's
retry went to the prefill replica that stayed.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray.serve")

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata  # noqa: E402
from ray.serve._private.request_router.common import PendingRequest  # noqa: E402

from splitserve.serve_router import PinnedReplicaRouter, ReplicaGone  # noqa: E402

pytestmark = pytest.mark.unit

DEPLOYMENT = DeploymentID(name="prefill", app_name="test-app")


class StandInReplica:
    """What the routing loop reads of a running replica."""

    def __init__(self, unique_id: str) -> None:
        self.replica_id = ReplicaID(unique_id, DEPLOYMENT)
        self.max_ongoing_requests = 8
        self.routing_stats = {"num_running": 0, "num_waiting": 0}
        self.replica_metadata = {"worker_id": f"prefill-{unique_id}"}

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return 0


def pending(target: str, internal_id: str) -> PendingRequest:
    meta = RequestMetadata(request_id="r", internal_request_id=internal_id, call_method="prefill", session_id=target)
    return PendingRequest(args=[], kwargs={}, metadata=meta)


def router() -> PinnedReplicaRouter:
    return PinnedReplicaRouter(DEPLOYMENT, DeploymentHandleSource.REPLICA, use_replica_queue_len_cache=True)


def test_a_call_goes_to_the_replica_it_names():
    async def body():
        r = router()
        stay, other = StandInReplica("stay"), StandInReplica("other")
        r.update_replicas([other, stay])
        chosen = await asyncio.wait_for(r._choose_replica_for_request(pending("stay", "http-1")), 5)
        assert chosen is stay

    asyncio.run(body())


def test_the_retry_of_a_call_to_a_replica_that_left_is_routed():
    async def body():
        r = router()
        stay = StandInReplica("stay")
        r.update_replicas([stay])  # "left" was scaled down a moment ago
        with pytest.raises(ReplicaGone, match="replica left is not"):
            await asyncio.wait_for(r._choose_replica_for_request(pending("left", "http-1")), 5)
        # the same HTTP request's next attempt, to the replica that stayed
        chosen = await asyncio.wait_for(r._choose_replica_for_request(pending("stay", "http-1")), 5)
        assert chosen is stay

    asyncio.run(body())


def test_the_registry_calls_the_workers_outside_the_http_request_that_started_it():
    """The first HTTP request starts the registry; the registry's calls (stats, prefix summaries, pairing) must not
    share that request's Serve context: concurrent calls with one internal id get each other's replicas."""
    from ray.serve.context import _get_serve_request_context, _set_request_context

    from splitserve.scheduler.worker_registry import WorkerRegistry

    seen: list[str] = []

    class Directory:
        async def start(self) -> None:
            seen.append(_get_serve_request_context()._internal_request_id)

        def members(self) -> dict:
            return {}

        async def stop(self) -> None:
            pass

    async def body():
        _set_request_context(request_id="client-request", _internal_request_id="http-1")
        registry = WorkerRegistry(Directory())
        registry.start()
        await asyncio.sleep(0.05)
        await registry.stop()
        assert seen == [""]  # a context of its own: Serve gives each of its calls a fresh internal id

    asyncio.run(body())

"""The request router of the worker deployments: it carries out the pairing policy's choice.

The policy (``scheduler/policy.py``) picks, per request, *which* prefill and
decode replica serve it; the ingress then calls each through a handle with
``options(session_id=<replica id>)``. This router sends such a call to exactly
that replica, and a call that names a replica that has gone fails at once
(``ReplicaGone``, which the router's retry handles) instead of waiting for it, and
leaves Serve's queue, so that the request's retry here is routed. A
call that names none (start-up, administration) goes to any replica.

It also publishes the live replica set with each replica's metadata and routing
stats (``splitserve.scheduler.replica_directory``) for the ingress: that is how
the ingress learns of replicas appearing, leaving and their load, with no polling
of its own. No ``FIFOMixin``: it would hand the chosen replica to whichever
request is first in the queue, not to the one that named it.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from splitserve.scheduler import replica_directory


class ReplicaGone(RuntimeError):
    """The replica a call was steered to is no longer part of its deployment."""


class PinnedReplicaRouter(RequestRouter):
    # When Serve does probe a replica's queue length, a busy engine process may answer late: wait for it
    # rather than back off (a missed probe drops the only candidate and the call waits seconds to retry).
    queue_len_response_deadline_s = 1.0

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        target = pending_request.metadata.session_id if pending_request is not None else None
        if pending_request is not None:
            # If Serve cannot take the replica we return (full, or its queue-length probe is late), it asks again;
            # without this flag it asks again at once, and this coroutine never awaits: the loop would spin and
            # starve the ingress's event loop (seen: 180,000 asks in a few seconds).
            pending_request.routing_context.should_backoff = True
        if not target:
            return [candidate_replicas]
        for replica in candidate_replicas:
            if replica.replica_id.unique_id == target:
                # The policy has decided and admission is its job: give Serve the queue length the replica
                # published, so Serve routes at once instead of probing a replica whose engine holds the GIL.
                self.on_new_queue_len_info(replica.replica_id, _published_queue_len(replica))
                return [[replica]]
        if not pending_request.future.done():
            pending_request.future.set_exception(ReplicaGone(f"replica {target} is not (or no longer) serving"))
        self._forget_pending(pending_request)
        return [candidate_replicas[:1]]  # the request is already failed; a non-empty answer ends its routing task

    def _forget_pending(self, pending_request: PendingRequest) -> None:
        """Drop a request failed here from Serve's index of pending requests. Serve keys that index by the HTTP
        request's internal id, which every call made for that request shares, and indexes a new request only
        when its id is not there yet: left in, a failed call would keep the request's next call to this
        deployment (its retry on another replica) from ever being routed."""
        index = getattr(self, "_pending_requests_by_id", None)  # Serve's own; absent in older Serve
        if index is not None and index.get(pending_request.metadata.internal_request_id) is pending_request:
            self._remove_pending_request_from_indices(pending_request)  # not another call's entry under the same id

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        replica_directory.publish(self._deployment_key(), [_entry(r) for r in replicas])

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        replica_directory.remove(self._deployment_key(), replica_id.unique_id)

    def _deployment_key(self) -> str:
        return deployment_key(self._deployment_id.app_name, self._deployment_id.name)


def _published_queue_len(replica: RunningReplica) -> int:
    stats = replica.routing_stats or {}
    ongoing = int(stats.get("num_running", 0)) + int(stats.get("num_waiting", 0))
    return max(0, min(ongoing, replica.max_ongoing_requests - 1))


def deployment_key(app_name: str, deployment_name: str) -> str:
    return f"{app_name}/{deployment_name}"


def _entry(replica: RunningReplica) -> replica_directory.ReplicaEntry:
    return replica_directory.ReplicaEntry(
        replica.replica_id.unique_id, dict(getattr(replica, "replica_metadata", None) or {}), dict(replica.routing_stats or {}),
    )

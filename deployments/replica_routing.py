"""How DeploymentHandles pick a replica: the caller may name it.

The Router decides placement (`serve_app.admission`); its answer travels as the
`pinned_to=` keyword of the calls the ingress then makes to the model replica,
and a lease goes back (`release`) to the Router replica that granted it, the
same way. Calls without one (the router knew no model replica yet: startup,
scale from zero) use Serve's power of two choices.

For the model replicas, the Router's process also keeps
`routing_state.RUNNING_REPLICAS` up to date: the replicas admission chooses from.
"""

from __future__ import annotations

import time

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from deployments import routing_state


# How long a call pinned to a replica this handle does not know yet waits for it to appear. The
# Router may learn of a new replica (scale-up) before this process does; a call sent elsewhere
# meanwhile would open a channel on the wrong replica.
PINNED_REPLICA_WAIT_S = 2.0


class PinnedReplicaRequestRouter(PowerOfTwoChoicesRequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get("pinned_to") if pending_request else None
        if target:
            pinned = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            if pinned:
                return [pinned]
            if time.time() - pending_request.created_at < PINNED_REPLICA_WAIT_S:
                pending_request.routing_context.should_backoff = True  # sleep before asking again
                return []
            # Still unknown: the replica is gone. Any replica will do.
        return await super().choose_replicas(candidate_replicas, pending_request)

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        # The replica chosen for a request goes to that request. Serve's FIFO policy would give it
        # to whichever request waits longest: under concurrent calls, a channel pinned to one
        # replica was opened on the other.
        RequestRouter._fulfill_next_pending_request(self, replica, request_metadata)


class ModelReplicaRequestRouter(PinnedReplicaRequestRouter):
    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        routing_state.RUNNING_REPLICAS = frozenset(r.replica_id.unique_id for r in replicas)

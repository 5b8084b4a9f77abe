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

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica

from deployments import routing_state


class PinnedReplicaRequestRouter(PowerOfTwoChoicesRequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        target = pending_request.kwargs.get("pinned_to") if pending_request else None
        if target:
            pinned = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            if pinned:
                return [pinned]
            # The replica is gone (or not yet visible here): any replica will do.
        return await super().choose_replicas(candidate_replicas, pending_request)


class ModelReplicaRequestRouter(PinnedReplicaRequestRouter):
    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        routing_state.RUNNING_REPLICAS.clear()
        routing_state.RUNNING_REPLICAS.update(r.replica_id.unique_id for r in replicas)

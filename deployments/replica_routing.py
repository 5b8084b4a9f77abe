"""How the router's DeploymentHandle picks a model replica.

Ray Serve's default (power of two choices) balances *requests*; one of our
requests is a whole batch. This router ranks replicas by the *sequences* this
process has in flight on each, and sends calls that name a replica
(`replica_id=` keyword, used to cancel one row of a running batch) to exactly
that replica.

It runs inside the Router deployment's process, next to the BatchScheduler,
and shares state with it through `routing_state`.
"""

from __future__ import annotations

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica

from deployments import routing_state


class SequenceAwareRequestRouter(PowerOfTwoChoicesRequestRouter):
    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        routing_state.RUNNING_REPLICAS.clear()
        routing_state.RUNNING_REPLICAS.update(r.replica_id.unique_id for r in replicas)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        target = pending_request.kwargs.get("replica_id") if pending_request else None
        if target:
            pinned = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            # If the replica is gone, any replica will do: its sequences went with it.
            return [pinned or candidate_replicas]
        ranked = sorted(candidate_replicas, key=lambda r: routing_state.LOAD.get(r.replica_id.unique_id, 0))
        return [ranked[:1], ranked[1:]] if len(ranked) > 1 else [ranked]

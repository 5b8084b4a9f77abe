"""Scale model replicas on queued + in-flight *sequences*, not requests.

One request to a replica is a whole batch, so Serve's request-count policy
would see 1 where there are 32 units of work; and the router's own queue is
invisible to it. Each replica reports, through `record_autoscaling_stats`:

- `in_flight_sequences`: sequences running or waiting in its engine;
- `router_queue_length`: sequences waiting in the router (the same global
  number from every replica: the policy takes the max, not the sum).

Serve wraps the policy with the upscale/downscale delays (and min/max bounds)
from the deployment's autoscaling_config; the policy also clamps to the bounds
itself, so it is correct when called on its own.
"""

from __future__ import annotations

import math
from typing import Any

IN_FLIGHT = "in_flight_sequences"
ROUTER_QUEUE = "router_queue_length"


def desired_replicas(total_sequences: float, target_per_replica: float, min_replicas: int,
                     max_replicas: int) -> int:
    """ceil(sequences / target), within [min, max]."""
    wanted = math.ceil(total_sequences / target_per_replica) if total_sequences > 0 else 0
    return max(min_replicas, min(max_replicas, wanted))


class SequenceAutoscalingPolicy:
    """A Ray Serve deployment-level policy (instantiated once by the controller)."""

    def __init__(self, target_sequences_per_replica: float = 16):
        self.target = float(target_sequences_per_replica)

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        in_flight = metrics.get(IN_FLIGHT) or {}
        queued = metrics.get(ROUTER_QUEUE) or {}
        if not in_flight and ctx.current_num_replicas > 0:
            # Replicas are up but have not reported yet: hold.
            return ctx.target_num_replicas, {}
        total = sum(in_flight.values()) + max(queued.values(), default=0.0)
        desired = desired_replicas(total, self.target, ctx.capacity_adjusted_min_replicas,
                                   ctx.capacity_adjusted_max_replicas)
        return desired, {"total_sequences": total}

"""Router: admission and placement. Its client, `RoutedBackend` (routed_backend.py), runs in the ingress.

The Router owns the waiting queue (`serve_app.admission`): it answers each
request with a replica and a lease, nothing more. Tokens go straight from the
model replica to the ingress that asked, so the router costs two small calls
per request, not a message per token, and its death loses no running stream.

Several Router replicas (`router_replicas`) split each model replica's slots
between them: each admits into its own share, so no shared state is needed
and together they never overfill a replica.

It imports no torch and no model code: a router that died is back within seconds.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import routing_state
from deployments.process import start_process
from deployments.metrics import router_metrics
from serve_app.admission import AdmissionQueue
from serve_app.config import ModelServingArgs
from serve_app.engine.engine_config import BLOCK_SIZE

logger = logging.getLogger("ray.serve")


@serve.deployment(name="Router")
class Router:
    """One model's admission (`build_app` names it Router-<model>): the same for generation
    and embedding models; a sequence is a generated choice or one input to embed."""

    def __init__(self, replicas: DeploymentHandle, args: ModelServingArgs):
        self.args = start_process(args, args.model_name)
        self.metrics = router_metrics()
        # Initializing the handle makes its request router track the running replicas
        # (routing_state.RUNNING_REPLICAS); this process never sends tokens through it.
        self._replicas = replicas.options()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.queue = AdmissionQueue(
            max_batch_size=self.args.max_batch_size,
            batch_wait_timeout_s=self.args.batch_wait_timeout_s,
            max_queue_len=self.args.max_queue_len,
            slots_per_replica=max(1, math.ceil(self.args.max_batch_size / self.args.router_replicas)),
            replicas=lambda: routing_state.RUNNING_REPLICAS,
            retry_after_s=self.args.retry_after_s,
            lease_timeout_s=self.args.lease_timeout_s,
            affinity_tolerance=(self.args.prefix_routing_max_imbalance
                                if self.args.prefix_aware_routing and self.args.enable_prefix_caching else None),
            prefix_index_blocks=self.args.kv_tokens(0) // BLOCK_SIZE,
            wake=self._wake_replicas,
        )
        self._waking: asyncio.Task | None = None

    async def admit(self, num_sequences: int, key: str | None = None,
                    prefix: tuple[bytes, ...] = ()) -> tuple[str, int | str, str]:
        """Wait in the queue (until a model replica is known and has room); return (this
        router's replica id, lease id, the model replica's id). The lease goes back with `release(lease_id, pinned_to=<router>)`;
        a caller that never got the answer sends `abandon(key)` to every router. `prefix`: the
        prompt's block hashes (placement near its cached prefix)."""
        started = time.monotonic()
        try:
            lease_id, model_replica = await self.queue.admit(num_sequences, key, prefix)
        finally:
            self._export_load()
        self.metrics["queue_time"].observe(time.monotonic() - started)
        return self.replica_id, lease_id, model_replica

    def _wake_replicas(self) -> None:
        """Requests wait and no replica is known: one call that waits for a replica (see ModelReplica.wake)."""
        if self._waking is None or self._waking.done():
            # In an empty context: Serve cancels a request's pending calls with the request, and
            # this one belongs to no request (it would inherit the first admit's).
            self._waking = contextvars.Context().run(asyncio.get_running_loop().create_task,
                                                     self._wait_for_a_replica())

    async def _wait_for_a_replica(self) -> None:
        try:
            await self._replicas.wake.remote()
        except Exception as e:  # e.g. a replica that failed to start: the admission loop asks again
            logger.warning("waiting for a model replica: %s", type(e).__name__)

    def release(self, lease_id: int | str, pinned_to: str | None = None) -> None:
        self.queue.release(lease_id)
        self._export_load()

    def renew(self, lease_ids: list[int | str], pinned_to: str | None = None) -> None:
        """The ingress holding these leases is alive (see RoutedBackend._renew_leases)."""
        self.queue.renew(lease_ids)

    def _export_load(self) -> None:
        self.metrics["queue_length"].set(self.queue.queue_length)
        self.metrics["in_flight"].set(self.queue.in_flight)

    def abandon(self, key: str) -> None:
        self.queue.abandon(key)

    def ready_replicas(self) -> int:
        """Model replicas that are running (initialized and healthy), as Serve tells this router."""
        return len(routing_state.RUNNING_REPLICAS)

    def queue_length(self) -> int:
        # Every model replica asks each second: the beat that keeps the gauges current while
        # requests wait (admit and release refresh them too).
        self._export_load()
        return self.queue.queue_length

    def stats(self) -> dict:
        return {**self.queue.stats(), "replicas": len(routing_state.RUNNING_REPLICAS)}


def sum_router_stats(stats: list[dict]) -> dict:
    """One view of several Router replicas' counters."""
    total: dict = {"routers": len(stats)}
    for s in stats:
        for key, value in s.items():
            if key == "batch_size_histogram" or key == "load_by_replica":
                merged = total.setdefault(key, {})
                for k, v in value.items():
                    merged[k] = merged.get(k, 0) + v
            elif key in ("max_batch_size_seen", "replicas"):
                total[key] = max(total.get(key, 0), value)
            else:
                total[key] = total.get(key, 0) + value
    if "batch_size_histogram" in total:
        total["batch_size_histogram"] = dict(sorted(total["batch_size_histogram"].items()))
    return total

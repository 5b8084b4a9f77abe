"""Router: owns the waiting queue and sends dynamically formed batches to replicas."""

from __future__ import annotations

import asyncio

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import routing_state
from serve_app.batching import BatchScheduler
from serve_app.config import AppArgs
from serve_app.engine.types import GenerationRequest, SequenceOutput


@serve.deployment(name="Router")
class Router:
    def __init__(self, replicas: DeploymentHandle, args: dict):
        self.args = AppArgs.model_validate(args)
        self._replicas = replicas
        self._batches = replicas.options(stream=True)
        self.scheduler = BatchScheduler(
            dispatch=lambda requests: self._batches.generate_batch.remote(requests),
            cancel_remote=self._cancel_on_replica,
            max_batch_size=self.args.max_batch_size,
            batch_wait_timeout_s=self.args.batch_wait_timeout_s,
            max_queue_len=self.args.max_queue_len,
            capacity=self._capacity,
            retry_after_s=self.args.retry_after_s,
            stream_interval_s=self.args.stream_interval_s,
        )
        # Share per-replica sequence counts with the handle's request router.
        self.scheduler.load_by_replica = routing_state.LOAD

    def _capacity(self) -> int:
        # One full batch per running replica; before the handle has seen any
        # replica (startup, scale from zero), send one batch so it can wait there.
        return max(1, len(routing_state.RUNNING_REPLICAS)) * self.args.max_batch_size

    async def _cancel_on_replica(self, replica_id: str | None, request_ids: list[str]) -> None:
        await self._replicas.cancel.remote(request_ids, replica_id=replica_id)

    async def generate(self, request: GenerationRequest) -> SequenceOutput:
        return await self.scheduler.complete(request)

    async def generate_stream(self, request: GenerationRequest):
        async for outputs in self.scheduler.stream(request):
            yield outputs

    def queue_length(self) -> int:
        return self.scheduler.queue_length

    async def stats(self, include_replicas: bool = False) -> dict:
        """Queue and batching counters; with `include_replicas`, what each replica
        reports about itself (a broadcast: for operators and tests, not hot paths)."""
        stats = {**self.scheduler.stats(), "replicas": len(routing_state.RUNNING_REPLICAS)}
        if include_replicas:
            infos = await asyncio.wait_for(self._replicas.broadcast("info").results_async(), timeout=10)
            stats["replica_info"] = sorted(infos, key=lambda r: r["replica_id"])
        return stats

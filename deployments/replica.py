"""ModelReplica: loads the model once and streams generated tokens to its callers."""

from __future__ import annotations

import asyncio
import logging
import os

import ray
import torch
from ray import serve

from serve_app.autoscaling import IN_FLIGHT, ROUTER_QUEUE
from serve_app.config import AppArgs
from serve_app.engine.factory import build_engine
from serve_app.engine.loading import select_device
from serve_app.engine.types import GenerationRequest

logger = logging.getLogger("ray.serve")


@serve.deployment(name="ModelReplica")
class ModelReplica:
    def __init__(self, args: dict):
        self.args = AppArgs.model_validate(args)
        # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned us, so "cuda" is exactly those.
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        self.device = select_device(self.args.device)
        if self.args.torch_threads or self.device.type == "cpu":
            # Ray pins torch to one thread per reserved CPU; a CPU replica computes faster on all cores.
            torch.set_num_threads(self.args.torch_threads or os.cpu_count() or 1)
        self.engine = build_engine(self.args, self.device)
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self._router = serve.get_deployment_handle("Router", context.app_name)
        logger.info("replica %s: model %s on %s (assigned GPUs %s, CUDA_VISIBLE_DEVICES=%s), KV cache %d tokens",
                    self.replica_id, self.args.model, self.device, self.gpu_ids or "none",
                    os.environ.get("CUDA_VISIBLE_DEVICES", ""), self.engine.engine.cache.capacity_tokens)

    async def stream(self, requests: list[GenerationRequest], replica_id: str | None = None):
        """Generate; yield one list of outputs per (paced) engine step until all have finished.

        `replica_id` is read by the caller's request router (it pins the call to this
        replica); closing the stream cancels what is unfinished.
        """
        async for outputs in self.engine.stream(requests):
            yield outputs

    def info(self) -> dict:
        engine = self.engine.engine
        return {
            "replica_id": self.replica_id,
            "device": str(self.device),
            "gpu_ids": self.gpu_ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "in_flight_sequences": self.engine.num_sequences,
            "running_sequences": self.engine.num_running,
            "engine_steps": self.engine.steps,
            "cancelled_sequences": engine.num_cancelled,
            "max_model_len": engine.max_model_len,
            "max_num_batched_tokens": engine.scheduler.max_num_batched_tokens,
            "kv_cache_tokens": engine.cache.capacity_tokens,
            "kv_cache_free_blocks": engine.cache.num_free_blocks,
            "kv_cache_blocks": engine.cache.num_blocks,
            "torch_threads": torch.get_num_threads(),
        }

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Load for the autoscaling policy, in sequences (see serve_app.autoscaling)."""
        try:
            lengths = await asyncio.wait_for(self._router.broadcast("queue_length").results_async(), timeout=1.0)
            queued = sum(lengths)
        except Exception:  # a router is busy or restarting: report what we know
            queued = 0
        return {IN_FLIGHT: float(self.engine.num_sequences), ROUTER_QUEUE: float(queued)}

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the engine thread has stopped")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

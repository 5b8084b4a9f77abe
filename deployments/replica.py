"""ModelReplica: loads the model once and runs batches through the engine."""

from __future__ import annotations

import asyncio
import logging
import os

import ray
import torch
from ray import serve

from serve_app.autoscaling import IN_FLIGHT, ROUTER_QUEUE
from serve_app.config import AppArgs
from serve_app.engine.async_engine import AsyncEngine
from serve_app.engine.batch_engine import BatchEngine
from serve_app.engine.loading import context_length, eos_token_ids, load_model, select_device
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
        model, tokenizer = load_model(self.args.model, self.args.dtype, self.device)
        self.max_model_len = context_length(model.config, tokenizer, self.args.max_model_len)
        self.engine = AsyncEngine(BatchEngine(
            model, tokenizer, eos_token_ids(model, tokenizer),
            max_batch_size=self.args.max_batch_size, max_model_len=self.max_model_len,
        ), stream_interval_s=self.args.stream_interval_s)
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self._router = serve.get_deployment_handle("Router", context.app_name)
        logger.info("replica %s: model %s on %s (assigned GPUs %s, CUDA_VISIBLE_DEVICES=%s)",
                    self.replica_id, self.args.model, self.device, self.gpu_ids or "none",
                    os.environ.get("CUDA_VISIBLE_DEVICES", ""))

    async def generate_batch(self, requests: list[GenerationRequest]):
        """Stream a batch: a header naming this replica, then one list of outputs per engine step."""
        yield {"replica_id": self.replica_id}
        async for outputs in self.engine.generate(requests):
            yield outputs

    def cancel(self, request_ids: list[str], replica_id: str | None = None) -> None:
        """Stop these sequences at the next step (`replica_id` is for routing only)."""
        self.engine.cancel(request_ids)

    def info(self) -> dict:
        return {
            "replica_id": self.replica_id,
            "device": str(self.device),
            "gpu_ids": self.gpu_ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "in_flight_sequences": self.engine.num_sequences,
            "running_sequences": self.engine.num_running,
            "engine_steps": self.engine.steps,
            "max_model_len": self.max_model_len,
            "torch_threads": torch.get_num_threads(),
        }

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Load for the autoscaling policy, in sequences (see serve_app.autoscaling)."""
        try:
            queued = await asyncio.wait_for(self._router.queue_length.remote(), timeout=1.0)
        except Exception:  # the router is busy or restarting: report what we know
            queued = 0
        return {IN_FLIGHT: float(self.engine.num_sequences), ROUTER_QUEUE: float(queued)}

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the engine thread has stopped")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

"""EmbeddingReplica: loads an embedding model once and embeds what its Router admits.

Callers (the ingress's `RoutedBackend.embed`) send token ids, already validated, and get
back one float32 vector per input; the batching by tokens is the engine's
(`serve_app.engine.embedding.EmbeddingEngine`).
"""

from __future__ import annotations

import asyncio
import logging
import os

import numpy as np
import ray
import torch
from ray import serve

from deployments.process import start_process
from deployments.metrics import embedding_replica_metrics
from serve_app.autoscaling import IN_FLIGHT, ROUTER_QUEUE
from serve_app.config import ModelServingArgs
from serve_app.engine.embedding import EmbeddingEngine, EmbeddingModel
from serve_app.engine.loading import select_device
from serve_app.engine.precision import choose_dtype
from serve_app.protocol import APIError

logger = logging.getLogger("ray.serve")


@serve.deployment(name="EmbeddingReplica")
class EmbeddingReplica:
    def __init__(self, args: ModelServingArgs):
        self.args = start_process(args, args.model_name)
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        self.device = select_device(self.args.device)
        if self.args.torch_threads or self.device.type == "cpu":
            torch.set_num_threads(self.args.cpu_threads(os.cpu_count() or 1))
        dtype, why = choose_dtype(self.args.dtype, self.device)
        self.engine = EmbeddingEngine(
            lambda: EmbeddingModel.load(self.args.model, dtype, self.device, self.args.max_model_len),
            token_budget=self.args.step_token_budget(self.device.type),
        )
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self._router = serve.get_deployment_handle(self.args.router_deployment, context.app_name)
        logger.info("embedding replica %s: model %s on %s in %s (%s), %d dimensions, %s pooling%s, %d tokens per "
                    "forward", self.replica_id, self.args.model, self.device, dtype, why, self.engine.spec.dimensions,
                    self.engine.spec.pooling, ", normalized" if self.engine.spec.normalize else "",
                    self.engine.token_budget)

    async def embed(self, inputs: list[list[int]], pinned_to: str | None = None) -> np.ndarray:
        """[len(inputs), dimensions] float32. `pinned_to` pins the call to this replica (read by
        the caller's request router)."""
        try:
            return await self.engine.embed(inputs)
        except (RuntimeError, ValueError) as e:
            raise APIError(500, str(e), type="server_error", code="embedding_failed") from None

    def wake(self) -> None:
        """Nothing: see ModelReplica.wake (a Router waiting for a replica calls it)."""

    def info(self) -> dict:
        s = self.engine.stats
        return {
            "replica_id": self.replica_id,
            "task": "embed",
            "device": str(self.device),
            "gpu_ids": self.gpu_ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "in_flight_inputs": self.engine.in_flight,
            "forwards": s.forwards,
            "inputs_embedded": s.inputs,
            "tokens_embedded": s.tokens,
            "padded_tokens": s.padded_tokens,
            "forward_ms_mean": 1000 * s.seconds / max(1, s.forwards),
            "inputs_per_forward_mean": s.inputs / max(1, s.forwards),
            "token_budget": self.engine.token_budget,
            "dimensions": self.engine.spec.dimensions,
            "max_model_len": self.engine.spec.max_model_len,
            "torch_threads": torch.get_num_threads(),
        }

    def _export_metrics(self) -> None:
        m = embedding_replica_metrics()
        m["running"].set(self.engine.in_flight)
        log = self.engine.stats.log
        for _ in range(len(log)):
            tokens, rows, seconds = log.popleft()
            m["step_tokens"].observe(tokens)
            m["step_rows"].observe(rows)
            m["step_time"].observe(seconds)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Load for the autoscaling policy, in inputs (see serve_app.autoscaling); also the metrics beat."""
        self._export_metrics()
        try:
            lengths = await asyncio.wait_for(self._router.broadcast("queue_length").results_async(), timeout=1.0)
            queued = sum(lengths)
        except Exception:  # a router is busy or restarting: report what we know
            queued = 0
        return {IN_FLIGHT: float(self.engine.in_flight), ROUTER_QUEUE: float(queued)}

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the embedding thread has stopped")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

"""ModelReplica: loads the model once and streams generated tokens to its callers.

Callers (ingress processes) open one `channel` per replica and submit requests
into it: each engine step then costs one message per calling process, whatever
the number of requests. `ReplicaChannel` is the caller's end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid

import ray
import torch
from ray import serve

from deployments.process import start_process
from deployments.metrics import replica_metrics
from deployments.replica_channel import CALLER_GONE_S, KEEPALIVE_S, ChannelClosed, actor_exists
from serve_app.autoscaling import IN_FLIGHT, ROUTER_QUEUE
from serve_app.config import ModelServingArgs
from serve_app.engine.async_engine import OutputChannel
from serve_app.engine.factory import build_engine
from serve_app.engine.loading import select_device
from serve_app.engine.types import GenerationRequest

logger = logging.getLogger("ray.serve")

# A channel with nothing in flight closes after this long, so a replica being
# removed is not held open by idle channels (its callers reopen on demand).
CHANNEL_IDLE_CLOSE_S = 5.0


@serve.deployment(name="ModelReplica")
class ModelReplica:
    def __init__(self, args: ModelServingArgs):
        self.args = start_process(args, args.model_name)
        self._exported: dict[str, int] = {}  # counter totals already exported (see _export_metrics)
        # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned us, so "cuda" is exactly those.
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        self.device = select_device(self.args.device)
        if self.args.torch_threads or self.device.type == "cpu":
            # Ray pins torch to one thread per reserved CPU; a CPU replica computes faster on its share of the cores.
            torch.set_num_threads(self.args.cpu_threads(os.cpu_count() or 1))
        self.engine = build_engine(self.args, self.device)
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self._router = serve.get_deployment_handle(self.args.router_deployment, context.app_name)
        self._channels: dict[str, OutputChannel] = {}
        self._seen: dict[str, float] = {}  # channel id -> when its caller last showed it is alive
        self.misrouted = 0  # calls pinned to another replica that reached this one (should stay 0)
        logger.info("replica %s: model %s on %s (assigned GPUs %s, CUDA_VISIBLE_DEVICES=%s), KV cache %d tokens",
                    self.replica_id, self.args.model, self.device, self.gpu_ids or "none",
                    os.environ.get("CUDA_VISIBLE_DEVICES", ""), self.engine.stats()["kv_cache_tokens"])

    def wake(self) -> None:
        """Nothing: the call itself matters. A Router with requests waiting and no replica known
        makes it through its handle, which is what makes Serve start a replica from zero."""

    async def channel(self, caller: tuple[str, str] | None = None, pinned_to: str | None = None):
        """A stream for one caller (`caller`: its actor's name and namespace, when it is one):
        first its channel id, then one list of outputs per (paced) engine step for every request
        submitted into it. Ends when idle, or when the caller is gone."""
        self._check_pin(pinned_to)
        channel_id = uuid.uuid4().hex
        channel = self._channels[channel_id] = OutputChannel(self.engine)
        self._seen[channel_id] = time.monotonic()
        try:
            yield channel_id
            while True:
                try:
                    async with asyncio.timeout(KEEPALIVE_S if channel.pending else CHANNEL_IDLE_CLOSE_S):
                        outputs = await channel.next()
                except TimeoutError:
                    if not channel.pending:
                        return  # submit() runs on this same loop: nothing can slip in now
                    outputs = None
                # Checked whether or not outputs flow: Serve keeps draining a dead caller's stream.
                if channel.pending and time.monotonic() - self._seen[channel_id] > CALLER_GONE_S:
                    if caller is not None and await asyncio.to_thread(actor_exists, caller):
                        self._seen[channel_id] = time.monotonic()  # alive; its touches go elsewhere
                    else:
                        logger.warning("channel %s: its caller is gone; stopping its %d sequences",
                                       channel_id, len(channel.pending))
                        return
                if outputs:
                    yield outputs
        finally:
            del self._channels[channel_id]
            self._seen.pop(channel_id, None)
            channel.close()  # the caller left: cancel what it had in flight

    def touch(self, channel_id: str, pinned_to: str | None = None) -> None:
        """The caller of this channel is alive (ReplicaChannel sends this while it has requests here)."""
        if channel_id in self._seen:
            self._seen[channel_id] = time.monotonic()

    async def submit(self, channel_id: str, requests: list[GenerationRequest], pinned_to: str | None = None):
        """Start these requests; their outputs go to the channel."""
        self._check_pin(pinned_to)
        channel = self._channels.get(channel_id)
        if channel is None:
            raise ChannelClosed(f"channel {channel_id} is closed")
        self._seen[channel_id] = time.monotonic()
        channel.submit(requests)

    def cancel(self, request_ids: list[str], pinned_to: str | None = None) -> None:
        """Stop these sequences at the next engine step."""
        self.engine.cancel(request_ids)

    def _check_pin(self, pinned_to: str | None) -> None:
        if pinned_to is not None and pinned_to != getattr(self, "replica_id", pinned_to):
            self.misrouted += 1
            logger.warning("a call pinned to replica %s reached replica %s", pinned_to, self.replica_id)

    def info(self) -> dict:
        return {
            "replica_id": self.replica_id,
            "device": str(self.device),
            "gpu_ids": self.gpu_ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "torch_threads": torch.get_num_threads(),
            "misrouted_calls": self.misrouted,
            **self.engine.stats(),
        }

    def _export_metrics(self) -> None:
        m = replica_metrics()
        stats = self.engine.stats()
        m["running"].set(stats["running_sequences"])
        m["waiting"].set(stats["engine_sequences"] - stats["running_sequences"])
        m["kv_usage"].set(1 - stats["kv_cache_free_blocks"] / max(1, stats["kv_cache_blocks"]))
        log = self.engine.step_log
        for _ in range(len(log)):
            tokens, rows, seconds = log.popleft()
            m["step_tokens"].observe(tokens)
            m["step_rows"].observe(rows)
            m["step_time"].observe(seconds)
        for name in ("draft_tokens", "accepted_draft_tokens", "prefix_cache_queries", "prefix_cache_hits"):
            total = stats[name]  # counters: what is new since the last beat
            if total > self._exported.get(name, 0):
                m[name].inc(total - self._exported.get(name, 0))
                self._exported[name] = total

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Load for the autoscaling policy, in sequences (see serve_app.autoscaling).
        Serve calls this every `metrics_interval_s`: the metrics are exported on the same beat."""
        self._export_metrics()
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

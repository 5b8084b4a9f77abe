"""ModelReplica: loads the model once and streams generated tokens to its callers.

Callers (ingress processes) open one `channel` per replica and submit requests
into it: each engine step then costs one message per calling process, whatever
the number of requests. `ReplicaChannel` is the caller's end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from contextlib import aclosing

import ray
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import metrics, quiet_logs
from deployments.detached import call_detached
from deployments.metrics import replica_metrics
from serve_app.autoscaling import IN_FLIGHT, ROUTER_QUEUE
from serve_app.config import ModelServingArgs
from serve_app.engine.async_engine import OutputChannel
from serve_app.engine.factory import build_engine
from serve_app.engine.loading import select_device
from serve_app.engine.pacing import PacedReader
from serve_app.engine.types import GenerationRequest, coalesce

logger = logging.getLogger("ray.serve")

# A channel with nothing in flight closes after this long, so a replica being
# removed is not held open by idle channels (its callers reopen on demand).
CHANNEL_IDLE_CLOSE_S = 5.0


class ChannelClosed(RuntimeError):
    """Submitted into a channel that no longer exists: open a new one."""


@serve.deployment(name="ModelReplica")
class ModelReplica:
    def __init__(self, args: dict):
        quiet_logs.install()
        self.args = ModelServingArgs.model_validate(args)
        metrics.set_enabled(self.args.metrics, model_name=self.args.model_name)
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
        logger.info("replica %s: model %s on %s (assigned GPUs %s, CUDA_VISIBLE_DEVICES=%s), KV cache %d tokens",
                    self.replica_id, self.args.model, self.device, self.gpu_ids or "none",
                    os.environ.get("CUDA_VISIBLE_DEVICES", ""), self.engine.engine.blocks.capacity_tokens)

    async def stream(self, requests: list[GenerationRequest], replica_id: str | None = None):
        """Generate; yield one list of outputs per (paced) engine step until all have finished.

        `replica_id` is read by the caller's request router (it pins the call to this
        replica); closing the stream cancels what is unfinished.
        """
        async with aclosing(self.engine.stream(requests)) as outputs_stream:
            async for outputs in outputs_stream:
                yield outputs

    async def channel(self, replica_id: str | None = None):
        """A stream for one caller: first its channel id, then one list of outputs per
        (paced) engine step for every request submitted into it. Ends when idle."""
        channel_id = uuid.uuid4().hex
        channel = self._channels[channel_id] = OutputChannel(self.engine)
        try:
            yield channel_id
            while True:
                try:
                    async with asyncio.timeout(None if channel.pending else CHANNEL_IDLE_CLOSE_S):
                        outputs = await channel.next()
                except TimeoutError:
                    if not channel.pending:
                        return  # submit() runs on this same loop: nothing can slip in now
                    continue
                yield outputs
        finally:
            del self._channels[channel_id]
            channel.close()  # the caller left: cancel what it had in flight

    async def submit(self, channel_id: str, requests: list[GenerationRequest], replica_id: str | None = None):
        """Start these requests; their outputs go to the channel."""
        channel = self._channels.get(channel_id)
        if channel is None:
            raise ChannelClosed(f"channel {channel_id} is closed")
        channel.submit(requests)

    def cancel(self, request_ids: list[str], replica_id: str | None = None) -> None:
        """Stop these sequences at the next engine step."""
        self.engine.cancel(request_ids)

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
            "engine_step_ms_mean": 1000 * self.engine.step_seconds / max(1, self.engine.steps),
            "engine_tokens_per_step_mean": self.engine.step_tokens / max(1, self.engine.steps),
            "cancelled_sequences": engine.num_cancelled,
            "draft_tokens": engine.draft_tokens,
            "accepted_draft_tokens": engine.accepted_draft_tokens,
            "max_model_len": engine.max_model_len,
            "max_num_batched_tokens": engine.scheduler.max_num_batched_tokens,
            "dtype": str(engine.dtype).removeprefix("torch."),
            "dtype_reason": engine.dtype_reason,
            "kv_cache_dtype": str(engine.kv_dtype).removeprefix("torch."),
            "kv_cache_dtype_reason": engine.kv_dtype_reason,
            "runner": engine.runner.name,
            "kv_cache_tokens": engine.blocks.capacity_tokens,
            "kv_cache_free_blocks": engine.blocks.num_free_blocks,
            "kv_cache_blocks": engine.blocks.num_blocks,
            "prefix_cache_blocks": engine.blocks.num_cached_blocks,
            "prefix_cache_queries": engine.blocks.queries,
            "prefix_cache_hits": engine.blocks.hits,
            "torch_threads": torch.get_num_threads(),
        }

    def _export_metrics(self) -> None:
        m = replica_metrics()
        engine = self.engine.engine
        m["running"].set(self.engine.num_running)
        m["waiting"].set(self.engine.num_sequences - self.engine.num_running)
        m["kv_usage"].set(1 - engine.blocks.num_free_blocks / max(1, engine.blocks.num_blocks))
        log = self.engine.step_log
        for _ in range(len(log)):
            tokens, rows, seconds = log.popleft()
            m["step_tokens"].observe(tokens)
            m["step_rows"].observe(rows)
            m["step_time"].observe(seconds)
        totals = {"draft_tokens": engine.draft_tokens, "accepted_draft_tokens": engine.accepted_draft_tokens,
                  "prefix_cache_queries": engine.blocks.queries, "prefix_cache_hits": engine.blocks.hits}
        for name, total in totals.items():  # counters: what is new since the last beat
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


class ReplicaChannel:
    """The caller's end of one `ModelReplica.channel`: hands each output to the request it
    belongs to. When the channel fails or ends, every request still reading it gets the error."""

    def __init__(self, replicas: DeploymentHandle, replica_id: str):
        self.replica_id = replica_id
        self.channel_id: str | None = None
        self.inboxes: dict[str, asyncio.Queue] = {}
        self.closed = False
        self._ready = asyncio.Event()
        self._stream = replicas.options(stream=True).channel.remote(replica_id=replica_id)
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def wait_ready(self) -> None:
        await self._ready.wait()
        if self.channel_id is None:
            raise ChannelClosed(f"could not open a channel to replica {self.replica_id}")

    async def _read(self) -> None:
        ending: Exception = ChannelClosed(f"the channel to replica {self.replica_id} ended")
        try:
            async for message in self._stream:
                if isinstance(message, str):
                    self.channel_id = message
                    self._ready.set()
                    continue
                for out in message:
                    inbox = self.inboxes.get(out.request_id)
                    if inbox is not None:
                        inbox.put_nowait(out)
        except Exception as e:  # the replica died or the call failed: tell every reader
            ending = e
        finally:
            self.closed = True
            self._ready.set()
            for inbox in self.inboxes.values():
                inbox.put_nowait(ending)


async def stream_via_channel(channels: dict[str, ReplicaChannel], replicas: DeploymentHandle, replica_id: str,
                             requests: list[GenerationRequest]):
    """Run requests on one replica through this process's channel to it (opened on demand);
    yield lists of outputs until all have finished. Leaving early cancels the rest."""
    inbox: asyncio.Queue = asyncio.Queue()
    ids = [r.request_id for r in requests]
    for attempt in (1, 2):
        channel = channels.get(replica_id)
        if channel is None or channel.closed:
            channel = channels[replica_id] = ReplicaChannel(replicas, replica_id)
        await channel.wait_ready()
        for rid in ids:
            channel.inboxes[rid] = inbox
        try:
            await replicas.submit.remote(channel.channel_id, requests, replica_id=replica_id)
            break
        except ChannelClosed:  # it closed while idle just as we submitted: open another
            for rid in ids:
                channel.inboxes.pop(rid, None)
            if attempt == 2:
                raise
    pending = set(ids)
    try:
        reader = PacedReader(inbox, 0.0)  # everything that arrived, as one batch
        while pending:
            items = await reader.next_batch()
            for item in items:
                if isinstance(item, Exception):
                    raise item
            batch = coalesce(items)
            for out in batch:
                if out.finished:
                    pending.discard(out.request_id)
            yield batch
    finally:
        for rid in ids:
            channel.inboxes.pop(rid, None)
        if pending:
            call_detached(replicas.cancel, list(pending), replica_id=replica_id)

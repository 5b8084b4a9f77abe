"""Router: admission and placement. Its client, `RoutedBackend`, runs in the ingress.

The Router owns the waiting queue (`serve_app.admission`): it answers each
request with a replica and a lease, nothing more. Tokens go straight from the
model replica to the ingress that asked, so the router costs two small calls
per request, not a message per token, and its death loses no running stream.

Several Router replicas (`router_replicas`) split each model replica's slots
between them: each admits into its own share, so no shared state is needed
and together they never overfill a replica.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle

from deployments import metrics, quiet_logs, routing_state
from deployments.detached import broadcast_detached, call_detached
from deployments.metrics import RequestMetrics, record_embedding, router_metrics
from deployments.replica import ChannelClosed, ReplicaChannel, stream_via_channel
from serve_app.admission import AdmissionQueue
from serve_app.config import ModelServingArgs
from serve_app.embeddings import CoalescingBackend
from serve_app.engine.engine_config import BLOCK_SIZE
from serve_app.engine.prefix_hash import block_hashes, sequence_salt
from serve_app.engine.types import GenerationRequest, SequenceOutput
from serve_app.protocol import APIError

logger = logging.getLogger("ray.serve")

MAX_PREFIX_BLOCKS = 512  # a placement hint: the first 8k tokens of a prompt say enough


@serve.deployment(name="Router")
class Router:
    """One model's admission (`build_app` names it Router-<model>): the same for generation
    and embedding models; a sequence is a generated choice or one input to embed."""

    def __init__(self, replicas: DeploymentHandle, args: dict):
        quiet_logs.install()
        self.args = ModelServingArgs.model_validate(args)
        metrics.set_enabled(self.args.metrics, model_name=self.args.model_name)
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
        )

    async def admit(self, num_sequences: int, key: str | None = None,
                    prefix: tuple[bytes, ...] = ()) -> tuple[str, int | str, str | None]:
        """Wait in the queue; return (this router's replica id, lease id, model replica id or
        None = any replica). The lease goes back with `release(lease_id, replica_id=<router>)`;
        a caller that never got the answer sends `abandon(key)` to every router. `prefix`: the
        prompt's block hashes (placement near its cached prefix)."""
        started = time.monotonic()
        try:
            lease_id, model_replica = await self.queue.admit(num_sequences, key, prefix)
        finally:
            self._export_load()
        self.metrics["queue_time"].observe(time.monotonic() - started)
        return self.replica_id, lease_id, model_replica

    def release(self, lease_id: int | str, replica_id: str | None = None) -> None:
        self.queue.release(lease_id)
        self._export_load()

    def renew(self, lease_ids: list[int | str], replica_id: str | None = None) -> None:
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


class EmbeddingBackend:
    """The ingress's way to embed with one model: requests that wait together are sent as one
    group (`CoalescingBackend`: one admission, one replica call), each group through
    `RoutedBackend.embed`; latency and token metrics are recorded per request."""

    def __init__(self, routed: "RoutedBackend", max_inputs: int):
        self.model_name = routed.model_name
        self.groups = CoalescingBackend(routed.embed, max_inputs)

    async def embed(self, inputs: list[list[int]]):
        started = time.monotonic()
        vectors = await self.groups.embed(inputs)
        record_embedding(self.model_name, time.monotonic() - started, sum(len(ids) for ids in inputs), len(inputs))
        return vectors


class RoutedBackend:
    """How the ingress runs requests: a place from the Router, tokens straight from the replica.

    A request that fails before producing any output (its replica or the
    router died) is retried once; later failures become 503 + Retry-After.
    """

    def __init__(self, router: DeploymentHandle, replicas: DeploymentHandle, retry_after_s: int = 1,
                 model_name: str = "", lease_timeout_s: float = 60.0, cache_salt: str | None = None):
        self.model_name = model_name
        self.cache_salt = cache_salt  # the engines' (the model); None: send no prefix for placement
        self._router = router
        self._replicas = replicas
        self._streaming = replicas.options(stream=True)
        self._channels: dict[str, ReplicaChannel] = {}  # one per model replica, shared by all requests
        self.retry_after_s = retry_after_s
        self._held: dict[int | str, str] = {}  # lease id -> the Router replica that granted it
        self._renew_every_s = lease_timeout_s / 4
        self._renewing: asyncio.Task | None = None

    async def stream(self, requests: list[GenerationRequest]) -> AsyncIterator[list[SequenceOutput]]:
        """Yield lists of outputs (one message per replica step) until every request has finished."""
        recorded = RequestMetrics(self.model_name)
        for attempt in (1, 2):
            produced = False
            try:
                async with aclosing(self._stream_once(requests)) as stream:
                    async for outputs in stream:
                        produced = True
                        recorded.observe(outputs)
                        yield outputs
                return
            except APIError:
                raise  # an answer (429 queue full, ...), not a failure of the graph
            except (RayError, ChannelClosed) as e:
                if produced or attempt == 2:
                    raise self._unavailable(e) from None
                logger.warning("retrying %s after %s before any output", requests[0].request_id, type(e).__name__)

    async def _stream_once(self, requests: list[GenerationRequest]) -> AsyncIterator[list[SequenceOutput]]:
        router_id, lease_id, replica_id = await self._admit(len(requests), self._prefix(requests[0]))
        self._held[lease_id] = router_id
        self._start_renewing()
        try:
            if replica_id is not None:
                async with aclosing(stream_via_channel(self._channels, self._replicas, replica_id,
                                                       requests)) as outputs_stream:
                    async for outputs in outputs_stream:
                        yield outputs
                return
            # No replica known yet (startup, scale from zero): a call of its own waits for one.
            stream = self._streaming.stream.remote(requests)
            try:
                async for outputs in stream:
                    yield outputs
            finally:
                stream.cancel()  # no-op when finished; frees the rows when the reader left early
        finally:
            self._held.pop(lease_id, None)
            # Fire and forget (never delays the caller), and not cancelled with a cancelled request.
            call_detached(self._router.release, lease_id, replica_id=router_id)

    def _start_renewing(self) -> None:
        if self._renewing is None or self._renewing.done():
            # In an empty context: the loop belongs to no request, and no request's cancel stops it.
            self._renewing = contextvars.Context().run(asyncio.get_running_loop().create_task,
                                                       self._renew_leases())

    async def _renew_leases(self) -> None:
        """While this process holds leases, tell each Router it is alive, so that only the leases
        of a process that died expire (after `lease_timeout_s`): one small call per router per
        quarter of it, whatever the number of requests."""
        while self._held:
            await asyncio.sleep(self._renew_every_s)
            by_router: dict[str, list[int | str]] = {}
            for lease_id, router_id in self._held.items():
                by_router.setdefault(router_id, []).append(lease_id)
            for router_id, lease_ids in by_router.items():
                call_detached(self._router.renew, lease_ids, replica_id=router_id)

    def _prefix(self, request: GenerationRequest) -> tuple[bytes, ...]:
        """The prompt's block hashes, as the replica's prefix cache names its blocks."""
        if self.cache_salt is None:
            return ()
        salt = sequence_salt(self.cache_salt, request.cache_salt)
        return tuple(block_hashes(request.prompt_token_ids, BLOCK_SIZE, salt, limit=MAX_PREFIX_BLOCKS))

    async def _admit(self, num_sequences: int, prefix: tuple[bytes, ...] = ()):
        key = uuid.uuid4().hex
        response = self._router.admit.remote(num_sequences, key, prefix)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()  # the caller left while queued: take it out of the queue
            # The grant may already be on the wire, and a cancelled response never yields it:
            # without this, 16 of 200 requests timing out at 50 ms kept their slots until
            # their lease expired. Which router has the key is unknown: tell them all.
            broadcast_detached(self._router, "abandon", key)
            raise

    async def embed(self, inputs: list[list[int]]):
        """Vectors for these token-id lists from one embedding replica, admitted like a request of
        len(inputs) sequences. Retried once when the replica or router fails (nothing streamed)."""
        for attempt in (1, 2):
            try:
                return await self._call_once("embed", len(inputs), inputs)
            except APIError:
                raise
            except RayError as e:
                if attempt == 2:
                    raise self._unavailable(e) from None
                logger.warning("retrying an embedding request after %s", type(e).__name__)

    async def _call_once(self, method: str, num_sequences: int, *args):
        """`method(*args)` on the model replica the Router admits this request to."""
        router_id, lease_id, replica_id = await self._admit(num_sequences)
        self._held[lease_id] = router_id
        self._start_renewing()
        response = getattr(self._replicas, method).remote(*args, replica_id=replica_id)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()  # the caller left (deadline, disconnect): the replica skips what it has not run
            raise
        finally:
            self._held.pop(lease_id, None)
            call_detached(self._router.release, lease_id, replica_id=router_id)

    def _unavailable(self, error: Exception) -> APIError:
        return APIError(503, f"the model server failed while generating ({type(error).__name__}); retry",
                        type="server_error", code="replica_failed", retry_after=self.retry_after_s)

"""How the ingress runs a request on one model: a place from that model's Router, then tokens
(or vectors) straight from the model replica it names, through this process's channel to it."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle

from deployments.detached import broadcast_detached, call_detached
from deployments.metrics import RequestMetrics, record_embedding
from deployments.replica_channel import ChannelClosed, ReplicaChannel, stream_via_channel
from serve_app.embeddings import CoalescingBackend
from serve_app.engine.engine_config import BLOCK_SIZE
from serve_app.engine.prefix_hash import block_hashes, sequence_salt
from serve_app.engine.types import GenerationRequest, SequenceOutput
from serve_app.protocol import APIError

logger = logging.getLogger("ray.serve")

MAX_PREFIX_BLOCKS = 512  # a placement hint: the first 8k tokens of a prompt say enough


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
            async with aclosing(stream_via_channel(self._channels, self._replicas, replica_id,
                                                   requests)) as outputs_stream:
                async for outputs in outputs_stream:
                    yield outputs
        finally:
            self._held.pop(lease_id, None)
            # Fire and forget (never delays the caller), and not cancelled with a cancelled request.
            call_detached(self._router.release, lease_id, pinned_to=router_id)

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
                call_detached(self._router.renew, lease_ids, pinned_to=router_id)

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
        response = None
        try:
            response = getattr(self._replicas, method).remote(*args, pinned_to=replica_id)
            return await response
        except asyncio.CancelledError:
            if response is not None:
                response.cancel()  # the caller left (deadline, disconnect): the replica skips what it has not run
            raise
        finally:
            self._held.pop(lease_id, None)
            call_detached(self._router.release, lease_id, pinned_to=router_id)

    def _unavailable(self, error: Exception) -> APIError:
        return APIError(503, f"the model server failed while generating ({type(error).__name__}); retry",
                        type="server_error", code="replica_failed", retry_after=self.retry_after_s)

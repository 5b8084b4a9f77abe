"""The caller's end of a model replica's `channel`: one Serve stream per (ingress process, replica)
that carries the outputs of every request this process submits to that replica.

Torch-free: the ingress's request path and the router never load model code through it.
"""

from __future__ import annotations

import asyncio
import contextvars

import ray
from ray.serve._private.constants import SERVE_NAMESPACE
from ray.serve.handle import DeploymentHandle

from deployments.detached import call_detached
from serve_app.engine.pacing import PacedReader
from serve_app.engine.types import GenerationRequest, coalesce


# While it has requests in flight, a caller says it is alive this often. A replica that has not
# heard from a caller for CALLER_GONE_S asks Ray whether the caller's actor still exists (touches
# cannot reach a draining replica: Serve routes new calls elsewhere) and stops the rows of one that
# died: Serve keeps draining a dead caller's stream, so nothing else would stop them.
KEEPALIVE_S = 2.0
CALLER_GONE_S = 3 * KEEPALIVE_S


def this_actor() -> tuple[str, str] | None:
    """(name, namespace) of the Serve replica's actor this code runs in (an ingress), else None."""
    if not ray.is_initialized():  # (asking would start Ray)
        return None
    context = ray.get_runtime_context()
    name = context.get_actor_name() if context.get_actor_id() else None
    # Serve's actors live in its own namespace, not the job's (context.namespace).
    return (name, SERVE_NAMESPACE) if name else None


def actor_exists(actor: tuple[str, str]) -> bool:
    """Whether the named actor is alive (Serve never restarts a replica's actor in place)."""
    try:
        ray.get_actor(actor[0], namespace=actor[1])
    except ValueError:  # no live actor has that name
        return False
    except Exception:  # Ray could not answer: do not stop anyone's rows on a doubt
        return True
    return True


class ChannelClosed(RuntimeError):
    """Submitted into a channel that no longer exists: open a new one."""


class ReplicaChannel:
    """The caller's end of one `ModelReplica.channel`: hands each output to the request it
    belongs to. When the channel fails or ends, every request still reading it gets the error."""

    def __init__(self, replicas: DeploymentHandle, replica_id: str):
        self.replica_id = replica_id
        self.channel_id: str | None = None
        self.inboxes: dict[str, asyncio.Queue] = {}
        self.closed = False
        self._ready = asyncio.Event()
        # The channel, and the tasks reading it, belong to the process, not to the request that
        # happened to open it (Serve cancels a request's calls with the request).
        spawn = contextvars.Context().run
        self._stream = spawn(replicas.options(stream=True).channel.remote, caller=this_actor(), pinned_to=replica_id)
        loop = asyncio.get_running_loop()
        self._task = spawn(loop.create_task, self._read())
        self._keepalive = spawn(loop.create_task, self._keep_alive(replicas))

    async def _keep_alive(self, replicas: DeploymentHandle) -> None:
        while not self.closed:
            await asyncio.sleep(KEEPALIVE_S)
            if self.inboxes and self.channel_id is not None and not self.closed:
                call_detached(replicas.touch, self.channel_id, pinned_to=self.replica_id)

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
            await replicas.submit.remote(channel.channel_id, requests, pinned_to=replica_id)
            break
        except ChannelClosed:  # it closed while idle just as we submitted: open another
            for rid in ids:
                channel.inboxes.pop(rid, None)
            if attempt == 2:
                raise
        except BaseException:  # cancelled (the caller left) or the replica failed
            for rid in ids:
                channel.inboxes.pop(rid, None)
            call_detached(replicas.cancel, ids, pinned_to=replica_id)  # the submit may have arrived
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
            call_detached(replicas.cancel, list(pending), pinned_to=replica_id)

"""The router's core: a bounded queue that forms batches dynamically.

Plain asyncio, no Ray: `BatchScheduler` is handed a `dispatch` function that
sends one batch somewhere (a model replica, through a DeploymentHandle, in
production; a fake in unit tests) and streams back that batch's outputs.

- A batch is sent when `max_batch_size` requests wait or `batch_wait_timeout_s`
  has passed since the first one arrived (at once when replicas are idle), and
  only while replicas have free slots (`capacity()` sequences in flight): the
  overflow waits here, where it is visible (queue length drives autoscaling)
  and bounded (429 beyond it).
- Each caller reads only its own outputs; a caller that goes away is removed
  from the queue, or cancelled on the replica running it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from serve_app.engine.pacing import PacedReader
from serve_app.engine.types import GenerationRequest, SequenceOutput, coalesce
from serve_app.protocol import APIError, queue_full

logger = logging.getLogger(__name__)

# A batch's stream: first a header {"replica_id": ...}, then lists of outputs.
Dispatch = Callable[[list[GenerationRequest]], AsyncIterator[dict | list[SequenceOutput]]]
CancelRemote = Callable[[str | None, list[str]], Awaitable[None]]


@dataclass(eq=False)
class Ticket:
    request: GenerationRequest
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    state: str = "queued"  # queued -> running -> done
    replica_id: str | None = None
    enqueued_at: float = field(default_factory=time.monotonic)

    @property
    def request_id(self) -> str:
        return self.request.request_id


class BatchScheduler:
    def __init__(
        self,
        dispatch: Dispatch,
        cancel_remote: CancelRemote,
        *,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        max_queue_len: int,
        capacity: Callable[[], int],
        retry_after_s: int = 1,
        stream_interval_s: float = 0.0,
    ):
        self._dispatch = dispatch
        self._cancel_remote = cancel_remote
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.max_queue_len = max_queue_len
        self._capacity = capacity
        self.retry_after_s = retry_after_s
        self.stream_interval_s = stream_interval_s
        self._queue: deque[Ticket] = deque()
        self._changed = asyncio.Event()  # queue grew or capacity freed
        self._loop_task: asyncio.Task | None = None
        self._batch_tasks: set[asyncio.Task] = set()
        self.in_flight = 0  # sequences sent to replicas and not finished
        self.load_by_replica: Counter[str] = Counter()
        self.batch_sizes: Counter[int] = Counter()
        self.completed = 0
        self.rejected = 0
        self.cancelled = 0

    # ------------------------------------------------------------ callers

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[list[SequenceOutput]]:
        """Yield this request's outputs as they are produced, until it finishes."""
        ticket = self._enqueue(request)
        reader = PacedReader(ticket.inbox, self.stream_interval_s)
        try:
            while True:
                outputs = await reader.next_batch()
                for out in outputs:
                    if isinstance(out, Exception):
                        raise out
                yield coalesce(outputs)
                if outputs[-1].finished:
                    return
        finally:
            await self._abandon(ticket)

    async def complete(self, request: GenerationRequest) -> SequenceOutput:
        """Run a request to the end; return one output holding all of its text."""
        final = SequenceOutput(request.request_id)
        async for outputs in self.stream(request):
            for out in outputs:
                final.absorb(out)
        return final

    def stats(self) -> dict:
        return {
            "queue_length": self.queue_length,
            "in_flight_sequences": self.in_flight,
            "capacity": self._capacity(),
            "batches": sum(self.batch_sizes.values()),
            "batch_size_histogram": dict(sorted(self.batch_sizes.items())),
            "max_batch_size_seen": max(self.batch_sizes, default=0),
            "completed": self.completed,
            "rejected": self.rejected,
            "cancelled": self.cancelled,
            "load_by_replica": dict(self.load_by_replica),
        }

    # ------------------------------------------------------------ internals

    def _enqueue(self, request: GenerationRequest) -> Ticket:
        if len(self._queue) >= self.max_queue_len:
            self.rejected += 1
            raise queue_full(
                f"server is at capacity: {len(self._queue)} requests are already waiting; retry later",
                retry_after=self.retry_after_s,
            )
        ticket = Ticket(request)
        self._queue.append(ticket)
        self._changed.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._batching_loop())
        return ticket

    async def _abandon(self, ticket: Ticket) -> None:
        """Called when a caller stops reading: free what the request holds."""
        if ticket.state == "done":
            return
        self.cancelled += 1
        if ticket.state == "queued":
            self._queue.remove(ticket)  # never reaches a replica
        else:
            ticket.state = "done"
            try:
                await self._cancel_remote(ticket.replica_id, [ticket.request_id])
            except Exception:  # the replica may be gone already; nothing left to free
                logger.warning("cancel of %s on %s failed", ticket.request_id, ticket.replica_id, exc_info=True)
        ticket.state = "done"

    def _free_slots(self) -> int:
        return max(0, self._capacity() - self.in_flight)

    async def _batching_loop(self) -> None:
        while True:
            while not self._queue or self._free_slots() == 0:
                self._changed.clear()
                await self._changed.wait()
            # Wait for the batch to fill, but no longer than the timeout from its first request;
            # not at all when replicas are idle: waiting would only add latency, and requests
            # arriving later still join the running batch on the replica (continuous batching).
            deadline = self._queue[0].enqueued_at + self.batch_wait_timeout_s
            while self.in_flight and len(self._queue) < min(self.max_batch_size, self._free_slots()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                except TimeoutError:
                    break
            size = min(self.max_batch_size, self._free_slots(), len(self._queue))
            if size == 0:
                continue
            batch = [self._queue.popleft() for _ in range(size)]
            for ticket in batch:
                ticket.state = "running"
            self.in_flight += size
            self.batch_sizes[size] += 1
            task = asyncio.get_running_loop().create_task(self._run_batch(batch))
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)

    async def _run_batch(self, batch: list[Ticket]) -> None:
        live = {t.request_id: t for t in batch}
        replica_id = None
        try:
            async for message in self._dispatch([t.request for t in batch]):
                if isinstance(message, dict):
                    replica_id = message.get("replica_id")
                    self.load_by_replica[replica_id] += len(live)
                    for t in live.values():
                        t.replica_id = replica_id
                    continue
                for out in message:
                    ticket = live.get(out.request_id)
                    if ticket is None:
                        continue
                    ticket.inbox.put_nowait(out)
                    if out.finished:
                        del live[out.request_id]
                        self._release(ticket, replica_id)
            if live:
                raise RuntimeError("the model replica ended a batch without finishing every sequence")
        except Exception as e:
            logger.exception("batch of %d failed on replica %s", len(batch), replica_id)
            error = e if isinstance(e, APIError) else APIError(
                503, f"the model replica failed while generating: {type(e).__name__}", type="server_error",
                code="replica_failed", retry_after=self.retry_after_s)
            for ticket in live.values():
                ticket.inbox.put_nowait(error)
        finally:
            for ticket in live.values():
                self._release(ticket, replica_id)

    def _release(self, ticket: Ticket, replica_id: str | None) -> None:
        if ticket.state != "done":
            self.completed += 1
        ticket.state = "done"
        self.in_flight -= 1
        if replica_id is not None:
            self.load_by_replica[replica_id] -= 1
            if self.load_by_replica[replica_id] <= 0:
                del self.load_by_replica[replica_id]
        self._changed.set()

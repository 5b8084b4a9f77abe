"""The router's core: a bounded FIFO queue that admits requests to model replicas in batches.

Plain asyncio, no Ray. The router decides *when* a request may start and
*where* (which replica); it never carries tokens: the caller streams them
straight from the replica it was given, then releases its lease.

- Requests are admitted in groups: when `max_batch_size` sequences wait, or
  `batch_wait_timeout_s` after the first arrived, whichever comes first (at
  once when replicas are idle: waiting would only add latency, and later
  arrivals still join the replica's running batch). A group goes to the
  replica with the most free slots, so its prompts reach that engine together.
- A replica has `slots_per_replica` slots; beyond them requests wait here,
  where the wait is visible (queue length drives autoscaling) and bounded
  (429 with Retry-After beyond `max_queue_len`).
- A caller that leaves while queued is removed from the queue. One that leaves
  while its admission is answered (the grant is on the wire) `abandon`s its
  lease key: released if granted, removed if queued, refused if it arrives
  later. Holders `renew` their leases while they run; a lease not renewed for
  `lease_timeout_s` (its holder's process died) expires, so slots cannot leak
  for longer than that.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from serve_app.protocol import queue_full

logger = logging.getLogger(__name__)

UNPLACED = ""  # the "replica" of requests admitted before any replica is known (startup, scale from zero)


@dataclass(eq=False)
class Ticket:
    size: int  # sequences
    lease_id: int | str
    admitted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    replica_id: str | None = None
    enqueued_at: float = field(default_factory=time.monotonic)
    expires_at: float = float("inf")


class AdmissionQueue:
    def __init__(
        self,
        *,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        max_queue_len: int,
        slots_per_replica: int,
        replicas: Callable[[], Collection[str]],
        retry_after_s: int = 1,
        lease_timeout_s: float | None = None,
    ):
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.max_queue_len = max_queue_len
        self.slots_per_replica = slots_per_replica
        self._replicas = replicas
        self.retry_after_s = retry_after_s
        self.lease_timeout_s = lease_timeout_s
        self._queue: deque[Ticket] = deque()
        self._leases: dict[int | str, Ticket] = {}
        self._abandoned: dict[int | str, float] = {}  # lease keys abandoned before their admit arrived
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()  # queue grew or slots freed
        self._loop_task: asyncio.Task | None = None
        self.load: Counter[str] = Counter()  # sequences admitted per replica
        self.batch_sizes: Counter[int] = Counter()  # sequences admitted per round
        self.admitted = 0
        self.rejected = 0
        self.cancelled = 0
        self.expired = 0

    # ------------------------------------------------------------ callers

    @property
    def queue_length(self) -> int:
        """Sequences waiting for admission."""
        return sum(t.size for t in self._queue)

    @property
    def in_flight(self) -> int:
        return sum(self.load.values())

    async def admit(self, num_sequences: int, key: str | None = None) -> tuple[int | str, str | None]:
        """Wait for a place; return (lease id, replica id). The caller must `release` the lease.
        `key`: the caller's own lease id, so it can `abandon` a grant it never received."""
        if key is not None and self._abandoned.pop(key, None) is not None:
            raise asyncio.CancelledError(f"lease {key} was abandoned before it was asked for")
        if len(self._queue) >= self.max_queue_len:
            self.rejected += 1
            raise queue_full(f"server is at capacity: {len(self._queue)} requests are already waiting; "
                             "retry later", retry_after=self.retry_after_s)
        ticket = Ticket(num_sequences, key if key is not None else next(self._ids))
        self._queue.append(ticket)
        self._changed.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._admission_loop())
        try:
            await asyncio.shield(ticket.admitted)
        except asyncio.CancelledError:
            self.cancelled += 1
            if ticket in self._queue:  # still waiting (abandon() may have removed it already)
                self._queue.remove(ticket)
                ticket.admitted.cancel()
            else:
                self.release(ticket.lease_id)  # admitted just as the caller left (no-op if not)
            raise
        return ticket.lease_id, ticket.replica_id or None

    def abandon(self, key: str) -> None:
        """The caller left around the time of its admission: free whatever it holds or waits for."""
        if key in self._leases:
            self.release(key)
            return
        for ticket in self._queue:
            if ticket.lease_id == key:
                # Out of the queue now, before the admission loop can grant it; its admit()
                # wakes up cancelled and counts it.
                self._queue.remove(ticket)
                ticket.admitted.cancel()
                return
        now = time.monotonic()
        self._abandoned = {k: t for k, t in self._abandoned.items() if t > now}
        self._abandoned[key] = now + 60  # its admit may still be on the way

    def renew(self, lease_ids: Collection[int | str]) -> None:
        """Their holders are alive: push their expiry `lease_timeout_s` into the future."""
        if self.lease_timeout_s is None:
            return
        expires_at = time.monotonic() + self.lease_timeout_s
        for lease_id in lease_ids:
            ticket = self._leases.get(lease_id)
            if ticket is not None:
                ticket.expires_at = expires_at

    def release(self, lease_id: int | str) -> None:
        """The caller's sequences have finished (or failed) on their replica."""
        ticket = self._leases.pop(lease_id, None)
        if ticket is None:
            return  # released twice, or expired
        self.load[ticket.replica_id] -= ticket.size
        if self.load[ticket.replica_id] <= 0:
            del self.load[ticket.replica_id]
        self._changed.set()

    def stats(self) -> dict:
        return {
            "queue_length": self.queue_length,
            "queued_requests": len(self._queue),
            "in_flight_sequences": self.in_flight,
            "capacity": self.slots_per_replica * max(1, len(self._replicas())),
            "admission_rounds": sum(self.batch_sizes.values()),
            "batch_size_histogram": dict(sorted(self.batch_sizes.items())),
            "max_batch_size_seen": max(self.batch_sizes, default=0),
            "admitted": self.admitted,
            "rejected": self.rejected,
            "cancelled": self.cancelled,
            "expired_leases": self.expired,
            "load_by_replica": {k or "unplaced": v for k, v in self.load.items()},
        }

    # ------------------------------------------------------------ internals

    def _emptiest(self) -> tuple[str, int]:
        """The replica with the most free slots, and how many."""
        replicas = self._replicas() or [UNPLACED]
        best = min(replicas, key=lambda r: self.load.get(r, 0))
        return best, self.slots_per_replica - self.load.get(best, 0)

    def _expire_leases(self) -> None:
        now = time.monotonic()
        for lease_id in [i for i, t in self._leases.items() if t.expires_at <= now]:
            logger.warning("lease %s expired unrenewed (its holder is gone?): freeing its slots", lease_id)
            self.expired += 1
            self.release(lease_id)

    async def _wait_for_change(self, timeout: float | None) -> None:
        self._changed.clear()
        # Not asyncio.wait_for: on 3.11 it swallows a cancel that races the event being set.
        try:
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            pass

    async def _admission_loop(self) -> None:
        while True:
            self._expire_leases()
            replica, free = self._emptiest()
            if not self._queue or free < min(self._queue[0].size, self.slots_per_replica):
                # Also wake up now and then: replicas appear, leases expire.
                await self._wait_for_change(1.0)
                continue
            deadline = self._queue[0].enqueued_at + self.batch_wait_timeout_s
            if self.in_flight and self.queue_length < min(self.max_batch_size, free):
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    await self._wait_for_change(remaining)
                    continue  # re-evaluate: more arrivals, or the deadline passed
            self._admit_round(replica, free)

    def _admit_round(self, replica: str, free: int) -> None:
        """Admit queued tickets, in order, into this replica's free slots (at least the first)."""
        admitted = 0
        while self._queue and (admitted == 0 or admitted + self._queue[0].size <= min(free, self.max_batch_size)):
            ticket = self._queue.popleft()
            ticket.replica_id = replica
            if self.lease_timeout_s is not None:
                ticket.expires_at = time.monotonic() + self.lease_timeout_s
            self._leases[ticket.lease_id] = ticket
            self.load[replica] += ticket.size
            admitted += ticket.size
            self.admitted += 1
            ticket.admitted.set_result(None)
        self.batch_sizes[admitted] += 1

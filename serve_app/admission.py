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
- Cache-aware placement: a request carries its prompt's block-hash chain (prefix_hash.py),
  and the router remembers which chains it placed on each replica (an LRU about the size of a
  replica's KV cache). A request goes to the replica holding the longest part of its prefix,
  unless that replica carries more than `affinity_tolerance` sequences beyond the least
  loaded one: then balance wins.
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
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from serve_app.protocol import queue_full

logger = logging.getLogger(__name__)



@dataclass(eq=False)
class Ticket:
    size: int  # sequences
    lease_id: int | str
    admitted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    replica_id: str | None = None
    enqueued_at: float = field(default_factory=time.monotonic)
    expires_at: float = float("inf")
    prefix: tuple[bytes, ...] = ()  # block hashes of its prompt (cache-aware placement)


class PrefixIndex:
    """Which prompt blocks this router placed on each replica, most recent last, bounded per
    replica by about what its KV cache holds (older entries are what the replica evicts first)."""

    def __init__(self, blocks_per_replica: int):
        self.capacity = blocks_per_replica
        self._held: dict[str, OrderedDict[bytes, None]] = {}

    def matched(self, replica: str, prefix: tuple[bytes, ...]) -> int:
        """Leading blocks of `prefix` the replica probably holds."""
        held = self._held.get(replica)
        if not held:
            return 0
        n = 0
        for h in prefix:
            if h not in held:
                break
            n += 1
        return n

    def record(self, replica: str, prefix: tuple[bytes, ...]) -> None:
        held = self._held.setdefault(replica, OrderedDict())
        for h in prefix:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.capacity:
            held.popitem(last=False)

    def forget_others(self, replicas) -> None:
        for gone in set(self._held) - set(replicas):
            del self._held[gone]


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
        affinity_tolerance: int | None = None,
        prefix_index_blocks: int = 4096,
        wake: Callable[[], None] | None = None,
    ):
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.max_queue_len = max_queue_len
        self.slots_per_replica = slots_per_replica
        self._replicas = replicas
        self.retry_after_s = retry_after_s
        self.lease_timeout_s = lease_timeout_s
        # None: no cache-aware placement (the emptiest replica always).
        self.affinity_tolerance = affinity_tolerance
        self.prefixes = PrefixIndex(prefix_index_blocks)
        # Called while requests wait and no replica is known (startup, scaled to zero): the
        # router makes a call that waits for a replica, which is what brings one up from zero.
        self._wake = wake
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
        self.placed_by_affinity = 0  # admissions that went to a replica other than the emptiest for its cache

    # ------------------------------------------------------------ callers

    @property
    def queue_length(self) -> int:
        """Sequences waiting for admission."""
        return sum(t.size for t in self._queue)

    @property
    def in_flight(self) -> int:
        return sum(self.load.values())

    async def admit(self, num_sequences: int, key: str | None = None,
                    prefix: tuple[bytes, ...] = ()) -> tuple[int | str, str]:
        """Wait for a place; return (lease id, replica id). The caller must `release` the lease.
        `key`: the caller's own lease id, so it can `abandon` a grant it never received.
        `prefix`: the block hashes of its prompt, for cache-aware placement."""
        if key is not None and self._abandoned.pop(key, None) is not None:
            raise asyncio.CancelledError(f"lease {key} was abandoned before it was asked for")
        if len(self._queue) >= self.max_queue_len:
            self.rejected += 1
            raise queue_full(f"server is at capacity: {len(self._queue)} requests are already waiting; "
                             "retry later", retry_after=self.retry_after_s)
        ticket = Ticket(num_sequences, key if key is not None else next(self._ids), prefix=tuple(prefix))
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
        return ticket.lease_id, ticket.replica_id

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
            "load_by_replica": dict(self.load),
            "placed_by_cache_affinity": self.placed_by_affinity,
        }

    # ------------------------------------------------------------ internals

    def _place(self, ticket: Ticket | None) -> tuple[str | None, int]:
        """Where a ticket should go, and how many slots are free there: the replica most likely
        to hold the longest part of its prompt's prefix, unless that one is loaded beyond the
        least loaded by more than the tolerance (balance wins); else the least loaded.
        (None, 0) while no replica is known."""
        replicas = list(self._replicas())
        if not replicas:
            return None, 0
        load = self.load.get
        emptiest = min(replicas, key=lambda r: load(r, 0))
        choice = emptiest
        if ticket is not None and ticket.prefix and self.affinity_tolerance is not None and len(replicas) > 1:
            self.prefixes.forget_others(replicas)
            best = max(replicas, key=lambda r: (self.prefixes.matched(r, ticket.prefix), -load(r, 0)))
            if (self.prefixes.matched(best, ticket.prefix) > self.prefixes.matched(emptiest, ticket.prefix)
                    and load(best, 0) - load(emptiest, 0) <= self.affinity_tolerance
                    and self.slots_per_replica - load(best, 0) >= min(ticket.size, self.slots_per_replica)):
                choice = best
        return choice, self.slots_per_replica - load(choice, 0)

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
            replica, free = self._place(self._queue[0] if self._queue else None)
            if self._queue and replica is None and self._wake is not None:
                self._wake()
            if not self._queue or replica is None or free < min(self._queue[0].size, self.slots_per_replica):
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
        emptiest = min(self._replicas(), key=lambda r: self.load.get(r, 0), default=replica)
        while self._queue and (admitted == 0 or admitted + self._queue[0].size <= min(free, self.max_batch_size)):
            if admitted and self._queue[0].prefix and self._place(self._queue[0])[0] != replica:
                break  # its prefix is elsewhere: it starts a round of its own
            ticket = self._queue.popleft()
            ticket.replica_id = replica
            if replica != emptiest and admitted == 0:
                self.placed_by_affinity += 1
            if ticket.prefix:
                self.prefixes.record(replica, ticket.prefix)
            if self.lease_timeout_s is not None:
                ticket.expires_at = time.monotonic() + self.lease_timeout_s
            self._leases[ticket.lease_id] = ticket
            self.load[replica] += ticket.size
            admitted += ticket.size
            self.admitted += 1
            ticket.admitted.set_result(None)
        self.batch_sizes[admitted] += 1

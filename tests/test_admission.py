"""AdmissionQueue (the router's core): when and where requests start. No Ray, no model."""

import asyncio

import pytest

from serve_app.admission import AdmissionQueue
from serve_app.protocol import APIError


def make(replicas=("r1",), **kw):
    opts = dict(max_batch_size=4, batch_wait_timeout_s=0.05, max_queue_len=8, slots_per_replica=4,
                replicas=lambda: list(replicas))
    opts.update(kw)
    return AdmissionQueue(**opts)


async def hold(queue, seconds, size=1):
    """A caller: admitted, runs for `seconds`, releases. Returns its replica."""
    lease, replica = await queue.admit(size)
    await asyncio.sleep(seconds)
    queue.release(lease)
    return replica


async def test_idle_replicas_admit_a_lone_request_at_once():
    queue = make(batch_wait_timeout_s=5.0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    lease, replica = await queue.admit(1)
    assert loop.time() - start < 0.5 and replica == "r1"  # did not wait out the 5 s window
    queue.release(lease)
    assert queue.in_flight == 0


async def test_while_busy_arrivals_are_admitted_together_within_the_timeout():
    queue = make(slots_per_replica=8)
    busy = asyncio.create_task(hold(queue, 0.3))
    await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.gather(*(hold(queue, 0) for _ in range(3)))
    assert 0.04 < loop.time() - start < 0.3  # waited for the window, not for the busy request
    await busy
    assert queue.stats()["batch_size_histogram"] == {1: 1, 3: 1}


async def test_a_full_batch_is_admitted_without_waiting_for_the_timeout():
    queue = make(slots_per_replica=8, batch_wait_timeout_s=5.0)
    busy = asyncio.create_task(hold(queue, 0.5))
    await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.gather(*(hold(queue, 0) for _ in range(4)))  # max_batch_size arrived
    assert loop.time() - start < 0.4
    await busy


async def test_admission_waits_for_free_slots_and_never_overfills_a_replica():
    queue = make(slots_per_replica=2)
    peak = 0

    async def caller():
        nonlocal peak
        lease, _ = await queue.admit(1)
        peak = max(peak, queue.in_flight)
        await asyncio.sleep(0.02)
        queue.release(lease)

    await asyncio.gather(*(caller() for _ in range(7)))
    assert peak == 2 and queue.in_flight == 0 and queue.stats()["admitted"] == 7


async def test_requests_go_to_the_replica_with_most_free_slots():
    queue = make(replicas=("a", "b"), slots_per_replica=2, batch_wait_timeout_s=0)
    leases = [await queue.admit(1) for _ in range(4)]
    assert sorted(r for _, r in leases) == ["a", "a", "b", "b"]
    for lease, _ in leases:
        queue.release(lease)


async def test_full_queue_rejects_immediately_with_retry_after():
    queue = make(slots_per_replica=1, max_batch_size=1, max_queue_len=2, retry_after_s=3)
    tasks = [asyncio.create_task(hold(queue, 0.1))]
    await asyncio.sleep(0.01)  # holds the only slot
    tasks += [asyncio.create_task(hold(queue, 0)) for _ in (1, 2)]
    await asyncio.sleep(0.01)  # two waiting: the queue is full
    with pytest.raises(APIError) as info:
        await queue.admit(1)
    assert info.value.status == 429 and info.value.retry_after == 3
    assert len(await asyncio.gather(*tasks)) == 3
    assert queue.stats()["rejected"] == 1


async def test_cancelled_while_queued_leaves_the_queue_and_holds_nothing():
    queue = make(slots_per_replica=1, max_batch_size=1)
    first = asyncio.create_task(hold(queue, 0.1))
    await asyncio.sleep(0.01)
    queued = asyncio.create_task(queue.admit(1))
    await asyncio.sleep(0.01)
    assert queue.queue_length == 1
    queued.cancel()
    await asyncio.sleep(0.01)
    assert queue.queue_length == 0
    await first
    assert queue.in_flight == 0 and queue.stats()["cancelled"] == 1


async def test_unreleased_leases_expire():
    queue = make(slots_per_replica=1, max_batch_size=1, lease_timeout_s=0.1)
    await queue.admit(1)  # a caller that died without releasing
    loop = asyncio.get_running_loop()
    start = loop.time()
    lease, _ = await queue.admit(1)  # gets the slot once the dead lease expires
    assert 0.05 < loop.time() - start < 2.0
    queue.release(lease)
    assert queue.in_flight == 0 and queue.stats()["expired_leases"] == 1


async def test_renewed_leases_outlive_their_timeout_and_expire_once_renewals_stop():
    queue = make(slots_per_replica=1, max_batch_size=1, lease_timeout_s=0.2)
    lease, _ = await queue.admit(1)
    waiting = asyncio.create_task(queue.admit(1))
    for _ in range(5):  # 0.5 s: more than twice the timeout, renewed every 0.1 s
        await asyncio.sleep(0.1)
        queue.renew([lease, "unknown"])  # an unknown (released, expired) lease is ignored
    assert not waiting.done() and queue.stats()["expired_leases"] == 0
    second, _ = await asyncio.wait_for(waiting, 2.0)  # renewals stopped: the lease expires
    assert queue.stats()["expired_leases"] == 1
    queue.release(second)
    assert queue.in_flight == 0


async def test_requests_wait_for_a_replica_and_ask_for_one_meanwhile():
    known: list[str] = []
    wakes = []
    queue = make(replicas=known, slots_per_replica=2, batch_wait_timeout_s=0, wake=lambda: wakes.append(1))
    waiting = asyncio.create_task(queue.admit(1))
    await asyncio.sleep(0.05)
    assert not waiting.done() and wakes  # nothing goes out blind; the router was asked to wake a replica
    known.append("r1")
    queue._changed.set()
    _, replica = await asyncio.wait_for(waiting, 2.0)
    assert replica == "r1"


async def test_a_request_of_many_sequences_counts_each():
    queue = make(slots_per_replica=4)
    lease, _ = await queue.admit(3)
    assert queue.in_flight == 3
    queue.release(lease)
    queue.release(lease)  # twice is harmless
    assert queue.in_flight == 0


async def test_an_abandoned_key_frees_its_lease_its_place_or_its_future_admission():
    queue = make(slots_per_replica=1)
    lease, _ = await queue.admit(1, "granted")
    waiting = asyncio.create_task(queue.admit(1, "queued"))
    await asyncio.sleep(0.05)
    queue.abandon("queued")  # still queued: removed, its admit() ends cancelled
    with pytest.raises(asyncio.CancelledError):
        await waiting
    queue.abandon("granted")  # granted, but the caller never saw the answer: released
    assert queue.in_flight == 0 and queue.queue_length == 0
    queue.abandon("late")  # abandoned before its admit arrived: that admit is refused
    with pytest.raises(asyncio.CancelledError):
        await queue.admit(1, "late")
    lease, _ = await queue.admit(1, "fresh")
    assert queue.in_flight == 1
    queue.release(lease)
    assert queue.in_flight == 0


async def test_a_request_goes_to_the_replica_that_holds_its_prefix_while_balance_allows():
    queue = make(replicas=("r1", "r2"), slots_per_replica=8, affinity_tolerance=2, batch_wait_timeout_s=0)
    system = (b"s1", b"s2", b"s3")
    first, where = await queue.admit(1, prefix=system + (b"a1",))
    # Later turns of that chat, and other users with the same system prompt, follow it there...
    placed = [where]
    for user in range(2):
        _, replica = await queue.admit(1, prefix=system + (b"u%d" % user,))
        placed.append(replica)
    assert placed == [where] * 3
    # ...until it carries more than the tolerance beyond the other replica: then balance wins.
    _, replica = await queue.admit(1, prefix=system + (b"u9",))
    assert replica != where
    # A prompt nobody has seen goes to the least loaded replica.
    _, fresh = await queue.admit(1, prefix=(b"x1",))
    assert fresh == replica
    assert queue.stats()["placed_by_cache_affinity"] >= 2


async def test_without_affinity_every_request_goes_to_the_least_loaded_replica():
    queue = make(replicas=("r1", "r2"), slots_per_replica=8, batch_wait_timeout_s=0)
    places = [(await queue.admit(1, prefix=(b"s1", b"s2")))[1] for _ in range(4)]
    assert sorted(places) == ["r1", "r1", "r2", "r2"]

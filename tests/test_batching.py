"""BatchScheduler (the router's core) against a fake replica: no Ray, no model."""

import asyncio

import pytest

from serve_app.batching import BatchScheduler
from serve_app.engine.types import GenerationRequest, SamplingParams, SequenceOutput
from serve_app.protocol import APIError


class FakeReplicas:
    """Answers each request with its own id as text, after `steps` fake decode steps."""

    def __init__(self, steps=3, step_s=0.01, fail=False):
        self.steps, self.step_s, self.fail = steps, step_s, fail
        self.batches: list[list[str]] = []
        self.cancelled: list[str] = []

    async def dispatch(self, requests):
        self.batches.append([r.request_id for r in requests])
        yield {"replica_id": "r1"}
        live = {r.request_id for r in requests}
        for step in range(self.steps):
            await asyncio.sleep(self.step_s)
            if self.fail:
                raise RuntimeError("replica died")
            outs = []
            for rid in sorted(live):
                done = step == self.steps - 1 or rid in self.cancelled
                outs.append(SequenceOutput(rid, text=f"{rid}.", token_ids=[step],
                                           finish_reason=("cancelled" if rid in self.cancelled else "length")
                                           if done else None, prompt_tokens=1, completion_tokens=step + 1))
            live -= {o.request_id for o in outs if o.finished}
            yield outs

    async def cancel(self, replica_id, request_ids):
        assert replica_id == "r1"
        self.cancelled += request_ids


def make(fake, **kw):
    opts = dict(max_batch_size=4, batch_wait_timeout_s=0.05, max_queue_len=8, capacity=lambda: 4)
    opts.update(kw)
    return BatchScheduler(fake.dispatch, fake.cancel, **opts)


def req(i):
    return GenerationRequest(request_id=f"q{i}", prompt_token_ids=[1], params=SamplingParams(max_tokens=3))


async def test_concurrent_requests_are_batched_and_answered_individually():
    fake = FakeReplicas()
    sched = make(fake, capacity=lambda: 8)
    busy = asyncio.create_task(sched.complete(req(9)))  # replicas busy: later requests wait to batch
    await asyncio.sleep(0.005)
    outs = await asyncio.gather(*(sched.complete(req(i)) for i in range(4)))
    await busy
    assert [o.text for o in outs] == [f"q{i}.q{i}.q{i}." for i in range(4)]
    assert fake.batches == [["q9"], ["q0", "q1", "q2", "q3"]]
    assert sched.stats()["batch_size_histogram"] == {1: 1, 4: 1}


async def test_idle_replicas_get_a_lone_request_at_once():
    fake = FakeReplicas(steps=1, step_s=0)
    sched = make(fake, batch_wait_timeout_s=5.0)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await sched.complete(req(0))
    assert loop.time() - start < 1.0  # did not wait out the 5 s batching window


async def test_while_busy_a_lone_request_waits_at_most_the_batch_timeout():
    fake = FakeReplicas(steps=30)
    sched = make(fake, batch_wait_timeout_s=0.05, capacity=lambda: 8)
    busy = asyncio.create_task(sched.complete(req(9)))
    await asyncio.sleep(0.005)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await sched.complete(req(0))
    assert 0.04 < loop.time() - start < 1.0
    assert fake.batches[1] == ["q0"]
    await busy


async def test_dispatch_waits_for_free_capacity():
    fake = FakeReplicas(steps=3)
    sched = make(fake, capacity=lambda: 2, max_batch_size=4)
    await asyncio.gather(*(sched.complete(req(i)) for i in range(6)))
    assert all(len(b) <= 2 for b in fake.batches)
    assert sum(len(b) for b in fake.batches) == 6


async def test_full_queue_rejects_immediately_with_retry_after():
    fake = FakeReplicas(steps=20)
    sched = make(fake, capacity=lambda: 1, max_batch_size=1, max_queue_len=2, retry_after_s=3)
    tasks = [asyncio.create_task(sched.complete(req(0)))]
    await asyncio.sleep(0.02)  # q0 is dispatched and holds the only slot
    tasks += [asyncio.create_task(sched.complete(req(i))) for i in (1, 2)]
    await asyncio.sleep(0.02)  # two waiting: the queue is full
    with pytest.raises(APIError) as info:
        await sched.complete(req(99))
    assert info.value.status == 429 and info.value.retry_after == 3
    assert len(await asyncio.gather(*tasks)) == 3
    assert sched.stats()["rejected"] == 1


async def test_cancelled_while_queued_never_reaches_a_replica():
    fake = FakeReplicas(steps=10)
    sched = make(fake, capacity=lambda: 1, max_batch_size=1)
    first = asyncio.create_task(sched.complete(req(0)))
    queued = asyncio.create_task(sched.complete(req(1)))
    await asyncio.sleep(0.05)
    queued.cancel()
    await first
    await asyncio.sleep(0.1)
    assert fake.batches == [["q0"]]
    assert sched.queue_length == 0


async def test_cancelled_while_running_is_cancelled_on_its_replica():
    fake = FakeReplicas(steps=50)
    sched = make(fake)
    running = asyncio.create_task(sched.complete(req(0)))
    await asyncio.sleep(0.1)
    running.cancel()
    await asyncio.sleep(0.05)
    assert fake.cancelled == ["q0"]
    await asyncio.sleep(0.1)
    assert sched.in_flight == 0


async def test_replica_failure_fails_each_caller_with_503():
    sched = make(FakeReplicas(fail=True))
    results = await asyncio.gather(*(sched.complete(req(i)) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, APIError) and r.status == 503 for r in results)
    assert sched.in_flight == 0

"""The caller's end of a replica channel calls the replica's methods as they are declared."""

import asyncio
import inspect

from deployments import replica_channel
from deployments.replica import ModelReplica
from deployments.replica_channel import stream_via_channel
from serve_app.engine.types import GenerationRequest

REPLICA = ModelReplica.func_or_class


class Method:
    """A handle method that checks each call against the real ModelReplica method."""

    def __init__(self, handle: "FakeReplicas", name: str):
        self.handle, self.name = handle, name

    def remote(self, *args, **kwargs):
        inspect.signature(getattr(REPLICA, self.name)).bind(None, *args, **kwargs)  # TypeError if not
        self.handle.calls.append((self.name, kwargs.get("pinned_to")))
        return self.handle.respond(self.name)


class FakeReplicas:
    def __init__(self):
        self.calls = []
        self.finish = asyncio.Event()

    def options(self, **_):
        return self

    def __getattr__(self, name):
        return Method(self, name)

    def respond(self, name):
        if name == "channel":
            return self._channel()
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def _channel(self):
        yield "channel-1"
        await self.finish.wait()  # a long silence: the engine is busy with others' prefill


async def test_a_silent_stream_keeps_telling_its_replica_it_is_alive(monkeypatch):
    monkeypatch.setattr(replica_channel, "KEEPALIVE_S", 0.05)
    replicas = FakeReplicas()
    request = GenerationRequest(request_id="r1", prompt_token_ids=[1, 2, 3])
    stream = stream_via_channel({}, replicas, "replica-a", [request])
    reading = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.3)
    touches = [c for c in replicas.calls if c[0] == "touch"]
    assert len(touches) >= 3 and all(pinned == "replica-a" for _, pinned in touches), replicas.calls
    assert ("submit", "replica-a") in replicas.calls
    reading.cancel()
    replicas.finish.set()
    await asyncio.gather(reading, return_exceptions=True)
    assert ("cancel", "replica-a") in replicas.calls  # the caller left: its rows are stopped


async def test_a_caller_that_leaves_during_its_submit_cancels_what_may_have_arrived():
    class SlowSubmit(FakeReplicas):
        def respond(self, name):
            if name == "submit":
                return asyncio.sleep(30)
            return super().respond(name)

    replicas, channels = SlowSubmit(), {}
    request = GenerationRequest(request_id="r1", prompt_token_ids=[1, 2, 3])
    stream = stream_via_channel(channels, replicas, "replica-a", [request])
    reading = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.2)
    reading.cancel()  # the client left while its submit was on the wire
    await asyncio.gather(reading, return_exceptions=True)
    assert ("cancel", "replica-a") in replicas.calls
    assert channels["replica-a"].inboxes == {}  # nothing left for the keepalive to report
    replicas.finish.set()


def replica_with_engine(tiny_engine_factory):
    from serve_app.engine.async_engine import AsyncEngine

    model_replica = REPLICA.__new__(REPLICA)  # its methods, without Serve's replica context
    model_replica._channels, model_replica._seen = {}, {}
    model_replica.engine = AsyncEngine(tiny_engine_factory())
    return model_replica


async def run_long_row(model_replica, caller=None, stop_after_s: float = 30):
    """Open a channel for `caller`, run one long row, touch nothing; return (seconds the
    channel lasted, tokens it produced)."""
    from serve_app.engine.types import SamplingParams

    loop = asyncio.get_running_loop()
    stream = model_replica.channel(caller=caller)
    channel_id = await anext(stream)
    long_row = GenerationRequest(request_id="long", prompt_token_ids=[5, 6, 7],
                                 params=SamplingParams(max_tokens=2000, temperature=0, ignore_eos=True))
    await model_replica.submit(channel_id, [long_row])
    started, produced = loop.time(), 0
    async for outputs in stream:
        produced += sum(len(o.token_ids) for o in outputs)
        if loop.time() - started > stop_after_s:
            await stream.aclose()
            break
    return loop.time() - started, produced


async def test_a_replica_stops_the_rows_of_a_silent_caller_even_while_they_produce(tiny_engine_factory, monkeypatch):
    """A dead ingress sends no more touches; its rows keep producing, and Serve keeps draining
    their stream, so the replica must notice the silence between outputs too."""
    from deployments import replica

    monkeypatch.setattr(replica, "CALLER_GONE_S", 0.5)
    model_replica = replica_with_engine(tiny_engine_factory)
    try:
        took, produced = await run_long_row(model_replica)
        assert 0.4 < took < 3 and 0 < produced < 2000, (took, produced)  # stopped while producing
        assert not model_replica._channels
        await asyncio.sleep(0.5)
        assert model_replica.engine.num_sequences == 0
    finally:
        model_replica.engine.shutdown()


async def test_a_silent_caller_whose_actor_lives_keeps_its_rows_until_it_dies(ray_cluster, lively_model, monkeypatch):
    """Touches cannot reach a draining replica (Serve routes new calls to the others), so silence
    alone stops nothing: the replica asks Ray whether the caller's actor exists."""
    import ray

    from deployments import replica
    from tests.conftest import engine_factory

    @ray.remote(num_cpus=0)
    class Caller:
        def ping(self):
            return True

    monkeypatch.setattr(replica, "CALLER_GONE_S", 0.3)
    caller = Caller.options(name="test-replica-channel-caller", namespace="tests").remote()
    ray.get(caller.ping.remote())
    model_replica = replica_with_engine(engine_factory(*lively_model))
    try:
        took, _ = await run_long_row(model_replica, ("test-replica-channel-caller", "tests"), stop_after_s=2)
        assert took >= 2, took  # alive: the channel ran until we closed it
        ray.kill(caller)
        await asyncio.sleep(0.5)
        took, _ = await run_long_row(model_replica, ("test-replica-channel-caller", "tests"))
        assert took < 3, took  # gone: stopped after the silence
    finally:
        model_replica.engine.shutdown()

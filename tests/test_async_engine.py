"""AsyncEngine and OutputChannel: the engine thread seen from asyncio (no Ray)."""

import asyncio

from serve_app.engine.async_engine import AsyncEngine, OutputChannel
from serve_app.engine.types import GenerationRequest, SamplingParams


def req(rid, n=6):
    return GenerationRequest(request_id=rid, prompt_token_ids=[5, 6, 7],
                             params=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))


async def test_one_channel_carries_many_requests_one_message_per_step(tiny_engine_factory):
    engine = AsyncEngine(tiny_engine_factory())
    try:
        channel = OutputChannel(engine)
        channel.submit([req("a"), req("b"), req("c", n=3)])
        tokens: dict[str, int] = {}
        messages = 0
        while channel.pending:
            batch = await asyncio.wait_for(channel.next(), 10)
            messages += 1
            assert len({o.request_id for o in batch}) == len(batch)  # each request at most once per message
            for out in batch:
                tokens[out.request_id] = tokens.get(out.request_id, 0) + len(out.token_ids)
        assert tokens == {"a": 6, "b": 6, "c": 3}
        assert messages <= 6  # not one per request per step
    finally:
        engine.shutdown()


async def test_closing_a_channel_cancels_what_it_has_in_flight(tiny_engine_factory):
    engine = AsyncEngine(tiny_engine_factory())
    try:
        channel = OutputChannel(engine)
        channel.submit([req("long", n=1500), req("short", n=2)])
        while "short" in channel.pending:
            await asyncio.wait_for(channel.next(), 10)
        channel.close()
        for _ in range(200):
            if engine.engine.num_sequences == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.engine.num_sequences == 0 and engine.engine.num_cancelled == 1
        assert engine.engine.blocks.num_free_blocks == engine.engine.blocks.num_blocks
    finally:
        engine.shutdown()

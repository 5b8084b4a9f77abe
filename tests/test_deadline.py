"""One deadline per request: the first chunk's wait and the rest's share it."""

import asyncio
import json
import time

import pytest
import requests

from deployments.ingress import sse
from serve_app.deadline import Deadline
from serve_app.protocol import APIError
from tests.conftest import TINY


async def slow_start_then_steady(first_after: float, every: float):
    await asyncio.sleep(first_after)
    n = 0
    while True:
        yield {"n": n}
        n += 1
        await asyncio.sleep(every)


async def test_a_stream_ends_at_its_deadline_however_long_its_first_chunk_took():
    started = time.monotonic()
    deadline = Deadline(0.6)
    stream = deadline.stream(slow_start_then_steady(first_after=0.4, every=0.05))
    first = await anext(stream)
    events = [e async for e in sse(first, stream)]
    took = time.monotonic() - started
    assert 0.55 < took < 0.85, took  # one deadline: not 0.6 s for the first chunk and 0.6 s again
    assert events[-1] == "data: [DONE]\n\n"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "request_timeout"


async def test_an_answer_past_its_deadline_is_504_and_its_work_is_cancelled():
    cancelled = asyncio.Event()

    async def work():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(APIError) as info:
        await Deadline(0.1).run(work())
    assert info.value.status == 504 and cancelled.is_set()


def test_a_served_stream_ends_at_its_x_request_timeout(server):
    started = time.monotonic()
    r = requests.post(f"{server}/v1/completions", stream=True, timeout=60, headers={"X-Request-Timeout": "1.5"},
                      json={"model": TINY, "prompt": "count", "max_tokens": 1900, "ignore_eos": True, "n": 8,
                            "stream": True, "temperature": 1.0, "seed": 1})
    # seeded: one token per step; 8 choices: the whole stream outlasts the deadline on fast hosts too
    # (an AVX-512 EPYC streams one choice's 1,900 tokens in 1.0 s, eight in 3.5 s)
    assert r.status_code == 200
    events = [line for line in r.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    took = time.monotonic() - started
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == "request_timeout"
    assert 1.3 < took < 3.0, took

"""Paced draining of an asyncio queue into few, larger messages.

Ray streams have no backpressure: a producer yielding once per decode step can
outrun a consumer two hops away, and a backlog builds (late tokens, late
cancels). Draining everything that arrived within `interval_s` of the previous
message bounds the message rate; the first message leaves at once, so time to
first token does not change.
"""

from __future__ import annotations

import asyncio


class PacedReader:
    def __init__(self, queue: asyncio.Queue, interval_s: float):
        self._queue = queue
        self._interval = interval_s
        self._last = float("-inf")

    async def next_batch(self) -> list:
        items = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        delay = self._last + self._interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        self._last = loop.time()
        return items

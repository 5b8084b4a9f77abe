"""One deadline per request, set where the request enters (HTTP route or handle method).

Every wait of that request, for its answer or for each chunk of its stream, ends by the same
instant, so a stream cannot outlive its timeout however its time splits between the first
chunk and the rest. When it passes, the request gets one 504 (or, mid-stream, one error event),
built here and only here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from serve_app.protocol import APIError

T = TypeVar("T")


class Deadline:
    def __init__(self, timeout_s: float | None):
        self.timeout_s = timeout_s
        self.at = None if timeout_s is None else asyncio.get_running_loop().time() + timeout_s

    def expired(self) -> APIError:
        return APIError(504, f"the request did not finish within its {self.timeout_s:g} s timeout",
                        type="timeout_error", code="request_timeout")

    async def run(self, work: Awaitable[T]) -> T:
        """`await work`, or 504 at the deadline (the work is cancelled)."""
        try:
            async with asyncio.timeout_at(self.at):
                return await work
        except TimeoutError:
            raise self.expired() from None

    async def stream(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """The items, each waited for until the deadline; then 504. Only the waits are timed: the
        consumer's own time between items counts, as it does toward the deadline."""
        try:
            while True:
                try:
                    item = await self.run(anext(items))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            await items.aclose()

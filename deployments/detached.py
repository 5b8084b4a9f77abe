"""Fire-and-forget handle calls that outlive the request that makes them.

Serve cancels the handle calls a request made when that request is cancelled
(a client disconnected). A cleanup call made while unwinding (cancel the rows
on the replica, release the lease) would be cancelled with it, sometimes
before it is sent. Made from an empty context, it belongs to no request.
"""

from __future__ import annotations

import asyncio
import contextvars

_tasks: set[asyncio.Task] = set()  # strong references until they finish


def call_detached(method, *args, **kwargs):
    """`method.remote(*args, **kwargs)` outside the current request's context."""
    return contextvars.Context().run(method.remote, *args, **kwargs)


def broadcast_detached(handle, method_name: str, *args) -> None:
    """`handle.broadcast(method_name, *args)` to every replica, outside the current request's
    context. A broadcast is sent only once its results are awaited: a task awaits them."""
    async def send():
        await handle.broadcast(method_name, *args).results_async(timeout_s=30, return_exceptions=True)

    task = contextvars.Context().run(asyncio.get_running_loop().create_task, send())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)

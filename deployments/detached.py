"""Fire-and-forget handle calls that outlive the request that makes them.

Serve cancels the handle calls a request made when that request is cancelled
(a client disconnected). A cleanup call made while unwinding (cancel the rows
on the replica, release the lease) would be cancelled with it, sometimes
before it is sent. Made from an empty context, it belongs to no request.
"""

from __future__ import annotations

import contextvars


def call_detached(method, *args, **kwargs):
    """`method.remote(*args, **kwargs)` outside the current request's context."""
    return contextvars.Context().run(method.remote, *args, **kwargs)

"""Keep Serve's access log for requests, not for the graph's own polling.

Serve logs every handle call at INFO ("CALL queue_length OK 1.1ms"). Each model
replica asks every router for its queue length each second, probes call
`/health`, and operators poll `/stats`: those lines buried every real event of
`serve run`'s console. They are dropped when they succeed; failures still show.
"""

from __future__ import annotations

import logging

# Handle methods and HTTP routes called on a timer, not by a client's request.
# `release` too: a cleanup sent outside the request (it carries a fresh id, not the request's).
ROUTINE_CALLS = frozenset({"queue_length", "ready_replicas", "info", "stats", "abandon", "release", "renew",
                           "touch", "wake"})
ROUTINE_ROUTES = frozenset({"/health", "/live", "/stats"})


class QuietRoutineCalls(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "serve_access_log", False) or record.levelno > logging.INFO:
            return True
        parts = record.getMessage().split()  # "CALL queue_length OK 1.1ms" / "GET /health 200 0.9ms"
        if len(parts) < 3 or parts[2] not in ("OK", "200"):
            return True
        target = parts[1]
        return not (target in ROUTINE_CALLS or target.split("?")[0].rstrip("/").endswith(tuple(ROUTINE_ROUTES)))


def install() -> None:
    """Filter this process's Serve access log (idempotent)."""
    serve_logger = logging.getLogger("ray.serve")
    if not any(isinstance(f, QuietRoutineCalls) for f in serve_logger.filters):
        serve_logger.addFilter(QuietRoutineCalls())

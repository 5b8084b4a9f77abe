"""Settings of Ray's own processes that serve_app is tuned for.

They only take effect in the environment of the process that starts Ray (the
raylet passes it on to every worker, Serve's controller included), so they are
applied before Ray starts: `make serve` runs `python -m serve_app.ray_env serve
run serve_config.yaml`, the benchmark and the tests call `apply()`, and a
cluster sets them where it runs `ray start` (README "Operations"). A value
already in the environment wins.
"""

from __future__ import annotations

import os
import sys

RAY_ENV = {
    # Serve's controller wakes every 0.1 s by default. On a small CPU host each wake-up
    # preempts a thread of the model's 2-thread forward: an idle app slowed a batch-1 decode
    # step from 37.5 ms (controller stopped) to 46.8 ms; at 0.5 s, 39.8 ms. The cost: state
    # changes (deploy, scale, replace a replica) are noticed up to 0.5 s later.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
}


def apply(env: dict[str, str] | None = None) -> dict[str, str]:
    """Add RAY_ENV's settings to `env` (default: this process's environment) where unset."""
    env = os.environ if env is None else env
    for name, value in RAY_ENV.items():
        env.setdefault(name, value)
    return env


if __name__ == "__main__":  # python -m serve_app.ray_env <command...>: run it with these settings
    if len(sys.argv) < 2:
        sys.exit("usage: python -m serve_app.ray_env <command> [args...]")
    os.execvpe(sys.argv[1], sys.argv[1:], apply(dict(os.environ)))

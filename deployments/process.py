"""What every Serve replica process of the app does first, in one place."""

from __future__ import annotations

from typing import TypeVar

from deployments import metrics, quiet_logs
from serve_app.config import AppWideArgs

Args = TypeVar("Args", bound=AppWideArgs)


def start_process(args: Args, model_name: str = "") -> Args:
    """Routine calls out of the access log, metrics on or off. `args` is the config `build_app`
    validated once for the whole app; deployments receive it as an object and never re-validate it."""
    quiet_logs.install()
    metrics.set_enabled(args.metrics, model_name=model_name)
    return args

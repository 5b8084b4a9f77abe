"""`serve run <config>` in a subprocess with its own Ray cluster, as a user starts the app."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from serve_app import ray_env

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def serve_run(config: dict, workdir: Path, base: str, verify=True, timeout_s: float = 300):
    """Start `serve run` on `config`, wait until `base`/health answers 200, stop it on exit."""
    path = workdir / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_bin = Path(sys.executable).with_name("serve")
    # Its own cluster, like a user's first run, with the settings `make serve` uses.
    env = ray_env.apply({**os.environ, "RAY_ADDRESS": "local"})
    # Its output goes to a file: an undrained pipe fills (64 KB) and blocks `serve run` mid-log,
    # so it could neither finish starting nor exit on SIGINT.
    log_path = workdir / "serve_run.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([str(serve_bin), "run", str(path)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout_s  # a first start converts the GGUF weights once (~30 s)
    try:
        while True:
            try:
                if requests.get(f"{base}/health", timeout=2, verify=verify).ok:
                    break
            except requests.RequestException:  # proxy not up, or up before the app
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"serve run did not come up:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            # Usually 8-16 s. Ray's `serve.shutdown()` sometimes waits its full 30 s on a retried
            # graceful_shutdown of the controller that already stopped everything (the log ends
            # "Task ServeController.graceful_shutdown failed ... will be retried"): not worth waiting
            # for. Ray's processes share this group and die with it.
            proc.wait(timeout=25)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()

"""Shared fixtures: the tiny offline model, and one local Ray cluster per session."""

from __future__ import annotations

import socket

import pytest

TINY = "builtin:tiny-llama"
# The app most integration tests talk to: small batches, a short batching window.
APP_ARGS = dict(model=TINY, num_cpus=0, num_gpus=0, max_batch_size=8, batch_wait_timeout_s=0.05,
                max_queue_len=64, max_body_bytes=64_000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model():
    from serve_app.engine.loading import load_model

    return load_model(TINY)


@pytest.fixture(scope="session")
def tiny_engine_factory(tiny_model):
    from serve_app.engine.batch_engine import BatchEngine
    from serve_app.engine.loading import eos_token_ids

    model, tokenizer = tiny_model

    def make(max_batch_size: int = 8, max_model_len: int = 2048) -> BatchEngine:
        return BatchEngine(model, tokenizer, eos_token_ids(model, tokenizer), max_batch_size, max_model_len)

    return make


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster for the whole session (startup costs ~10 s). Two logical
    GPUs exist so GPU pinning can be tested on a CPU-only machine."""
    import ray
    from ray import serve

    ray.init(num_cpus=8, num_gpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def server(ray_cluster) -> str:
    """Base URL of the default test app (tiny model, one CPU replica)."""
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app(APP_ARGS), name="serve_app", route_prefix="/")
    return ray_cluster

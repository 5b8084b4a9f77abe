"""Readiness while no model replica runs, and a redeploy that loses no running stream."""

import threading
import time

import httpx
import pytest
import requests
from ray import serve

from serve_app.app import build_app
from tests.conftest import APP_ARGS, TINY, wait_for

SCALE_TO_ZERO = {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0, "upscale_delay_s": 0,
                 "downscale_delay_s": 600}


@pytest.fixture(scope="module")
def cold_app(ray_cluster):
    serve.run(build_app({**APP_ARGS, "autoscaling": SCALE_TO_ZERO}), name="cold", route_prefix="/cold")
    yield f"{ray_cluster}/cold"
    serve.delete("cold")


def test_health_is_503_until_a_model_replica_runs_and_live_is_200_throughout(cold_app):
    r = requests.get(f"{cold_app}/health", timeout=10)
    assert r.status_code == 503 and r.headers["Retry-After"] and r.json()["error"]["code"] == "not_ready"
    assert TINY in r.json()["error"]["message"]  # names the model that has no replica yet
    assert requests.get(f"{cold_app}/live", timeout=10).status_code == 200
    # A request scales the model from zero; it waits for the replica and is answered.
    reply = requests.post(f"{cold_app}/v1/completions", json={"model": TINY, "prompt": "hi", "max_tokens": 2},
                          timeout=120)
    assert reply.status_code == 200, reply.text
    wait_for(lambda: requests.get(f"{cold_app}/health", timeout=10).status_code == 200, 10, "readiness")
    assert requests.get(f"{cold_app}/health", timeout=10).json()["ready_replicas"] == {TINY: 1}


def test_a_redeploy_lets_running_streams_finish(ray_cluster):
    args = {**APP_ARGS, "stream_interval_s": 0.0}
    serve.run(build_app(args), name="redeploy", route_prefix="/redeploy")
    base = f"{ray_cluster}/redeploy"
    try:
        body = {"model": TINY, "prompt": "long", "max_tokens": 1950, "ignore_eos": True, "stream": True,
                "temperature": 0}
        events: list[str] = []
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=300) as r:
            lines = r.iter_lines()
            events.append(next(line for line in lines if line.startswith("data: {")))
            # A new version of every deployment (the args changed): Serve starts new replicas
            # and drains the old ones, which must finish this stream first.
            redeploy = threading.Thread(target=serve.run, args=(build_app({**args, "max_queue_len": 65}),),
                                        kwargs={"name": "redeploy", "route_prefix": "/redeploy"})
            redeploy.start()
            started = time.monotonic()
            events += [line for line in lines if line.startswith("data: ")]
            streamed_for = time.monotonic() - started
        redeploy.join(120)
        print(f"stream went on {streamed_for:.1f} s after the redeploy began; redeploy took "
              f"{time.monotonic() - started:.1f} s")
        assert events[-1] == "data: [DONE]"
        assert not any('"error"' in e for e in events), [e for e in events if '"error"' in e][:1]
        text = "".join(httpx.Response(200, content=e[6:]).json()["choices"][0]["text"] for e in events[:-1])
        assert len(text) > 100
        assert requests.post(f"{base}/v1/completions", json={"model": TINY, "prompt": "hi", "max_tokens": 2},
                             timeout=60).status_code == 200
    finally:
        serve.delete("redeploy")

"""Queue-length autoscaling and GPU pinning on a real local Ray cluster."""

import concurrent.futures as cf
import threading
import time

import pytest
import requests
from ray import serve

from serve_app.app import build_app
from tests.conftest import APP_ARGS, TINY, deployment, model_stats, wait_for

SCALING = {"min_replicas": 1, "max_replicas": 3, "target_sequences_per_replica": 2, "upscale_delay_s": 0.5,
           "downscale_delay_s": 3, "metrics_interval_s": 0.25, "look_back_period_s": 1.0}


def running_replicas(app: str) -> int:
    status = serve.status().applications[app].deployments[deployment("ModelReplica")]
    return status.replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def scaling_app(ray_cluster):
    # torch_threads unset: up to 3 CPU replicas share the cores (AppArgs.cpu_threads). At 2 threads
    # each on 2 cores, a busy host stalled a replica's 1,900-token request past the grace period.
    args = {**APP_ARGS, "max_batch_size": 4, "autoscaling": SCALING, "graceful_shutdown_timeout_s": 60}
    serve.run(build_app(args), name="scale", route_prefix="/scale")
    yield f"{ray_cluster}/scale"
    serve.delete("scale")


def complete(base, prompt, max_tokens=120):
    r = requests.post(f"{base}/v1/completions", timeout=300, json={
        "model": TINY, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0})
    return r.status_code, r.json()


def test_scales_on_sequences_of_one_batched_request(scaling_app):
    """One HTTP request at a time carrying 16 prompts: Serve counts 1 request, the policy counts 16
    sequences. The load is held (one batched request after another) until the second replica is
    seen, however fast this host works through one."""
    assert running_replicas("scale") == 1
    seen = threading.Event()
    replies = []

    def one_batched_request_at_a_time():
        while not seen.is_set():
            replies.append(requests.post(f"{scaling_app}/v1/completions", timeout=300, json={
                "model": TINY, "prompt": [f"prompt {i}" for i in range(16)], "max_tokens": 300,
                "ignore_eos": True}))

    with cf.ThreadPoolExecutor(1) as pool:
        load = pool.submit(one_batched_request_at_a_time)
        try:
            wait_for(lambda: running_replicas("scale") >= 2, 90, "a second replica under one batched request")
        finally:
            seen.set()
        load.result()
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    assert all([c["finish_reason"] for c in r.json()["choices"]] == ["length"] * 16 for r in replies)
    wait_for(lambda: running_replicas("scale") == 1, 90, "scale back down")


def test_scale_up_under_load_and_down_after_with_nothing_lost(scaling_app):
    stop = threading.Event()
    results: list[tuple[int, dict]] = []

    def client(i):
        n = 0
        while not stop.is_set():
            results.append(complete(scaling_app, f"client {i} request {n}"))
            n += 1

    def sample():
        stats = model_stats(scaling_app, timeout=10)["router"]
        return running_replicas("scale"), stats["queue_length"], stats["in_flight_sequences"]

    timeline: list = []
    threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    try:
        up_s = wait_for(lambda: running_replicas("scale") >= 2, 90, "scale up", timeline, sample)
    finally:
        stop.set()  # clients finish the request they are in: those run during the scale-down
    for t in threads:
        t.join(timeout=300)
    replicas_at_peak = running_replicas("scale")
    # Two long requests land on different replicas (least-loaded routing). Two sequences want one
    # replica, so at least one replica removed during the scale-down still holds a running sequence:
    # it must finish it (graceful shutdown) rather than drop it.
    long_results: list = []
    long_threads = [threading.Thread(target=lambda i=i: long_results.append(
        complete(scaling_app, f"long {i}", max_tokens=1900))) for i in range(2)]
    for t in long_threads:
        t.start()
    timeline.append(("load stopped",))
    down_s = wait_for(lambda: running_replicas("scale") == 1, 120, "scale down", timeline, sample)
    for t in long_threads:
        t.join(timeout=300)
    print(f"\nscale-up after {up_s:.1f} s to {replicas_at_peak}; back to 1 replica {down_s:.1f} s after load stopped")
    print("t_s, replicas, router_queue, in_flight_sequences:", timeline)
    print(f"requests: {len(results) + len(long_results)} sent, "
          f"{sum(s == 200 for s, _ in results + long_results)} complete")
    assert results and all(status == 200 for status, _ in results)
    assert all(body["usage"]["completion_tokens"] == 120 for _, body in results)  # none cut short
    # An error's body is in the comparison, so a failure says what went wrong.
    assert [(s, b["usage"]["completion_tokens"] if "usage" in b else b) for s, b in long_results] == [(200, 1900)] * 2


@pytest.fixture(scope="module")
def zero_app(ray_cluster):
    args = {**APP_ARGS, "autoscaling": {**SCALING, "min_replicas": 0, "max_replicas": 1, "initial_replicas": 0}}
    serve.run(build_app(args), name="zero", route_prefix="/zero")
    yield f"{ray_cluster}/zero"
    serve.delete("zero")


def test_scale_from_zero_holds_the_request_until_a_replica_starts(zero_app):
    assert running_replicas("zero") == 0
    start = time.monotonic()
    status, body = complete(zero_app, "wake up", max_tokens=8)
    print(f"\ncold start answered in {time.monotonic() - start:.1f} s")
    assert status == 200 and body["usage"]["completion_tokens"] == 8
    assert running_replicas("zero") == 1


def test_gpu_pinning_with_logical_gpus(ray_cluster):
    """Two replicas, one logical GPU each: distinct assigned ids; torch sees no CUDA, so CPU compute."""
    args = {**APP_ARGS, "num_gpus": 1, "autoscaling": {"min_replicas": 2, "max_replicas": 2}}
    serve.run(build_app(args), name="gpu", route_prefix="/gpu")
    try:
        infos = model_stats(f"{ray_cluster}/gpu", replicas=True)["router"]["replica_info"]
        assert len(infos) == 2
        gpu_ids = [tuple(i["gpu_ids"]) for i in infos]
        assert all(len(ids) == 1 for ids in gpu_ids) and len(set(gpu_ids)) == 2, gpu_ids
        assert [i["cuda_visible_devices"] for i in infos] == [ids[0] for ids in gpu_ids]
        assert {i["device"] for i in infos} == {"cpu"}
        r = requests.post(f"{ray_cluster}/gpu/v1/completions", timeout=60,
                          json={"model": TINY, "prompt": "hi", "max_tokens": 4})
        assert r.status_code == 200
    finally:
        serve.delete("gpu")

"""Streaming arrives incrementally; a client that leaves frees its batch slot."""

import json
import threading
import time

import httpx
import pytest
import requests
from ray import serve

from tests.conftest import TINY, model_stats

LONG = 1900  # tokens: several seconds of decoding on the tiny model


def router_stats(server):
    return model_stats(server, timeout=10)["router"]


def engine_stats(server) -> dict:
    """Summed over model replicas: sequences their engines hold, and how many were cancelled."""
    infos = model_stats(server, replicas=True, timeout=10)["router"]["replica_info"]
    return {"in_flight": sum(i["engine_sequences"] for i in infos),
            "cancelled": sum(i["cancelled_sequences"] for i in infos)}


def wait_until_idle(server, timeout=30.0) -> float:
    """Until neither the router (leases) nor any engine (sequences) holds anything."""
    start = time.monotonic()
    while router_stats(server)["in_flight_sequences"] > 0 or engine_stats(server)["in_flight"] > 0:
        if time.monotonic() - start > timeout:
            pytest.fail("sequences still in flight")
        time.sleep(0.02)
    return time.monotonic() - start


def sse_events(response):
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[len("data: "):]


def test_first_chunk_arrives_while_generation_is_still_running(server):
    body = {"model": TINY, "prompt": "hello", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
        first = json.loads(next(events))
        assert first["object"] == "text_completion"
        assert engine_stats(server)["in_flight"] >= 1  # still generating
        rest = list(events)
    assert rest[-1] == "[DONE]"
    text = first["choices"][0]["text"] + "".join(json.loads(e)["choices"][0]["text"] for e in rest[:-1])
    unary = requests.post(f"{server}/v1/completions", timeout=60,
                          json={**body, "stream": False}).json()["choices"][0]["text"]
    assert text == unary


def test_disconnect_frees_the_slot_and_the_batch_mate_finishes(server):
    wait_until_idle(server)
    mate = {"model": TINY, "prompt": "the quick brown fox", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    expected = requests.post(f"{server}/v1/completions", json=mate, timeout=60).json()["choices"][0]["text"]
    cancelled_before = engine_stats(server)["cancelled"]
    result = {}
    long_body = {"model": TINY, "prompt": "a", "max_tokens": LONG, "temperature": 0, "ignore_eos": True,
                 "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=long_body, timeout=60) as r:
        events = sse_events(r)
        next(events)
        mate_thread = threading.Thread(target=lambda: result.update(
            r=requests.post(f"{server}/v1/completions", json=mate, timeout=60).json()))
        mate_thread.start()
        for _ in range(20):
            next(events)
        assert engine_stats(server)["in_flight"] >= 1
    closed = time.monotonic()  # leaving the block closes the connection mid-stream
    mate_thread.join(timeout=60)
    freed_s = wait_until_idle(server)
    print(f"\ndisconnect -> slot freed in {freed_s * 1000:.0f} ms (after close at {closed:.3f})")
    assert result["r"]["choices"][0]["text"] == expected
    assert engine_stats(server)["cancelled"] == cancelled_before + 1
    assert freed_s < 3.0  # the whole request would have needed far longer


def test_non_streaming_client_that_times_out_is_cancelled(server):
    wait_until_idle(server)
    cancelled_before = engine_stats(server)["cancelled"]
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{server}/v1/completions", timeout=0.5,
                      json={"model": TINY, "prompt": "a", "max_tokens": LONG, "ignore_eos": True})
    assert wait_until_idle(server) < 5.0
    assert engine_stats(server)["cancelled"] == cancelled_before + 1


def test_handle_caller_cancelling_a_stream_frees_the_slot(server):
    wait_until_idle(server)
    handle = serve.get_app_handle("serve_app")
    gen = handle.options(stream=True).completions_stream.remote(
        {"model": TINY, "prompt": "a", "max_tokens": LONG, "ignore_eos": True, "stream": True})
    for _ in range(3):
        next(gen)
    gen.cancel()
    assert wait_until_idle(server) < 3.0


def test_request_timeout_header_gives_504_and_frees_the_slot(server):
    wait_until_idle(server)
    r = requests.post(f"{server}/v1/completions", headers={"X-Request-Timeout": "0.3"}, timeout=30,
                      json={"model": TINY, "prompt": "a", "max_tokens": LONG, "ignore_eos": True})
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "request_timeout"
    assert wait_until_idle(server) < 3.0

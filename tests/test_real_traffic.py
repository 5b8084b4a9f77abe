"""Real traffic on a real cluster: clients arriving one by one, long prompts, scaled-out routing."""

import concurrent.futures as cf
import json
import threading
import time

import httpx
import pytest
import requests
from ray import serve

from serve_app.app import build_app
from tests.conftest import APP_ARGS, TINY, deployment, model_stats, wait_for


@pytest.fixture(scope="module")
def scaled_out(ray_cluster):
    """Two ingress and two router replicas in front of one model replica; small step budget."""
    args = {**APP_ARGS, "max_batch_size": 4, "router_replicas": 2, "ingress_replicas": 2,
            "max_num_batched_tokens": 32}
    serve.run(build_app(args), name="scaled", route_prefix="/scaled")
    yield f"{ray_cluster}/scaled"
    serve.delete("scaled")


def complete(base, prompt, max_tokens):
    r = requests.post(f"{base}/v1/completions", timeout=120, json={
        "model": TINY, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_closed_loop_clients_get_their_exact_solo_answers_through_two_routers(scaled_out):
    work = [(f"user {u} question {q}: the quick brown fox", 8 + 7 * ((u + q) % 5)) for u in range(8) for q in range(3)]
    solo = {p: complete(scaled_out, p, n) for p, n in work[:6]}  # answers alone, before any load

    def user(u):  # each user sends its next request when the last one ends
        return [(p, n, complete(scaled_out, p, n)) for p, n in work[u * 3:(u + 1) * 3]]

    with cf.ThreadPoolExecutor(8) as pool:
        answers = [a for batch in pool.map(user, range(8)) for a in batch]
    assert len(answers) == 24
    for prompt, _, text in answers:
        if prompt in solo:
            assert text == solo[prompt]
    stats = model_stats(scaled_out, timeout=10)["router"]
    assert stats["routers"] == 2 and stats["admitted"] >= 30 and stats["queue_length"] == 0

    def router_stats() -> dict:
        return model_stats(scaled_out, timeout=10)["router"]

    # Releases are fire-and-forget: give the last ones a moment.
    wait_for(lambda: router_stats()["in_flight_sequences"] == 0, 5, "every lease released")
    assert router_stats()["expired_leases"] == 0  # every lease came home, none expired
    # Both routers admitted work (Serve spreads the ingresses' calls over them).
    routers = serve.get_deployment_handle(deployment("Router"), "scaled").broadcast("stats").results()
    assert all(r["admitted"] > 0 for r in routers), routers


def test_a_long_prompt_does_not_stall_a_running_stream(scaled_out):
    """With a 32-token step budget, a 1,600-token prompt is prefilled over ~50 steps while the
    running stream keeps receiving tokens; prefilled whole, it would freeze the stream."""
    # logprobs: 0 makes each message list its tokens (the ingress merges tokens into messages).
    body = {"model": TINY, "prompt": "hello", "max_tokens": 1500, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0}
    gaps, during_prefill = [], []
    long_sent = threading.Event()
    long_done = threading.Event()
    result = {}

    def send_long():
        long_sent.set()
        result["r"] = requests.post(f"{scaled_out}/v1/completions", timeout=120, json={
            "model": TINY, "prompt": "the quick brown fox " * 400, "max_tokens": 2})
        long_done.set()

    with httpx.stream("POST", f"{scaled_out}/v1/completions", json=body, timeout=120) as r:
        last = None
        sender = threading.Thread(target=send_long)
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.monotonic()
            if last is not None and long_sent.is_set() and not long_done.is_set():
                gaps.append(now - last)
                during_prefill += json.loads(line[6:])["choices"][0]["logprobs"]["tokens"]
            last = now
            if not sender.is_alive() and not long_sent.is_set():
                sender.start()
            if long_done.is_set():
                break
    sender.join(60)
    assert result["r"].status_code == 200
    assert len(during_prefill) >= 10, "the stream got no tokens while the long prompt was prefilled"
    assert max(gaps) < 1.0


def test_a_killed_model_replica_fails_its_requests_cleanly_and_the_app_recovers(scaled_out):
    """Runs last in this module: it kills the module's model replica."""
    import ray

    # Sampled, so no prompt-lookup drafts shorten it: a greedy 1,900-token stream could end within
    # the 0.3 s below on a fast host. One choice each: both fit the replica's KV cache (4,096 tokens),
    # so neither waits in a queue (a waiting request is served by the next replica instead).
    body = {"model": TINY, "prompt": "hello", "max_tokens": 1900, "temperature": 1.0, "seed": 1,
            "ignore_eos": True}
    unary = {}
    waiter = threading.Thread(target=lambda: unary.update(r=requests.post(
        f"{scaled_out}/v1/completions", json=body, timeout=120)))
    events = []
    with httpx.stream("POST", f"{scaled_out}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: {"))  # streaming has begun
        waiter.start()
        time.sleep(0.3)  # for the unary request to reach the replica
        replica = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                       if "scaled" in a["name"] and "ModelReplica" in a["name"])
        ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=False)
        events = [line[6:] for line in lines if line.startswith("data: ")]  # must end, not hang
    waiter.join(60)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "replica_failed"  # a final error event
    assert unary["r"].status_code == 503 and unary["r"].headers["Retry-After"]
    assert unary["r"].json()["error"]["code"] == "replica_failed"

    def serves() -> bool:
        r = requests.post(f"{scaled_out}/v1/completions", timeout=60, json={**body, "max_tokens": 4})
        assert r.status_code in (200, 503), r.text  # while no replica serves: 503, never anything else
        return r.status_code == 200

    wait_for(serves, 90, "a new replica serving")  # Serve starts a new replica

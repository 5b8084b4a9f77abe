"""Chaos: under steady streaming and unary load, kill a model replica, then a router, then
an ingress replica, and count how every request ended."""

import collections
import concurrent.futures
import json
import threading
import time

import httpx
import pytest
import ray
import requests
from ray import serve

from serve_app.app import build_app
from tests.conftest import APP_ARGS, TINY, deployment, model_stats, wait_for

WORKERS = 6
RECOVERY_S = 60  # the app serves normally again within this long after each kill


@pytest.fixture(scope="module")
def chaos_app(ray_cluster):
    # Draining is test_lifecycle's subject. Here a 15 s drain bounds the teardown: once in CI,
    # deleting the app after the kills outlasted serve.delete's 60 s (a request still counted
    # as ongoing somewhere held its replica in the default 120 s drain; not reproduced since).
    args = {**APP_ARGS, "router_replicas": 2, "ingress_replicas": 2, "max_batch_size": 8,
            "autoscaling": {"min_replicas": 2, "max_replicas": 2}, "graceful_shutdown_timeout_s": 15,
            "lease_timeout_s": 5}
    serve.run(build_app(args), name="chaos", route_prefix="/chaos")
    yield f"{ray_cluster}/chaos"
    serve.delete("chaos")


def one_request(base: str, i: int) -> str:
    """Send one request; return how it ended."""
    body = {"model": TINY, "prompt": f"request {i}", "max_tokens": 24, "ignore_eos": True}
    try:
        if i % 2:
            r = requests.post(f"{base}/v1/completions", json=body, timeout=60)
            return classify_status(r.status_code, r.headers, r.text)
        with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            if r.status_code != 200:
                r.read()
                return classify_status(r.status_code, r.headers, r.text)
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    except (requests.RequestException, httpx.HTTPError) as e:
        return f"connection error {type(e).__name__}"
    if not events or events[-1] != "[DONE]":
        return "stream cut"
    if any('"error"' in e and "error" in json.loads(e) for e in events[:-1]):
        return "sse error event"
    return "ok"


def classify_status(status: int, headers, text: str) -> str:
    if status == 200:
        return "ok"
    try:
        error = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return f"bare {status}"
    if status in (429, 503) and headers.get("Retry-After"):
        return f"{status} + Retry-After"
    return f"{status} {error.get('code')}"


def kill_one(app: str, deployment: str) -> None:
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if app in a["name"] and f"#{deployment}#" in a["name"]]
    victim = ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"])
    ray.kill(victim, no_restart=False)


def wait_until_serving(base: str) -> float:
    return wait_for(lambda: one_request(base, 1) == "ok" and one_request(base, 2) == "ok", RECOVERY_S,
                    "the app serving again")


def test_every_call_reaches_the_replica_its_router_chose(chaos_app):
    """Concurrent requests over two model replicas: each channel and submit lands on the replica
    the router admitted it to (Serve's FIFO routing used to hand a chosen replica to whichever
    request had waited longest)."""
    wait_for(lambda: model_stats(chaos_app)["router"]["replicas"] == 2, 60, "both model replicas")
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        outcomes = list(pool.map(lambda i: one_request(chaos_app, i), range(48)))
    assert outcomes == ["ok"] * 48, collections.Counter(outcomes)
    replicas = model_stats(chaos_app, replicas=True)["router"]["replica_info"]
    assert len(replicas) == 2 and all(r["misrouted_calls"] == 0 for r in replicas), replicas


def test_killing_each_part_under_load_loses_no_request(chaos_app):
    phase = ["warm-up"]
    outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    stop = threading.Event()

    def worker(w: int) -> None:
        i = w
        while not stop.is_set():
            outcome = one_request(chaos_app, i)
            outcomes[phase[0]][outcome] += 1  # the phase in which it ended
            i += WORKERS

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(WORKERS)]
    for t in threads:
        t.start()
    time.sleep(3)
    recovery = {}
    for part in ("ModelReplica", "Router", "Ingress"):
        phase[0] = f"killed {part}"
        kill_one("chaos", deployment(part) if part != "Ingress" else part)
        if part != "Ingress":  # /stats answers in JSON while a part is down
            r = requests.get(f"{chaos_app}/stats?replicas=1", timeout=30)
            assert r.status_code == 200 and "unreachable" in r.json()["models"][TINY], r.text
        recovery[part] = wait_until_serving(chaos_app)
        time.sleep(2)
    phase[0] = "after"
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(timeout=90)
    hung = sum(t.is_alive() for t in threads)
    report = {p: dict(c) for p, c in outcomes.items()}
    print("chaos outcomes:", json.dumps(report, indent=1), "recovery s:", recovery)

    assert hung == 0, report
    # Nothing orphaned in the engines: rows of requests whose caller died are finished or cancelled.
    def engine_rows() -> dict[str, int]:
        replicas = model_stats(chaos_app, replicas=True)["router"]["replica_info"]
        return {r["replica_id"]: r["engine_sequences"] for r in replicas}

    wait_for(lambda: not any(engine_rows().values()), 30, "empty engines", [], lambda: (engine_rows(),))
    # The routers hold nothing either: the leases of the requests the killed ingress was
    # answering expire once it stops renewing them (lease_timeout_s 5 s here); every other
    # lease was released or kept alive by its ingress, never reclaimed.
    def routers() -> dict:
        return model_stats(chaos_app)["router"]

    wait_for(lambda: routers()["in_flight_sequences"] == 0, 30, "routers holding nothing", [],
             lambda: (routers()["in_flight_sequences"],))
    router = routers()
    print("routers after:", {k: router[k] for k in ("in_flight_sequences", "expired_leases", "admitted")})
    assert router["expired_leases"] <= WORKERS, router
    allowed = {"ok", "503 + Retry-After", "429 + Retry-After", "sse error event"}
    for p in ("warm-up", "killed ModelReplica", "killed Router", "after"):
        assert set(outcomes[p]) <= allowed, (p, report)
    assert set(outcomes["warm-up"]) == {"ok"} and set(outcomes["after"]) == {"ok"}, report
    # An ingress replica that dies takes the requests it was answering: Ray's proxy answers
    # those with a plain 500 or cuts their stream (outside the app). Only those may fail so.
    ingress = outcomes["killed Ingress"]
    cut = sum(n for k, n in ingress.items() if k not in allowed)
    assert cut <= WORKERS, report
    assert all(k in allowed or k in ("bare 500", "stream cut") or k.startswith("connection error")
               for k in ingress), report


def test_a_dead_model_replica_leaves_the_routers_choices_within_seconds(chaos_app):
    """Serve notices a dead replica at its next health check (`health_check_period_s`, 2 s by
    default); until then a router may still place requests on it (the ingress then falls back
    to a live replica). With Serve's 10 s default the routers kept it for 5-10 s."""
    def running() -> int:  # the most any router sees
        return model_stats(chaos_app)["router"]["replicas"]

    wait_for(lambda: running() == 2, RECOVERY_S, "the earlier test's replacement replicas")
    kill_one("chaos", deployment("ModelReplica"))
    assert wait_for(lambda: running() < 2, 6, "the routers to drop the killed replica") < 6
    wait_until_serving(chaos_app)

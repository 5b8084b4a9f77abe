"""What a client sees when a Router dies: requests failed per second of outage.

Steady load (`clients` threads, each sending short unary completions one after another) on
the chat model; after `kill_after_s` one Router replica is killed with `ray.kill` (Serve
restarts it). Reported per `router_replicas` setting, measured in one Ray session: requests
that failed, the seconds in which any failed, and the longest time with no request succeeding.

    python -m bench.router_outage --router-replicas 1 2
"""

from __future__ import annotations

import argparse
import threading
import time
from collections import Counter

import requests

MODEL = "builtin:smollm2-135m-instruct"


def load(url: str, stop: threading.Event, log: list, i: int) -> None:
    body = {"model": MODEL, "prompt": f"Count to ten, request {i}:", "max_tokens": 4}
    while not stop.is_set():
        started = time.monotonic()
        try:
            r = requests.post(f"{url}/v1/completions", json=body, timeout=60)
            outcome = "ok" if r.status_code == 200 else f"{r.status_code}"
        except requests.RequestException as e:
            outcome = type(e).__name__
        log.append((started, time.monotonic(), outcome))
        if outcome != "ok":
            time.sleep(0.2)  # as a client honouring Retry-After: 1 would, roughly


def kill_router(app: str) -> None:
    import ray
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if a["name"].startswith(f"SERVE_REPLICA::{app}#") and "Router" in a["name"]]
    victim = ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"])
    ray.kill(victim, no_restart=False)


def measure(url: str, clients: int, kill_after_s: float, after_kill_s: float) -> dict:
    stop, log = threading.Event(), []
    threads = [threading.Thread(target=load, args=(url, stop, log, i), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(kill_after_s)
    killed = time.monotonic()
    kill_router("serve_app")
    time.sleep(after_kill_s)
    stop.set()
    for t in threads:
        t.join()
    after = [(s - killed, e - killed, o) for s, e, o in log if e >= killed]
    failed = [(s, e, o) for s, e, o in after if o != "ok"]
    ok_ends = sorted([0.0] + [e for s, e, o in after if o == "ok"])
    gap = max(b - a for a, b in zip(ok_ends, ok_ends[1:])) if len(ok_ends) > 1 else after_kill_s
    before = [1 for s, e, o in log if e < killed and o == "ok"]
    return {
        "requests after kill": len(after),
        "failed": len(failed),
        "failed by kind": dict(Counter(o for _, _, o in failed)),
        "seconds with a failure": len({int(e) for _, e, _ in failed}),
        "longest gap without a success (s)": round(gap, 2),
        "ok/s before kill": round(len(before) / kill_after_s, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--router-replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--kill-after-s", type=float, default=10)
    p.add_argument("--after-kill-s", type=float, default=30)
    p.add_argument("--port", type=int, default=8011)
    a = p.parse_args()

    import ray
    from ray import serve

    from serve_app import ray_env
    from serve_app.app import build_app

    ray_env.apply()
    ray.init(include_dashboard=False, log_to_driver=False)
    url = f"http://127.0.0.1:{a.port}"
    rows = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": a.port})
        for n in a.router_replicas:
            serve.run(build_app({"model": MODEL, "router_replicas": n}), name="serve_app", route_prefix="/")
            requests.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=120)
            rows.append((n, measure(url, a.clients, a.kill_after_s, a.after_kill_s)))
            serve.delete("serve_app")
    finally:
        serve.shutdown()
        ray.shutdown()
    keys = list(rows[0][1])
    print("| router_replicas | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for n, r in rows:
        print(f"| {n} | " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()

"""What clients see when a part of the app dies, and when a deadline passes (issue 22).

- router: steady load (`clients` threads, each sending short unary completions one after
  another); after `kill_after_s` one Router replica is killed with `ray.kill` (Serve restarts
  it). Per `router_replicas` setting, in one Ray session: requests that failed, the seconds in
  which any failed, and the longest time with no request succeeding.
- ingress: a long stream and a long unary request run; the ingress replica is killed; how long
  until the model replica stops their rows (its caller is gone).
- deadline: a stream with `X-Request-Timeout: 4` whose prefill alone takes about 3 s: when it
  ends, and how (it must end at ~4 s with an error event and [DONE]).

    python -m bench.faults --router-replicas 1 2
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


def kill(app: str, deployment: str) -> None:
    import ray
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if a["name"].startswith(f"SERVE_REPLICA::{app}#") and deployment in a["name"]]
    victim = ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"])
    ray.kill(victim, no_restart=False)


def measure(url: str, clients: int, kill_after_s: float, after_kill_s: float) -> dict:
    stop, log = threading.Event(), []
    threads = [threading.Thread(target=load, args=(url, stop, log, i), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(kill_after_s)
    killed = time.monotonic()
    kill("serve_app", "Router")
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


def replica_rows(url: str) -> int | None:
    try:
        info = requests.get(f"{url}/stats?replicas=1", timeout=5).json()["models"][MODEL]["router"]["replica_info"]
    except (requests.RequestException, KeyError, ValueError):
        return None  # the ingress is not back yet
    return sum(r.get("engine_sequences", 0) for r in info)


def dead_ingress(url: str) -> dict:
    """Seconds from killing the ingress until the model replica runs none of its rows."""
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 1500, "ignore_eos": True}

    def send(stream: bool):
        try:
            requests.post(f"{url}/v1/completions", json={**body, "stream": stream}, timeout=300)
        except requests.RequestException:
            pass
    for stream in (True, False):
        threading.Thread(target=send, args=(stream,), daemon=True).start()
    deadline = time.monotonic() + 60
    while (replica_rows(url) or 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)  # well into generation
    killed = time.monotonic()
    kill("serve_app", "Ingress")
    rows, timeline = None, []
    while time.monotonic() - killed < 120:
        rows = replica_rows(url)
        timeline.append((round(time.monotonic() - killed, 1), rows))
        if rows == 0:
            break
        time.sleep(0.5)
    return {"rows stopped after (s)": round(time.monotonic() - killed, 1) if rows == 0 else "not within 120 s",
            "rows seen": timeline[:: max(1, len(timeline) // 12)]}


def stream_deadline(url: str, timeout_s: float = 4.0) -> dict:
    """A stream whose prefill takes about 3 s, sent with X-Request-Timeout: 4."""
    prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 150)  # ~1,500 tokens
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    started = time.monotonic()
    first = None
    events = []
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=60,
                       headers={"X-Request-Timeout": str(timeout_s)}) as r:
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                first = first or time.monotonic() - started
                events.append(line[6:])
    took = time.monotonic() - started
    error = next((e for e in events if '"error"' in e), None)
    return {"X-Request-Timeout": timeout_s, "first token (s)": round(first or 0, 2), "ended at (s)": round(took, 2),
            "ended with": ("error event + [DONE]" if error and events[-1] == "[DONE]" else events[-1][:40])}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--router-replicas", type=int, nargs="+", default=[1, 2])
    p.add_argument("--skip", nargs="*", default=[], choices=("router", "ingress", "deadline"))
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
        warm = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        for n in [] if "router" in a.skip else a.router_replicas:
            serve.run(build_app({"model": MODEL, "router_replicas": n}), name="serve_app", route_prefix="/")
            requests.post(f"{url}/v1/completions", json=warm, timeout=120)
            rows.append((n, measure(url, a.clients, a.kill_after_s, a.after_kill_s)))
            serve.delete("serve_app")
        serve.run(build_app({"model": MODEL}), name="serve_app", route_prefix="/")
        requests.post(f"{url}/v1/completions", json=warm, timeout=120)
        if "deadline" not in a.skip:
            print("deadline:", stream_deadline(url), flush=True)
        if "ingress" not in a.skip:
            print("dead ingress:", dead_ingress(url), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    if not rows:
        return
    keys = list(rows[0][1])
    print("| router_replicas | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for n, r in rows:
        print(f"| {n} | " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()

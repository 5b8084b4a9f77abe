"""One benchmark run: serve_app against its baselines, same model, same prompts.

    python -m bench.run              # full sweep (concurrency 1, 8, 32, 64; Poisson; mixed lengths)
    python -m bench.run --quick      # concurrency 1 and 32 only, fewer requests

Writes bench/results/<name>.json, .md and .png, and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from bench.loadgen import Workload, run_load
from bench.report import chart, markdown_table

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not become healthy")


def sweep(system: str, url: str, model: str, levels: list[int], per_level: int, workload: Workload,
          stream: bool = True) -> list[dict]:
    runs = []
    for c in levels:
        n = max(per_level, c) if c > 1 else max(4, per_level // 8)
        report = asyncio.run(run_load(url, model, workload, n, concurrency=c, stream=stream))
        report["system"] = system
        runs.append(report)
        print(f"  {system:10s} c={c:<3d} {report['output_tokens_per_s']:7.1f} tok/s  "
              f"TTFT p50 {report['ttft_s']['p50'] * 1000:7.0f} ms  failed {report['failed_by_status']}", flush=True)
    return runs


def offline_limit(model_name: str, workload: Workload, batch_size: int, n: int, threads: int) -> dict:
    import torch

    from bench.baselines.offline import offline_throughput, prefill_latency
    from serve_app.engine.loading import load_model

    torch.set_num_threads(threads)
    model, tokenizer = load_model(model_name)
    prompts = [p for p, _ in workload.requests(n)]
    result = offline_throughput(model, tokenizer, prompts, batch_size, workload.output_tokens)
    result["prefill_s"] = prefill_latency(model, tokenizer, prompts[0])
    print(f"  offline    batch={batch_size} {result['output_tokens_per_s']:7.1f} tok/s  "
          f"prefill {result['prefill_s'] * 1000:.0f} ms", flush=True)
    return result


def run_serve_app(model: str, port: int, server_args: dict, levels, per_level, workload, extra_runs) -> list[dict]:
    import ray
    from ray import serve

    from serve_app.app import build_app

    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model": model, **server_args}), name="serve_app", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        asyncio.run(run_load(url, model, Workload(16, 4), 4, concurrency=4))  # warm-up
        runs = sweep("serve_app", url, model, levels, per_level, workload)
        for kind, kwargs in extra_runs:
            report = asyncio.run(run_load(url, model, **kwargs))
            report["system"] = "serve_app"
            runs.append(report)
            print(f"  serve_app  {kind:12s} {report['output_tokens_per_s']:7.1f} tok/s  "
                  f"TTFT p99 {report['ttft_s']['p99'] * 1000:7.0f} ms  failed {report['failed_by_status']}",
                  flush=True)
        return runs
    finally:
        serve.shutdown()
        ray.shutdown()


def run_naive(model: str, port: int, levels, per_level, workload) -> list[dict]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.baselines.naive_server", "--model", model,
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        # Serialized: more requests than the slowest level needs would only repeat the same number.
        return sweep("naive", url, model, levels, per_level, workload, stream=False)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_transformers_serve(model: str, port: int, workload: Workload, concurrency: int, n: int) -> list[dict]:
    """`transformers serve --continuous-batching`, the transformers package's own server.

    It rejects `ignore_eos` (422), so it gets the same prompts without it; throughput
    counts the tokens it actually returned."""
    from serve_app.engine.builtin_models import resolve_model_path

    path = resolve_model_path(model)
    cli = Path(sys.executable).with_name("transformers")
    # Its default cache sizing asks for 8 GB and refuses to start here: size it for 32 x 256 tokens.
    proc = subprocess.Popen([str(cli), "serve", path, "--continuous-batching", "--device", "cpu",
                             "--port", str(port), "--cb-num-blocks", "256", "--cb-block-size", "32",
                             "--cb-max-batch-tokens", "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, timeout=300)
        report = asyncio.run(run_load(url, path, workload, n, concurrency=concurrency, extra={}))
        report["system"] = "transformers serve (CB)"
        print(f"  tf-serve   c={concurrency:<3d} {report['output_tokens_per_s']:7.1f} tok/s  "
              f"TTFT p50 {(report['ttft_s']['p50'] or 0) * 1000:7.0f} ms  failed {report['failed_by_status']}",
              flush=True)
        return [report]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--name", default=None)
    p.add_argument("--levels", type=int, nargs="+", default=None)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    p.add_argument("--torch-threads", type=int, default=os.cpu_count())
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--only-transformers-serve", action="store_true",
                   help="run just the transformers-serve peer at concurrency 32 (appends to <name>.json)")
    a = p.parse_args()

    levels = a.levels or ([1, 32] if a.quick else [1, 8, 32, 64])
    per_level = 32
    workload = Workload(input_tokens=128, output_tokens=128)
    server_args = {"max_batch_size": a.max_batch_size, "batch_wait_timeout_s": a.batch_wait_timeout_s,
                   "torch_threads": a.torch_threads, "num_cpus": 1, "num_gpus": 0}
    extra = [] if a.quick else [
        ("poisson 1/s", dict(workload=workload, num_requests=32, request_rate=1.0)),
        ("mixed c=32", dict(workload=Workload(128, 128, mixed_output=(16, 256), seed=1), num_requests=64,
                            concurrency=32)),
    ]
    if a.only_transformers_serve:
        name = a.name or "full"
        path = RESULTS / f"{name}.json"
        payload = json.loads(path.read_text())
        try:
            extra_runs = run_transformers_serve(a.model, free_port(), workload, 32, 32)
        except Exception as e:  # report, don't hide: the peer may not start on this machine
            payload["transformers_serve_error"] = f"{type(e).__name__}: {e}"
            extra_runs = []
        payload["runs"] = [r for r in payload["runs"] if not r["system"].startswith("transformers")] + extra_runs
        path.write_text(json.dumps(payload, indent=2))
        write_reports(name, payload)
        return
    print(f"benchmark: {a.model}, levels {levels}, server args {server_args}", flush=True)
    offline = offline_limit(a.model, workload, 32, 32, a.torch_threads)
    runs = run_serve_app(a.model, free_port(), server_args, levels, per_level, workload, extra)
    naive_levels = [c for c in levels if c in (1, 32)]
    if not a.skip_naive:
        runs += run_naive(a.model, free_port(), naive_levels, per_level // 2, workload)

    def at(system, c):
        return next((r for r in runs if r["system"] == system and r["concurrency"] == c
                     and not r["workload"]["mixed_output"]), None)

    ours32, naive32, ours1 = at("serve_app", 32), at("naive", 32), at("serve_app", 1)
    ratios = {
        "vs_naive_c32": ours32 and naive32 and ours32["output_tokens_per_s"] / naive32["output_tokens_per_s"],
        "vs_offline_b32": ours32 and ours32["output_tokens_per_s"] / offline["output_tokens_per_s"],
        "ttft_overhead_c1_ms": ours1 and (ours1["ttft_s"]["p50"] - offline["prefill_s"]) * 1000,
    }
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch threads {a.torch_threads}"
    name = a.name or ("quick" if a.quick else "full")
    RESULTS.mkdir(exist_ok=True)
    payload = {"model": a.model, "machine": machine, "server_args": server_args, "offline": offline,
               "ratios": ratios, "runs": runs}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    write_reports(name, payload)


def write_reports(name: str, payload: dict) -> None:
    offline, ratios, runs = payload["offline"], payload["ratios"], payload["runs"]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    summary = (f"Model {payload['model']}; {payload['machine']}.\n\n"
               f"Offline limit (static batch 32): {offline['output_tokens_per_s']:.1f} tok/s; "
               f"batch-1 prefill {offline['prefill_s'] * 1000:.0f} ms.\n\n"
               f"- serve_app / naive at concurrency 32: **{fmt(ratios['vs_naive_c32'], '.2f')}×**\n"
               f"- serve_app / offline limit at batch 32: **{fmt(ratios['vs_offline_b32'], '.2f')}×**\n"
               f"- TTFT overhead over offline prefill at concurrency 1 (p50): "
               f"**{fmt(ratios['ttft_overhead_c1_ms'], '.0f')} ms**\n")
    if payload.get("transformers_serve_error"):
        summary += f"- transformers serve did not run: {payload['transformers_serve_error']}\n"
    table = markdown_table(runs)
    (RESULTS / f"{name}.md").write_text(summary + "\n" + table + "\n")
    chart(runs, offline["output_tokens_per_s"], RESULTS / f"{name}.png")
    print("\n" + summary + "\n" + table)


if __name__ == "__main__":
    main()

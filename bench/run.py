"""One benchmark run: the traffic people send, beside the offline limit and the baselines.

    python -m bench.run              # every scenario (~15 min on 2 cores)
    python -m bench.run --quick      # closed loop c=32, concurrency 1 and the wave only

serve_app runs, in one Ray session, the scenarios of `SCENARIOS`: steady-state
closed loops (completions with mixed lengths, greedy and sampled, chat with natural
stops, a mix with 2-3k-token prompts), Poisson arrivals at three rates, concurrency 1,
the synchronized wave, the prefill of one 2,000-token prompt, and multi-turn customer-service
chat (bench/multiturn.py: a shared policy system prompt, history carried). Each records the CPU
time of proxy, ingress, router and replica processes. The offline limit (`generate` on static
batches, no server) and the naive seed design run in the same invocation.

    python -m bench.run --with-llama-cpp     # + llama.cpp's llama-server (BF16 and F32 GGUFs of the
                                             #   same weights) on the same scenarios, and ratios to it
    python -m bench.run --only multi-turn --replicas 2   # + the multi-turn chat on 2 model replicas

llama-server is built once per machine (~12 min on 2 cores; `python -m bench.baselines.llama_cpp
build` does it ahead of time); a run that needs it builds it first, outside any measurement.

Writes bench/results/<name>.json and .md (and .png), and prints the tables.
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
from typing import get_args

import requests

from bench.cpu import CpuMeter
from bench.loadgen import Workload, run_load
from bench.multiturn import MultiTurnChat, run_multiturn
from bench.report import chart, cpu_table, markdown_table, multiturn_table
from serve_app.config import AppWideArgs, ModelArgs

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


MIXED = (16, 240)
C1_CHAT = "concurrency 1, chat, natural stops"
PREFILL = "prefill, one 2,000-token prompt"
MULTITURN = "multi-turn chat, 8 users × 4 turns, shared policy prompt"
# (label, run_load arguments). Steady-state rows first: they are what users send.
SCENARIOS = [
    ("closed loop c=32, mixed lengths", dict(workload=Workload(128, mixed_output=MIXED, seed=1),
                                             num_requests=96, concurrency=32)),
    ("closed loop c=32, chat, natural stops", dict(workload=Workload(chat=True, output_tokens=256,
                                                                     natural_stops=True, seed=2),
                                                   num_requests=96, concurrency=32)),
    ("closed loop c=16, 10% long prompts", dict(workload=Workload(128, mixed_output=MIXED, seed=3,
                                                                  long_prompts=(0.1, 2000, 3000)),
                                                num_requests=48, concurrency=16)),
    # What chat clients send (OpenAI's default temperature is 1; UIs often add a nucleus): the
    # same loop as the first, sampled instead of greedy.
    ("closed loop c=32, sampled (temperature 0.8, top-p 0.95)",
     dict(workload=Workload(128, mixed_output=MIXED, seed=1), num_requests=96, concurrency=32,
          extra={"ignore_eos": True, "temperature": 0.8, "top_p": 0.95})),
    ("poisson 0.3/s", dict(workload=Workload(128, mixed_output=MIXED, seed=4), num_requests=24, request_rate=0.3)),
    ("poisson 0.6/s", dict(workload=Workload(128, mixed_output=MIXED, seed=5), num_requests=24, request_rate=0.6)),
    ("poisson 0.9/s", dict(workload=Workload(128, mixed_output=MIXED, seed=6), num_requests=24, request_rate=0.9)),
    ("concurrency 1", dict(workload=Workload(128, 128), num_requests=4, concurrency=1)),
    # One user chatting: text that repeats itself less than the word-salad prompts above (whose
    # greedy continuations loop, which speculative decoding exploits).
    (C1_CHAT, dict(workload=Workload(chat=True, output_tokens=256, natural_stops=True, seed=7),
                   num_requests=6, concurrency=1)),
    ("wave c=32 (all at once)", dict(workload=Workload(128, 128), num_requests=32, concurrency=32)),
    # Time to the one token after a prompt of 2,000 (±5) SmolLM2 tokens, alone on the server; the
    # prompts differ from their first words on, so no cache serves them.
    (PREFILL, dict(workload=Workload(1915, 1, seed=8), num_requests=4, concurrency=1)),
    # Customer-service chat: what reuse of KV across requests buys (a kind of its own: run_multiturn).
    (MULTITURN, dict(multiturn=MultiTurnChat(users=8, turns=4, max_tokens=48))),
]
QUICK = ("closed loop c=32, mixed lengths", "concurrency 1", "wave c=32 (all at once)")


def measure(system: str, url: str, model: str, label: str, kwargs: dict, fresh_connections: bool = False) -> dict:
    """One scenario against one server; `fresh_connections`: a connection per request (llama-server)."""
    meter = CpuMeter()
    meter.start()
    if "multiturn" in kwargs:
        report = asyncio.run(run_multiturn(url, model, kwargs["multiturn"], fresh_connections))
    else:
        report = asyncio.run(run_load(url, model, **kwargs, fresh_connections=fresh_connections))
    report["cpu"] = meter.stop(report["duration_s"], report["output_tokens"])
    report["system"], report["scenario"] = system, label
    non_replica = report["cpu"].get("proxy + ingress + router", {}).get("cores", 0)
    ms = lambda v: (v or 0) * 1000  # noqa: E731
    print(f"  {system:10s} {label:40s} {report['output_tokens_per_s']:6.1f} tok/s "
          f"(steady {report['steady_output_tokens_per_s'] or 0:6.1f})  TTFT p50 {ms(report['ttft_s']['p50']):6.0f} ms"
          f"  ITL p50/max {ms(report['itl_s']['p50']):4.0f}/{ms(report['itl_max_s']):5.0f} ms"
          f"  non-replica {non_replica:.2f} cores  failed {report['failed_by_status']}", flush=True)
    if "multiturn" in kwargs:
        print(f"  {'':10s} {'':40s} first turns TTFT p50 {ms(report['first_turn_ttft_s']['p50']):6.0f} ms, "
              f"later turns {ms(report['later_turn_ttft_s']['p50']):6.0f} ms, prompt tokens from cache "
              f"{report['cached_prompt_tokens']} of {report['prompt_tokens']}", flush=True)
    return report


def offline_limit(model_name: str, workload: Workload, batch_size: int, n: int, threads: int,
                  dtype: str = "auto") -> dict:
    import torch

    from bench.baselines.offline import offline_throughput, prefill_latency
    from serve_app.engine.loading import load_model
    from serve_app.engine.precision import cpu_has_native_bf16

    torch.set_num_threads(threads)
    if dtype == "auto" and not cpu_has_native_bf16():
        # auto may keep a bf16 checkpoint in bf16, which only our runner multiplies fast on such a
        # CPU; transformers' own generate is fastest in float32 there.
        dtype = "float32"
    model, tokenizer = load_model(model_name, dtype)
    prompts = [p for p, _ in workload.requests(n)]
    result = offline_throughput(model, tokenizer, prompts, batch_size, workload.output_tokens)
    result["prefill_s"] = prefill_latency(model, tokenizer, prompts[0])
    print(f"  offline    batch={batch_size} {result['output_tokens_per_s']:7.1f} tok/s  "
          f"prefill {result['prefill_s'] * 1000:.0f} ms", flush=True)
    return result


EMBEDDER = "builtin:all-minilm-l6-v2"
# Serving variants run on the first scenario, after the main runs, in the same Ray session:
# (system label, how the app args differ). Each is compared with the plain run in `ratios`.
VARIANTS = {
    "cache-off": ("serve_app, prefix cache off", lambda chat: {**chat, "enable_prefix_caching": False}),
    "with-embedder": ("serve_app + embedding model", lambda chat: {"models": [chat, {"model": EMBEDDER}]}),
    # The plain app deployed again: the baseline of the variants (a redeployed app measured
    # ~20% slower than the first deployment in one run; compare like with like).
    "redeployed": ("serve_app, redeployed", lambda chat: chat),
    "float32": ("serve_app, float32", lambda chat: {**chat, "dtype": "float32"}),
    "kv-float32": ("serve_app, float32 KV cache", lambda chat: {**chat, "kv_cache_dtype": "float32"}),
    # Prompt-lookup drafts make a stream message carry several tokens, each after a longer step:
    # run with `--only "concurrency 1"` to see the message gap without them.
    "no-speculation": ("serve_app, no speculation", lambda chat: {**chat, "num_speculative_tokens": 0}),
}


def serve_model_args(model: str, server_args: dict) -> tuple[dict, dict]:
    """server_args split into the chat model's entry and the app-wide fields."""
    app_wide = {k: v for k, v in server_args.items() if k in AppWideArgs.model_fields}
    return {"model": model, **{k: v for k, v in server_args.items() if k not in app_wide}}, app_wide


def run_serve_app(model: str, port: int, server_args: dict, scenarios, replicas: int = 1,
                  variants: tuple[str, ...] = ()) -> list[dict]:
    """The scenarios on one model replica; then each of `variants` on the first scenario; with
    `replicas` > 1, the multi-turn scenarios again on that many (fixed count, one torch thread
    each), with prefix-aware placement and without it, in the same Ray session."""
    import ray
    from ray import serve

    from serve_app import ray_env
    from serve_app.app import build_app

    chat, app_wide = serve_model_args(model, server_args)

    def deploy(args: dict, warm_requests: int = 4) -> None:
        serve.delete("serve_app")  # frees the replica's CPU before a new one asks for it
        serve.run(build_app({**args, **app_wide}), name="serve_app", route_prefix="/")
        asyncio.run(run_load(url, model, Workload(16, 4), warm_requests, concurrency=warm_requests))

    ray_env.apply()  # what `make serve` runs with
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        deploy(chat)
        runs = [measure("serve_app", url, model, label, kwargs) for label, kwargs in scenarios]
        for variant in variants:
            system, app_args = VARIANTS[variant]
            deploy(app_args(chat))
            runs.append(measure(system, url, model, *scenarios[0]))
        multiturn = [(label, kwargs) for label, kwargs in scenarios if "multiturn" in kwargs]
        if replicas > 1 and multiturn:
            scaled = {**chat, "torch_threads": 1, "autoscaling": {"min_replicas": replicas, "max_replicas": replicas}}
            for aware, system in ((True, f"serve_app ×{replicas}"), (False, f"serve_app ×{replicas}, least loaded")):
                deploy({**scaled, "prefix_aware_routing": aware}, 2 * replicas)
                runs += [measure(system, url, model, label, kwargs) for label, kwargs in multiturn]
        return runs
    finally:
        serve.shutdown()
        ray.shutdown()


def llama_cpp_fits(kwargs: dict, slot_tokens: int) -> bool:
    """Whether every request of a scenario fits in one llama-server slot (-c split over -np slots)."""
    workload = kwargs.get("workload")
    if workload is None:  # multi-turn: ~1,200 tokens at the last turn
        return slot_tokens >= 2048
    longest = workload.long_prompts[2] if workload.long_prompts else workload.input_tokens
    longest = int(longest * 1.05) + 8  # a word is a token, a few are two; the "[i]" marker
    return longest + (workload.mixed_output[1] if workload.mixed_output else workload.output_tokens) <= slot_tokens


def run_llama_cpp(model: str, outtypes: list[str], scenarios, ctx: int = 65536, parallel: int = 32,
                  threads: int | None = None) -> list[dict]:
    """The same scenarios against llama.cpp's llama-server, one GGUF type after the other
    (converted from the weights serve_app serves), one connection per request."""
    from bench.baselines.llama_cpp import ensure_llama_server, gguf_for, llama_server

    binary = ensure_llama_server()  # built before any measurement: the build keeps every core busy
    ggufs = {t: gguf_for(model, t) for t in outtypes}
    runs = []
    for outtype, gguf in ggufs.items():
        system = f"llama.cpp {outtype.upper()}"
        with llama_server(gguf, free_port(), served_name=model, threads=threads, parallel=parallel, ctx=ctx,
                          binary=binary) as url:
            asyncio.run(run_load(url, model, Workload(16, 4), 4, concurrency=4, fresh_connections=True))  # warm-up
            for label, kwargs in scenarios:
                if not llama_cpp_fits(kwargs, ctx // parallel):
                    print(f"  {system:10s} {label:40s} skipped: prompts exceed its {ctx // parallel}-token slots "
                          f"(-c {ctx} over -np {parallel}; raise --llama-cpp-ctx)", flush=True)
                    continue
                runs.append(measure(system, url, model, label, kwargs, fresh_connections=True))
    return runs


def run_naive(model: str, port: int, scenarios, dtype: str = "auto") -> list[dict]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.baselines.naive_server", "--model", model,
                             "--port", str(port), "--dtype", dtype],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        return [measure("naive", url, model, label, {**kwargs, "stream": False}) for label, kwargs in scenarios]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_transformers_serve(model: str, port: int, scenarios) -> list[dict]:
    """`transformers serve --continuous-batching`, the transformers package's own server.

    It rejects `ignore_eos` (422): it runs only natural-stop scenarios."""
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
        return [measure("transformers serve (CB)", url, path, label, kwargs) for label, kwargs in scenarios
                if "workload" in kwargs and kwargs["workload"].natural_stops]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--name", default=None)
    p.add_argument("--only", nargs="+", default=None, help="run only scenarios whose label contains one of these")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--step-time-target-s", type=float, default=None,
                   help="the engine's adaptive step budget (ModelArgs.step_time_target_s)")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    p.add_argument("--torch-threads", type=int, default=os.cpu_count())
    p.add_argument("--dtype", default="auto", choices=get_args(ModelArgs.model_fields["dtype"].annotation),
                   help="weights and activations, for the server, the offline limit and the naive server alike")
    p.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="ModelArgs.num_speculative_tokens (0 = no speculative decoding)")
    p.add_argument("--stream-interval-s", type=float, default=None, help="the app's stream_interval_s")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--no-metrics", action="store_true", help="serve with metrics: false (measures their cost)")
    p.add_argument("--with-transformers-serve", action="store_true",
                   help="also run the transformers-serve peer on the natural-stop scenarios")
    p.add_argument("--with-llama-cpp", action="store_true",
                   help="also run llama.cpp's llama-server on the same scenarios (builds it once per machine)")
    p.add_argument("--llama-cpp-types", nargs="+", default=["bf16", "f32"], choices=("f32", "bf16", "q8_0"),
                   help="GGUF types llama-server serves, one after the other")
    p.add_argument("--llama-cpp-ctx", type=int, default=65536,
                   help="llama-server -c, split over its 32 slots (65536: 2,048 tokens each, too few for the "
                        "long-prompt scenario, which is then skipped for it)")
    p.add_argument("--llama-cpp-threads", type=int, default=None,
                   help="llama-server -t and -tb (default: every core). Its threads spin at barriers, so on a "
                        "machine others are using, one thread per core it does not have stalls every step")
    p.add_argument("--replicas", type=int, default=1,
                   help="also run the multi-turn scenario on this many model replicas (torch_threads 1 each)")
    p.add_argument("--variants", nargs="*", default=[], choices=tuple(VARIANTS),
                   help="also run the first scenario with the prefix cache off / with the embedding model served "
                        "too / the plain app again (then the others' baseline), in the order given")
    p.add_argument("--skip-serve-app", action="store_true",
                   help="no serve_app and no offline limit: check the peers alone")
    a = p.parse_args()

    wanted = QUICK if a.quick else a.only
    scenarios = [(label, kw) for label, kw in SCENARIOS if not wanted or any(w in label for w in wanted)]
    server_args = {"max_batch_size": a.max_batch_size, "batch_wait_timeout_s": a.batch_wait_timeout_s,
                   "torch_threads": a.torch_threads, "num_cpus": 1, "num_gpus": 0}
    if a.max_num_batched_tokens:
        server_args["max_num_batched_tokens"] = a.max_num_batched_tokens
    if a.step_time_target_s:
        server_args["step_time_target_s"] = a.step_time_target_s
    if a.no_metrics:
        server_args["metrics"] = False
    if a.num_speculative_tokens is not None:
        server_args["num_speculative_tokens"] = a.num_speculative_tokens
    if a.dtype != "auto":
        server_args["dtype"] = a.dtype
    if a.stream_interval_s is not None:
        server_args["stream_interval_s"] = a.stream_interval_s
    print(f"benchmark: {a.model}, server args {server_args}", flush=True)
    if a.with_llama_cpp:  # before any measurement: a first run builds llama-server (all cores, minutes)
        from bench.baselines.llama_cpp import ensure_llama_server

        ensure_llama_server()
    offline, runs = None, []
    if not a.skip_serve_app:
        offline = offline_limit(a.model, Workload(128, 128), 32, 32, a.torch_threads, a.dtype)
        runs = run_serve_app(a.model, free_port(), server_args, scenarios, a.replicas, tuple(a.variants))
    if not a.skip_naive:  # the seed design serves one request at a time: concurrency 1 says it all
        runs += run_naive(a.model, free_port(), [s for s in scenarios if s[0].startswith("concurrency 1")], a.dtype)
    if a.with_transformers_serve:
        try:
            runs += run_transformers_serve(a.model, free_port(), scenarios)
        except Exception as e:  # report, don't hide: the peer may not start on this machine
            print(f"  transformers serve did not run: {type(e).__name__}: {e}", flush=True)
    llama_types = a.llama_cpp_types if a.with_llama_cpp else []
    if llama_types:
        runs += run_llama_cpp(a.model, llama_types, scenarios, ctx=a.llama_cpp_ctx, threads=a.llama_cpp_threads)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch threads {a.torch_threads}"
    name = a.name or ("quick" if a.quick else "full")
    RESULTS.mkdir(exist_ok=True)
    payload = {"model": a.model, "machine": machine, "server_args": server_args, "offline": offline,
               "llama_cpp_types": llama_types, "replicas": a.replicas,
               "llama_cpp_server": llama_types and {"threads": a.llama_cpp_threads or os.cpu_count(),
                                                    "ctx": a.llama_cpp_ctx, "parallel": 32},
               "ratios": ratios(runs, offline, llama_types, a.replicas), "runs": runs}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    write_reports(name, payload)


def ratios(runs: list[dict], offline: dict | None, llama_types=(), replicas: int = 1) -> dict:
    """The figures the targets are stated in (None where a scenario did not run)."""
    def find(system, label):
        return next((r for r in runs if r["system"] == system and r["scenario"] == label and r["completed"]), None)

    def over(mine, theirs, figure):
        a, b = (figure(r) if r else None for r in (mine, theirs))
        return a / b if a is not None and b else None

    peers = {}
    mt = find("serve_app", MULTITURN)
    for outtype in llama_types:
        name, tag = f"llama.cpp {outtype.upper()}", outtype.lower()
        for key, label, figure in (
                ("closed_loop_vs_llama_cpp", SCENARIOS[0][0], lambda r: r["steady_output_tokens_per_s"]),
                ("c1_itl_p50_vs_llama_cpp", "concurrency 1", lambda r: r["itl_s"]["p50"]),
                ("prefill_2k_ttft_vs_llama_cpp", PREFILL, lambda r: r["ttft_s"]["p50"]),
                ("multiturn_later_ttft_vs_llama_cpp", MULTITURN, lambda r: r["later_turn_ttft_s"]["p50"]),
                ("multiturn_first_ttft_vs_llama_cpp", MULTITURN, lambda r: r["first_turn_ttft_s"]["p50"]),
                ("multiturn_tok_s_vs_llama_cpp", MULTITURN, lambda r: r["output_tokens_per_s"])):
            peers[f"{key}_{tag}"] = over(find("serve_app", label), find(name, label), figure)
        peers[f"c1_itl_p50_no_speculation_vs_llama_cpp_{tag}"] = over(
            find(VARIANTS["no-speculation"][0], "concurrency 1"), find(name, "concurrency 1"), lambda r: r["itl_s"]["p50"])
    peers["multiturn_cached_fraction"] = mt and mt["cached_fraction"]
    if replicas > 1:
        for key, system in (("multiturn_cached_fraction_replicas_vs_1", f"serve_app ×{replicas}"),
                            ("multiturn_cached_fraction_least_loaded_vs_1", f"serve_app ×{replicas}, least loaded")):
            peers[key] = over(find(system, MULTITURN), mt, lambda r: r["cached_fraction"])
    steady = lambda r: r["steady_output_tokens_per_s"]  # noqa: E731
    first = find(VARIANTS["redeployed"][0], SCENARIOS[0][0]) or find("serve_app", SCENARIOS[0][0])
    peers["closed_loop_cache_on_vs_off"] = over(first, find(VARIANTS["cache-off"][0], SCENARIOS[0][0]), steady)
    peers["closed_loop_with_embedder_vs_alone"] = over(find(VARIANTS["with-embedder"][0], SCENARIOS[0][0]), first,
                                                       steady)
    if offline is None:
        return peers
    limit = offline["output_tokens_per_s"]
    step_s = offline["duration_s"] / (offline["output_tokens"] / offline["batch_size"])
    closed, chat = find("serve_app", SCENARIOS[0][0]), find("serve_app", SCENARIOS[1][0])
    long, c1 = find("serve_app", SCENARIOS[2][0]), find("serve_app", "concurrency 1")
    wave, naive1 = find("serve_app", "wave c=32 (all at once)"), find("naive", "concurrency 1")
    c1_chat, naive_chat = (find(system, C1_CHAT) for system in ("serve_app", "naive"))
    return {
        "offline_step_s": step_s,
        "closed_loop_vs_offline": closed and closed["steady_output_tokens_per_s"] / limit,
        "closed_loop_itl_p50_vs_offline_step": closed and closed["itl_s"]["p50"] / step_s,
        "closed_loop_non_replica_cores": closed and closed["cpu"]["proxy + ingress + router"]["cores"],
        "chat_vs_offline": chat and chat["steady_output_tokens_per_s"] / limit,
        "long_prompt_max_itl_s": long and long["itl_max_s"],
        "c1_vs_naive": c1 and naive1 and c1["output_tokens_per_s"] / naive1["output_tokens_per_s"],
        "c1_chat_vs_naive": c1_chat and naive_chat and c1_chat["output_tokens_per_s"] / naive_chat["output_tokens_per_s"],
        "c1_ttft_overhead_ms": c1 and (c1["ttft_s"]["p50"] - offline["prefill_s"]) * 1000,
        "wave_vs_offline": wave and wave["output_tokens_per_s"] / limit,
        **peers,
    }


TARGETS = [  # (ratio key, text, target, higher is better)
    ("closed_loop_vs_offline", "closed loop c=32 mixed, steady tok/s ÷ offline limit", 0.75, True),
    ("closed_loop_itl_p50_vs_offline_step", "closed loop ITL p50 ÷ offline batch-32 step", 1.5, False),
    ("chat_vs_offline", "chat natural stops, steady tok/s ÷ offline limit", 0.6, True),
    ("long_prompt_max_itl_s", "longest silence of any stream with 2–3k prompts arriving (s)", 1.0, False),
    ("c1_vs_naive", "concurrency 1 tok/s ÷ naive", 1.0, True),
    ("c1_chat_vs_naive", "concurrency 1 chat tok/s ÷ naive (the same target, on text that loops less)", 1.0, True),
    ("c1_ttft_overhead_ms", "concurrency 1 TTFT p50 over offline prefill (ms)", 50, False),
    ("wave_vs_offline", "wave c=32 tok/s ÷ offline limit", 0.78, True),
    ("closed_loop_non_replica_cores", "proxy + ingress + router cores at c=32", 0.3, False),
    ("multiturn_cached_fraction", "multi-turn chat: prompt tokens served from cache ÷ prompt tokens", 0.7, True),
]


def targets(llama_types=(), replicas: int = 1) -> list[tuple[str, str, float | None, bool]]:
    """TARGETS, with the rows against llama.cpp for each GGUF type run and the replica comparison
    (a goal of None: a figure shown without a target)."""
    rows = list(TARGETS)
    for outtype in llama_types:
        tag, peer = outtype.lower(), f"llama.cpp {outtype.upper()}"
        rows += [
            (f"closed_loop_vs_llama_cpp_{tag}", f"closed loop c=32 mixed, steady tok/s ÷ {peer}", 1.0, True),
            (f"c1_itl_p50_vs_llama_cpp_{tag}", f"concurrency 1 ITL p50 ÷ {peer}", 1.0, False),
            (f"c1_itl_p50_no_speculation_vs_llama_cpp_{tag}",
             f"concurrency 1 ITL p50, speculation off (variant no-speculation) ÷ {peer}", None, False),
            (f"prefill_2k_ttft_vs_llama_cpp_{tag}", f"2,000-token prompt, TTFT ÷ {peer}", 1.0, False),
            (f"multiturn_later_ttft_vs_llama_cpp_{tag}", f"multi-turn chat, later turns TTFT p50 ÷ {peer}", 1.0, False),
            # No goal of their own: beside the later turns, they say where a miss comes from.
            (f"multiturn_first_ttft_vs_llama_cpp_{tag}", f"multi-turn chat, first turns TTFT p50 ÷ {peer}", None, False),
            (f"multiturn_tok_s_vs_llama_cpp_{tag}", f"multi-turn chat, out tok/s ÷ {peer}", None, True),
        ]
    if replicas > 1:
        rows += [("multiturn_cached_fraction_replicas_vs_1",
                  f"multi-turn chat, cached fraction on {replicas} replicas ÷ on 1", 0.9, True),
                 ("multiturn_cached_fraction_least_loaded_vs_1",
                  f"the same, {replicas} replicas with prefix_aware_routing off (least loaded) ÷ on 1", None, True)]
    # Ratios of one scenario with a feature on and off: within 3%.
    rows += [("closed_loop_cache_on_vs_off", "closed loop c=32 mixed (no shared prefixes), steady tok/s, "
              "prefix cache on ÷ off", 0.97, True),
             ("closed_loop_with_embedder_vs_alone",
              "closed loop c=32 mixed, steady tok/s, embedding model served too ÷ chat alone", 0.97, True)]
    return rows


def write_reports(name: str, payload: dict) -> None:
    offline, found, runs = payload["offline"], payload["ratios"], payload["runs"]
    lines = [f"Model {payload['model']}; {payload['machine']}; server args {payload['server_args']}.", ""]
    if offline:
        lines += [f"Offline limit (`generate`, static batch 32, 128→128): {offline['output_tokens_per_s']:.1f} tok/s, "
                  f"mean step {found['offline_step_s'] * 1000:.0f} ms; batch-1 prefill "
                  f"{offline['prefill_s'] * 1000:.0f} ms.", ""]
    if payload.get("llama_cpp_server"):
        peer = payload["llama_cpp_server"]
        lines += [f"llama.cpp: llama-server -np {peer['parallel']} -c {peer['ctx']} -t {peer['threads']} "
                  f"-tb {peer['threads']}, GGUF {', '.join(payload['llama_cpp_types'])} converted from the same "
                  "weights; one connection per request.", ""]
    lines += ["| target | measured | goal | |", "|---|---|---|---|"]
    for key, text, goal, higher in targets(payload.get("llama_cpp_types", ()), payload.get("replicas", 1)):
        value = found.get(key)
        wanted = "–" if goal is None else f"{'≥' if higher else '≤'} {goal}"
        if value is None:
            lines.append(f"| {text} | not run | {wanted} | |")
            continue
        met = "" if goal is None else "met" if (value >= goal if higher else value <= goal) else "**missed**"
        lines.append(f"| {text} | {value:.2f} | {wanted} | {met} |")
    summary = "\n".join(lines) + "\n"
    tables = markdown_table(runs)
    if any("cached_fraction" in r for r in runs):
        tables += "\n\nMulti-turn chat (bench/multiturn.py):\n\n" + multiturn_table(runs)
    tables += "\n\nCPU by process role (cores busy during the run; CPU ms per output token):\n\n" + cpu_table(runs)
    (RESULTS / f"{name}.md").write_text(summary + "\n" + tables + "\n")
    chart(runs, offline and offline["output_tokens_per_s"], RESULTS / f"{name}.png")
    print("\n" + summary + "\n" + tables)


if __name__ == "__main__":
    main()

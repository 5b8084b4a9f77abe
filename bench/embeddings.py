"""Embedding throughput over HTTP beside sentence-transformers' own batched `encode` (the
offline limit: one process, no server), in one run.

    python -m bench.embeddings [--requests 2000] [--concurrency 32] [--model builtin:all-minilm-l6-v2]

Rows: the offline limit (`SentenceTransformer.encode`, batch 32, in this process while the app
is up and idle, the faster of 1 thread and as many as a replica gets); our engine in-process (no server:
what batching by tokens costs or gains); then the served app (one embedding model, Ray started
as `make serve` starts it) under a closed loop of short sentences: c=32 with one sentence per
request (base64, as the openai client asks, and float), c=4 with 32 sentences per request, and
c=1. The offline limit and the c=32 base64 row alternate in rounds (a shared host's load moves
between minutes); ratios are to the offline limit of the same run. Writes
bench/results/<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

_SUBJECTS = ["The cat", "A new study", "The market", "Our team", "The river", "A small robot", "The city council",
             "My neighbour", "The old library", "A distant star"]
_VERBS = ["explains", "changes", "follows", "improves", "describes", "questions", "reaches", "protects"]
_OBJECTS = ["the price of coffee", "a quiet morning walk", "the rules of chess", "an unexpected result",
            "the history of Rome", "a better search engine", "the weather in spring", "the final report"]
_TAILS = ["today.", "after the meeting.", "in every detail.", "without any help.", "for the first time.",
          "once again.", "before sunrise.", "with great care."]


def sentences(n: int, seed: int = 0) -> list[str]:
    """Short sentences (8-14 words, ~10-16 tokens), all different."""
    rng = random.Random(seed)
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)} "
            f"(item {i})" for i in range(n)]


@functools.cache
def _sentence_transformer(model: str):
    from sentence_transformers import SentenceTransformer

    from serve_app.engine.builtin_models import resolve_model_path

    st = SentenceTransformer(resolve_model_path(model), device="cpu")
    st.encode(sentences(256, seed=1), batch_size=32)  # warm-up
    return st


def offline_limit(model: str, texts: list[str], threads: list[int], batch_size: int = 32) -> dict:
    """sentence-transformers' encode at each thread count; the limit is the fastest (on a shared
    2-core host, 2 OpenMP threads can be several times slower than 1 while another process runs)."""
    import torch

    st = _sentence_transformer(model)
    by_threads = {}
    for n in threads:
        torch.set_num_threads(n)
        started = time.perf_counter()
        st.encode(texts, batch_size=batch_size)
        by_threads[n] = len(texts) / (time.perf_counter() - started)
    best = max(by_threads, key=by_threads.get)
    return {"system": "sentence-transformers encode (offline limit)", "shape": f"batch {batch_size}, in process",
            "sentences": len(texts), "sentences_per_s": by_threads[best], "threads": best,
            "by_threads": {k: round(v, 1) for k, v in by_threads.items()}}


def engine_in_process(model: str, texts: list[str], threads: int, concurrency: int) -> dict:
    """Our engine without a server: `concurrency` callers of one sentence each, closed loop."""
    import torch
    from transformers import AutoTokenizer

    from serve_app.config import ModelArgs
    from serve_app.engine.builtin_models import resolve_model_path
    from serve_app.engine.embedding import EmbeddingEngine, EmbeddingModel

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
    ids = tokenizer(texts)["input_ids"]
    budget = ModelArgs(model=model, task="embed").step_token_budget("cpu")
    engine = EmbeddingEngine(lambda: EmbeddingModel.load(model), token_budget=budget)

    async def load(items) -> float:
        queue = list(items)

        async def worker():
            while queue:
                await engine.embed([queue.pop()])

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started

    asyncio.run(load(ids[:256]))  # warm-up
    seconds = asyncio.run(load(ids))
    engine.shutdown()
    return {"system": "serve_app engine, in process (no server)", "shape": f"c={concurrency}, 1 sentence/call",
            "sentences": len(ids), "sentences_per_s": len(ids) / seconds}


async def http_load(url: str, model: str, texts: list[str], concurrency: int, per_request: int,
                    encoding_format: str) -> dict:
    import aiohttp

    batches = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    latencies: list[float] = []
    failures: dict[int, int] = {}

    async def worker(session):
        while batches:
            batch = batches.pop()
            body = {"model": model, "input": batch if per_request > 1 else batch[0],
                    "encoding_format": encoding_format}
            started = time.perf_counter()
            async with session.post(f"{url}/v1/embeddings", json=body) as r:
                payload = await r.json()
            if r.status != 200 or len(payload["data"]) != len(batch):
                failures[r.status] = failures.get(r.status, 0) + 1
            latencies.append(time.perf_counter() - started)

    from bench.cpu import CpuMeter

    connector = aiohttp.TCPConnector(limit=concurrency)
    meter = CpuMeter()
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        meter.start()
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        cpu = meter.stop(seconds, len(texts))
    latencies.sort()
    return {"system": "serve_app over HTTP",
            "shape": f"c={concurrency}, {per_request} sentence{'s' if per_request > 1 else ''}/request, "
                     f"{encoding_format}",
            "sentences": len(texts), "sentences_per_s": len(texts) / seconds,
            "latency_p50_ms": 1000 * statistics.median(latencies),
            "latency_p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "failed": failures,
            # CPU ms per sentence by role (cpu_ms_per_token of bench.cpu, here per sentence).
            "cpu_ms_per_sentence": {role: round(v["cpu_ms_per_token"], 2) for role, v in cpu.items()
                                    if v["cpu_ms_per_token"] is not None}}


def served(model: str, texts: list[str], concurrency: int, port: int, threads: int, rounds: int,
           model_args: dict | None = None) -> list[dict]:
    """The served rows, and the offline limit measured between them: the headline pair (c=32,
    one sentence per request, against sentence-transformers' encode) alternates `rounds` times
    on slices of the sentences, so both see the same moments of a shared host."""
    import ray
    import requests
    from ray import serve

    from serve_app import ray_env
    from serve_app.app import build_app

    ray_env.apply()  # what `make serve` runs with
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"models": [{"model": model, **(model_args or {})}]}), name="serve_app", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        asyncio.run(http_load(url, model, texts[:256], concurrency, 1, "base64"))  # warm-up
        offline, headline = [], []
        for r in range(rounds):
            part = texts[r::rounds]
            offline.append(offline_limit(model, part, sorted({1, threads})))
            headline.append(asyncio.run(http_load(url, model, part, concurrency, 1, "base64")))
            print(f"  round {r + 1}: offline {offline[-1]['by_threads']}, served "
                  f"{headline[-1]['sentences_per_s']:7.1f} sentences/s", flush=True)
        rows = [combine(offline), combine(headline)]
        for per_request, c, encoding in ((1, concurrency, "float"), (32, 4, "base64"), (1, 1, "base64")):
            n = len(texts) // rounds if c > 1 else min(len(texts), 300)
            rows.append(asyncio.run(http_load(url, model, texts[:n], c, per_request, encoding)))
            print(f"  {rows[-1]['shape']:40s} {rows[-1]['sentences_per_s']:7.1f} sentences/s  CPU ms per sentence "
                  f"{rows[-1]['cpu_ms_per_sentence']}", flush=True)
        info = requests.get(f"{url}/stats?replicas=1", timeout=30).json()["models"][model]["router"]["replica_info"]
        rows[-1]["replica"] = info[0] if info else {}
        return rows
    finally:
        serve.shutdown()
        ray.shutdown()


def combine(parts: list[dict]) -> dict:
    """Rounds of one row as one: sentences over the summed time; latencies and CPU of the last round."""
    seconds = sum(p["sentences"] / p["sentences_per_s"] for p in parts)
    sentences = sum(p["sentences"] for p in parts)
    combined = {**parts[-1], "sentences": sentences, "sentences_per_s": sentences / seconds,
                "rounds": [round(p["sentences_per_s"], 1) for p in parts]}
    if "by_threads" in parts[-1]:
        combined["shape"] += ", threads " + ", ".join(
            f"{n}: {sum(p['by_threads'][n] for p in parts) / len(parts):.0f}/s" for n in parts[-1]["by_threads"])
    return combined


def markdown(payload: dict) -> str:
    limit = payload["rows"][0]["sentences_per_s"]
    lines = [f"Model {payload['model']}; {payload['machine']}; torch threads {payload['threads']}; "
             f"{payload['sentences']} short sentences (~{payload['tokens_per_sentence']:.0f} tokens each).", "",
             "| system | load | sentences/s | × offline limit | latency p50 / p99 ms |", "|---|---|---|---|---|"]
    for r in payload["rows"]:
        latency = (f"{r['latency_p50_ms']:.0f} / {r['latency_p99_ms']:.0f}" if "latency_p50_ms" in r else "-")
        failed = f" (failed: {r['failed']})" if r.get("failed") else ""
        rounds = f" (rounds: {', '.join(map(str, r['rounds']))})" if r.get("rounds") else ""
        lines.append(f"| {r['system']} | {r['shape']} | {r['sentences_per_s']:.0f}{rounds}{failed} | "
                     f"{r['sentences_per_s'] / limit:.2f} | {latency} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:all-minilm-l6-v2")
    p.add_argument("--requests", type=int, default=3000, help="sentences of the headline rows (split into rounds)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of the in-process rows (a served replica's default: the node's cores); "
                        "the offline limit also tries 1")
    p.add_argument("--rounds", type=int, default=3, help="alternations of the offline limit and the c=32 row")
    p.add_argument("--replica-threads", type=int, default=None, help="the served model's torch_threads (default: its own)")
    p.add_argument("--name", default="embeddings", help="bench/results/<name>.json and .md")
    a = p.parse_args()

    from transformers import AutoTokenizer

    from bench.run import free_port
    from serve_app.engine.builtin_models import resolve_model_path

    texts = sentences(a.requests)
    tokens = AutoTokenizer.from_pretrained(resolve_model_path(a.model))(texts)["input_ids"]
    print(f"embedding benchmark: {a.model}, {len(texts)} sentences, {a.threads} threads", flush=True)
    rows = [engine_in_process(a.model, texts, a.threads, a.concurrency)]
    print(f"  engine in process {rows[0]['sentences_per_s']:7.1f} sentences/s", flush=True)
    model_args = {"torch_threads": a.replica_threads} if a.replica_threads else {}
    offline, *served_rows = served(a.model, texts, a.concurrency, free_port(), a.threads, a.rounds, model_args)
    rows = [offline, *rows, *served_rows]
    payload = {"model": a.model, "machine": f"{os.cpu_count()} CPU cores", "threads": a.threads,
               "served_model_args": model_args,
               "sentences": len(texts), "tokens_per_sentence": sum(map(len, tokens)) / len(tokens), "rows": rows}
    table = markdown(payload)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / f"{a.name}.md").write_text(table)


if __name__ == "__main__":
    main()

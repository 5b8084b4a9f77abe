"""Embedding throughput over HTTP beside sentence-transformers' own batched `encode` (the
offline limit: one process, no server), in one run.

    python -m bench.embeddings [--requests 2000] [--concurrency 32] [--model builtin:all-minilm-l6-v2]

Rows: the offline limit (`SentenceTransformer.encode`, batch 32, as many torch threads as a
replica gets); our engine in-process (no server: what batching by tokens costs or gains);
then the served app (one embedding model, Ray started as `make serve` starts it) under a
closed loop of short sentences: c=32 with one sentence per request (base64, as the openai
client asks, and float), c=4 with 32 sentences per request, and c=1. Ratios are to the
offline limit of the same run. Writes bench/results/embeddings.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
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


def offline_limit(model: str, texts: list[str], threads: int, batch_size: int = 32) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    from serve_app.engine.builtin_models import resolve_model_path

    torch.set_num_threads(threads)
    st = SentenceTransformer(resolve_model_path(model), device="cpu")
    st.encode(texts[:256], batch_size=batch_size)  # warm-up
    started = time.perf_counter()
    st.encode(texts, batch_size=batch_size)
    seconds = time.perf_counter() - started
    return {"system": "sentence-transformers encode (offline limit)", "shape": f"batch {batch_size}, in process",
            "sentences": len(texts), "sentences_per_s": len(texts) / seconds}


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


def served(model: str, texts: list[str], concurrency: int, port: int) -> list[dict]:
    import ray
    import requests
    from ray import serve

    from serve_app import ray_env
    from serve_app.app import build_app

    ray_env.apply()  # what `make serve` runs with
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"models": [{"model": model}]}), name="serve_app", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        asyncio.run(http_load(url, model, texts[:256], concurrency, 1, "base64"))  # warm-up
        rows = []
        for per_request, c, encoding in ((1, concurrency, "base64"), (1, concurrency, "float"), (32, 4, "base64"),
                                         (1, 1, "base64")):
            n = len(texts) if c > 1 else min(len(texts), 300)
            rows.append(asyncio.run(http_load(url, model, texts[:n], c, per_request, encoding)))
            print(f"  {rows[-1]['shape']:40s} {rows[-1]['sentences_per_s']:7.1f} sentences/s  CPU ms per sentence "
                  f"{rows[-1]['cpu_ms_per_sentence']}", flush=True)
        info = requests.get(f"{url}/stats?replicas=1", timeout=30).json()["models"][model]["router"]["replica_info"]
        rows[-1]["replica"] = info[0] if info else {}
        return rows
    finally:
        serve.shutdown()
        ray.shutdown()


def markdown(payload: dict) -> str:
    limit = payload["rows"][0]["sentences_per_s"]
    lines = [f"Model {payload['model']}; {payload['machine']}; torch threads {payload['threads']}; "
             f"{payload['sentences']} short sentences (~{payload['tokens_per_sentence']:.0f} tokens each).", "",
             "| system | load | sentences/s | × offline limit | latency p50 / p99 ms |", "|---|---|---|---|---|"]
    for r in payload["rows"]:
        latency = (f"{r['latency_p50_ms']:.0f} / {r['latency_p99_ms']:.0f}" if "latency_p50_ms" in r else "-")
        failed = f" (failed: {r['failed']})" if r.get("failed") else ""
        lines.append(f"| {r['system']} | {r['shape']} | {r['sentences_per_s']:.0f}{failed} | "
                     f"{r['sentences_per_s'] / limit:.2f} | {latency} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:all-minilm-l6-v2")
    p.add_argument("--requests", type=int, default=2000, help="sentences per row")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads offline (a served replica's default: the node's cores)")
    p.add_argument("--name", default="embeddings", help="bench/results/<name>.json and .md")
    a = p.parse_args()

    from transformers import AutoTokenizer

    from bench.run import free_port
    from serve_app.engine.builtin_models import resolve_model_path

    texts = sentences(a.requests)
    tokens = AutoTokenizer.from_pretrained(resolve_model_path(a.model))(texts)["input_ids"]
    print(f"embedding benchmark: {a.model}, {len(texts)} sentences, {a.threads} threads", flush=True)
    rows = [offline_limit(a.model, texts, a.threads)]
    print(f"  offline limit {rows[0]['sentences_per_s']:7.1f} sentences/s", flush=True)
    rows.append(engine_in_process(a.model, texts, a.threads, a.concurrency))
    print(f"  engine in process {rows[1]['sentences_per_s']:7.1f} sentences/s", flush=True)
    rows += served(a.model, texts, a.concurrency, free_port())
    payload = {"model": a.model, "machine": f"{os.cpu_count()} CPU cores", "threads": a.threads,
               "sentences": len(texts), "tokens_per_sentence": sum(map(len, tokens)) / len(tokens), "rows": rows}
    table = markdown(payload)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{a.name}.json").write_text(json.dumps(payload, indent=1))
    (RESULTS / f"{a.name}.md").write_text(table)


if __name__ == "__main__":
    main()

"""Load generator for any OpenAI-compatible /v1/completions endpoint.

Measures per request TTFT, TPOT, inter-token latency and end-to-end latency
(streaming; a non-streaming server's TTFT is its whole latency), and in
aggregate request throughput and output tokens/s, with p50/p90/p99.

    python -m bench.loadgen --url http://127.0.0.1:8000 --model M --concurrency 8 --num-requests 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import aiohttp

WORDS = ("the quick brown fox jumps over a lazy dog while serving models on many replicas "
         "batching tokens across requests keeps every core busy").split()


@dataclass
class Workload:
    """Prompts of `input_tokens` (approximate: one word per token) and output lengths."""

    input_tokens: int = 128
    output_tokens: int = 128
    mixed_output: tuple[int, int] | None = None  # draw output lengths from this range
    seed: int = 0

    def requests(self, n: int) -> list[tuple[str, int]]:
        rng = random.Random(self.seed)
        out = []
        for i in range(n):
            words = [f"[{i}]"] + [rng.choice(WORDS) for _ in range(self.input_tokens - 1)]
            length = rng.randint(*self.mixed_output) if self.mixed_output else self.output_tokens
            out.append((" ".join(words), length))
        return out


@dataclass
class RequestResult:
    ok: bool
    status: int
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    streamed: bool = True

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens <= 1 or not self.streamed:  # a non-streaming server shows no token timing
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


async def one_request(session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int,
                      stream: bool, extra: dict) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            **extra}
    if stream:
        body["stream_options"] = {"include_usage": True}
    start = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                await resp.read()
                return RequestResult(False, resp.status)
            if not stream:
                data = await resp.json()
                e2e = time.perf_counter() - start
                return RequestResult(True, 200, data["usage"]["completion_tokens"], e2e, e2e, streamed=False)
            first = last = None
            itl, tokens = [], 0
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    itl.append(now - last)
                last = now
            end = time.perf_counter()
            return RequestResult(True, 200, tokens, (first or end) - start, end - start, itl)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return RequestResult(False, -1, e2e_s=time.perf_counter() - start)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, round(q * (len(values) - 1)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": statistics.fmean(values)}


async def run_load(url: str, model: str, workload: Workload, num_requests: int, concurrency: int | None = None,
                   request_rate: float | None = None, stream: bool = True, extra: dict | None = None,
                   timeout_s: float = 1800) -> dict:
    """Fixed concurrency (closed loop) or Poisson arrivals at `request_rate`/s (open loop)."""
    extra = {"ignore_eos": True} if extra is None else extra
    todo = workload.requests(num_requests)
    results: list[RequestResult] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        start = time.perf_counter()
        if request_rate:
            rng = random.Random(workload.seed + 1)
            tasks = []
            for prompt, n in todo:
                tasks.append(asyncio.create_task(one_request(session, url, model, prompt, n, stream, extra)))
                await asyncio.sleep(rng.expovariate(request_rate))
            results = await asyncio.gather(*tasks)
        else:
            queue = list(todo)

            async def worker():
                while queue:
                    prompt, n = queue.pop()
                    results.append(await one_request(session, url, model, prompt, n, stream, extra))

            await asyncio.gather(*(worker() for _ in range(concurrency or 1)))
        duration = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "mode": f"rate={request_rate}/s" if request_rate else f"concurrency={concurrency}",
        "concurrency": concurrency, "request_rate": request_rate,
        "num_requests": num_requests, "completed": len(ok),
        "failed_by_status": dict(Counter(r.status for r in results if not r.ok)),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_tokens_per_s": out_tokens / duration,
        "ttft_s": percentiles([r.ttft_s for r in ok]),
        "tpot_s": percentiles([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_s": percentiles([x for r in ok for x in r.itl_s]),
        "e2e_s": percentiles([r.e2e_s for r in ok]),
        "workload": asdict(workload),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second instead")
    p.add_argument("--input-tokens", type=int, default=128)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--mixed-output", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    workload = Workload(a.input_tokens, a.output_tokens, tuple(a.mixed_output) if a.mixed_output else None, a.seed)
    report = asyncio.run(run_load(a.url, a.model, workload, a.num_requests, a.concurrency, a.request_rate,
                                  stream=not a.no_stream))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

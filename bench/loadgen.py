"""Load generator for any OpenAI-compatible /v1/completions or /v1/chat/completions endpoint.

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


CHAT_QUESTIONS = (
    "What is the capital of France?", "Give me three tips for staying focused while studying.",
    "Explain what a hash table is in two sentences.", "Write a haiku about autumn rain.",
    "How do I boil an egg?", "What causes the seasons on Earth?", "Name five fruits that are red.",
    "Summarize the plot of Romeo and Juliet.", "What is the difference between a virus and a bacterium?",
    "Suggest a name for a friendly robot.", "How many legs does a spider have?",
    "Write a short thank-you note to a teacher.", "Why is the sky blue?", "List the planets of the solar system.",
    "What is photosynthesis?", "Tell me a fun fact about octopuses.",
)


@dataclass
class Workload:
    """What each request asks for.

    Completions get prompts of `input_tokens` words (about one token each); chat gets a
    short question. Output lengths are `output_tokens`, or drawn from `mixed_output`;
    with `natural_stops` that is only an upper bound and the model stops when it wants
    (no `ignore_eos`). `long_prompts` = (fraction, min, max) gives that fraction of
    requests a prompt of min..max words instead.
    """

    input_tokens: int = 128
    output_tokens: int = 128
    mixed_output: tuple[int, int] | None = None
    seed: int = 0
    chat: bool = False
    natural_stops: bool = False
    long_prompts: tuple[float, int, int] | None = None

    def requests(self, n: int) -> list[tuple[str, int]]:
        rng = random.Random(self.seed)
        out = []
        for i in range(n):
            length = rng.randint(*self.mixed_output) if self.mixed_output else self.output_tokens
            if self.chat:
                out.append((f"({i}) {rng.choice(CHAT_QUESTIONS)}", length))
                continue
            words = self.input_tokens
            if self.long_prompts and rng.random() < self.long_prompts[0]:
                words = rng.randint(self.long_prompts[1], self.long_prompts[2])
            out.append((" ".join([f"[{i}]"] + [rng.choice(WORDS) for _ in range(words - 1)]), length))
        return out

    def describe(self) -> str:
        kind = "chat" if self.chat else f"{self.input_tokens}"
        if self.long_prompts:
            kind += f" ({self.long_prompts[0]:.0%} of {self.long_prompts[1]}–{self.long_prompts[2]})"
        out = f"{self.mixed_output[0]}–{self.mixed_output[1]}" if self.mixed_output else str(self.output_tokens)
        return f"{kind}→{out}" + (" natural stops" if self.natural_stops else "")


@dataclass
class RequestResult:
    ok: bool
    status: int
    output_tokens: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    streamed: bool = True
    start: float = 0.0  # perf_counter at send
    chunk_times: list[float] = field(default_factory=list)  # perf_counter of each content chunk
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server says it served from its cache
    text: str = ""  # the generated text (multi-turn chat carries it into the next turn)

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens <= 1 or not self.streamed:  # a non-streaming server shows no token timing
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def _chunk_text(chunk: dict) -> str:
    choice = chunk["choices"][0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


def cached_tokens(data: dict) -> int:
    """Prompt tokens served from the server's cache: OpenAI's `usage.prompt_tokens_details.cached_tokens`,
    else llama.cpp's `timings.cache_n`; 0 when the server reports neither."""
    details = (data.get("usage") or {}).get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        return details["cached_tokens"]
    return (data.get("timings") or {}).get("cache_n") or 0


async def one_request(session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int,
                      stream: bool, extra: dict, chat: bool = False,
                      messages: list[dict] | None = None) -> RequestResult:
    """One request; `messages` (a whole conversation) makes it a chat request, as `chat` does for
    `prompt` alone."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream, **extra}
    if messages is not None:
        chat = True
        body["messages"] = messages
    elif chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream:
        body["stream_options"] = {"include_usage": True}
    route = "/v1/chat/completions" if chat else "/v1/completions"
    start = time.perf_counter()
    try:
        async with session.post(f"{url}{route}", json=body) as resp:
            if resp.status != 200:
                await resp.read()
                return RequestResult(False, resp.status, start=start)
            if not stream:
                data = await resp.json()
                e2e = time.perf_counter() - start
                choice = data["choices"][0]
                return RequestResult(True, 200, data["usage"]["completion_tokens"], e2e, e2e, streamed=False,
                                     start=start, prompt_tokens=data["usage"].get("prompt_tokens", 0),
                                     cached_tokens=cached_tokens(data),
                                     text=choice.get("text") or (choice.get("message") or {}).get("content") or "")
            first = last = None
            itl, tokens, times, pieces = [], 0, [], []
            prompt_tokens = cached = 0
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                    prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                if chunk.get("usage") or chunk.get("timings"):
                    cached = cached_tokens(chunk) or cached
                if not chunk.get("choices") or not (piece := _chunk_text(chunk)):
                    continue
                pieces.append(piece)
                now = time.perf_counter()
                times.append(now)
                if first is None:
                    first = now
                else:
                    itl.append(now - last)
                last = now
            end = time.perf_counter()
            return RequestResult(True, 200, tokens, (first or end) - start, end - start, itl, start=start,
                                 chunk_times=times, prompt_tokens=prompt_tokens, cached_tokens=cached,
                                 text="".join(pieces))
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return RequestResult(False, -1, e2e_s=time.perf_counter() - start, start=start)


def tokens_between(results: list[RequestResult], t0: float, t1: float) -> float:
    """Output tokens streamed in [t0, t1]: each request's tokens spread over its chunks."""
    total = 0.0
    for r in results:
        if r.chunk_times:
            per_chunk = r.output_tokens / len(r.chunk_times)
            total += per_chunk * sum(1 for t in r.chunk_times if t0 <= t <= t1)
    return total


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, round(q * (len(values) - 1)))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": statistics.fmean(values)}


async def run_load(url: str, model: str, workload: Workload, num_requests: int, concurrency: int | None = None,
                   request_rate: float | None = None, stream: bool = True, extra: dict | None = None,
                   timeout_s: float = 1800, fresh_connections: bool = False) -> dict:
    """Closed loop (`concurrency` users, each sending its next request when the last ends) or
    Poisson arrivals at `request_rate`/s (open loop).

    `fresh_connections` opens a connection per request (for servers that close kept-alive
    connections now and then, as llama-server does: a reused one fails the request).

    Besides whole-run figures, `steady_output_tokens_per_s` counts only the window where
    the load is fully on: in a closed loop from the start until the first user runs out
    of requests (no ramp-down tail), for Poisson from the first to the last arrival.
    """
    if extra is None:
        extra = {} if workload.natural_stops else {"ignore_eos": True}
    todo = workload.requests(num_requests)
    results: list[RequestResult] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=fresh_connections)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        start = time.perf_counter()
        full_load_ends = None
        if request_rate:
            rng = random.Random(workload.seed + 1)
            tasks = []
            for prompt, n in todo:
                tasks.append(asyncio.create_task(
                    one_request(session, url, model, prompt, n, stream, extra, workload.chat)))
                await asyncio.sleep(rng.expovariate(request_rate))
            full_load_ends = time.perf_counter()
            results = await asyncio.gather(*tasks)
        else:
            queue = list(reversed(todo))

            async def worker():
                nonlocal full_load_ends
                while queue:
                    prompt, n = queue.pop()
                    results.append(await one_request(session, url, model, prompt, n, stream, extra, workload.chat))
                full_load_ends = full_load_ends or time.perf_counter()

            await asyncio.gather(*(worker() for _ in range(concurrency or 1)))
        end = time.perf_counter()
    duration = end - start
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    window = (full_load_ends or end) - start
    itls = [x for r in ok for x in r.itl_s]
    return {
        "mode": f"rate={request_rate}/s" if request_rate else f"concurrency={concurrency}",
        "concurrency": concurrency, "request_rate": request_rate,
        "num_requests": num_requests, "completed": len(ok),
        "failed_by_status": dict(Counter(r.status for r in results if not r.ok)),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / duration,
        "steady_window_s": window,
        "steady_output_tokens_per_s": (tokens_between(ok, start, start + window) / window) if stream else None,
        "ttft_s": percentiles([r.ttft_s for r in ok]),
        "tpot_s": percentiles([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_s": percentiles(itls),
        "itl_max_s": max(itls, default=None),
        "e2e_s": percentiles([r.e2e_s for r in ok]),
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "cached_prompt_tokens": sum(r.cached_tokens for r in ok),
        "workload": asdict(workload),
        "workload_label": workload.describe(),
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
    p.add_argument("--chat", action="store_true", help="chat completions with short questions")
    p.add_argument("--natural-stops", action="store_true", help="let the model stop (no ignore_eos)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    workload = Workload(a.input_tokens, a.output_tokens, tuple(a.mixed_output) if a.mixed_output else None, a.seed,
                        chat=a.chat, natural_stops=a.natural_stops)
    report = asyncio.run(run_load(a.url, a.model, workload, a.num_requests, a.concurrency, a.request_rate,
                                  stream=not a.no_stream))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

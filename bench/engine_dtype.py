"""float32 against bfloat16 for the bare engine (no server): two BatchEngines in one
process, stepped alternately so both see the same machine, decode steps at 1, 8
and 32 rows and a 256-token prefill. Prints medians in ms.

    .venv/bin/python -m bench.engine_dtype [--model builtin:smollm2-135m-instruct] [--rounds 4]

On CPUs with native bf16 matrix units (AMX, AVX512-BF16) bf16 wins from a few
rows up; at one row fp32's GEMV is faster. See README "Performance".
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from serve_app.engine.batch_engine import BatchEngine
from serve_app.engine.loading import eos_token_ids, load_model
from serve_app.engine.types import GenerationRequest, SamplingParams

DTYPES = ("float32", "bfloat16")


def make_engine(model_name: str, dtype: str) -> BatchEngine:
    model, tokenizer = load_model(model_name, dtype, "cpu")
    return BatchEngine(model, tokenizer, eos_token_ids(model, tokenizer), max_batch_size=32, max_model_len=2048,
                       kv_cache_tokens=8192, max_num_batched_tokens=256)


def request(request_id: str, prompt: list[int], max_tokens: int) -> GenerationRequest:
    return GenerationRequest(request_id=request_id, prompt_token_ids=prompt,
                             params=SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    engines = {dtype: make_engine(a.model, dtype) for dtype in DTYPES}
    prompts = torch.randint(100, 1000, (32, 256)).tolist()
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(a.rounds):
        for rows in (1, 8, 32):
            for dtype, engine in engines.items():
                for i in range(rows):
                    engine.add(request(f"r{i}", prompts[i][:128], 16))
                while engine.waiting or any(s.num_cached < s.prompt_len for s in engine.running):
                    engine.step()
                label = f"decode, {rows} row{'s' if rows > 1 else ''}"
                while engine.has_work:
                    engine.step()
                    times.setdefault((dtype, label), []).append(engine.last_step_seconds * 1e3)
        for dtype, engine in engines.items():
            engine.add(request("prefill", prompts[0], 1))
            engine.step()
            times.setdefault((dtype, "prefill, 256 tokens"), []).append(engine.last_step_seconds * 1e3)
            while engine.has_work:
                engine.step()
    print(f"{a.model}, {a.threads} threads, {a.rounds} rounds\n")
    print("| step | float32 ms | bfloat16 ms | bf16 speed-up |")
    print("|---|---|---|---|")
    for what in ("decode, 1 row", "decode, 8 rows", "decode, 32 rows", "prefill, 256 tokens"):
        f32, bf16 = (statistics.median(times[(d, what)]) for d in DTYPES)
        print(f"| {what} | {f32:.1f} | {bf16:.1f} | {f32 / bf16:.2f}× |")


if __name__ == "__main__":
    main()

"""Engine variants side by side (no server): the same model behind several BatchEngines in one
process, stepped alternately so every variant sees the same machine. Decode steps at 1, 8 and
32 rows (prompts of 128 tokens) and one 2,000-token prefill (chunked by the step budget).
Prints median step times in ms and each variant's speed-up over the first.

    .venv/bin/python -m bench.engine_step                       # native vs transformers runner, float32
    .venv/bin/python -m bench.engine_step --variants native:float32 native:bfloat16 --rounds 6
    .venv/bin/python -m bench.engine_step --profile                # per-op profile of a 32-row decode step

A variant is RUNNER:DTYPE (RUNNER: native | native-unfused | transformers; DTYPE: float32 |
bfloat16 | auto). native-unfused is the native runner without its fused CPU forward
(llama_forward.c), layer by layer through torch and our product kernel.
Prefix caching is off: every round computes its prompts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from serve_app.config import ModelServingArgs
from serve_app.engine.batch_engine import BatchEngine
from serve_app.engine.factory import engine_config
from serve_app.engine.loading import eos_token_ids, load_model
from serve_app.engine.types import GenerationRequest, SamplingParams

STEPS = ("decode, 1 row", "decode, 8 rows", "decode, 32 rows", "prefill, 2000 tokens (whole)")


def make_engine(model_name: str, variant: str) -> BatchEngine:
    runner, dtype = variant.split(":")
    model, tokenizer = load_model(model_name, dtype, "cpu")
    unfused = runner == "native-unfused"
    args = ModelServingArgs(model=model_name, runner="native" if unfused else runner, enable_prefix_caching=False,
                            num_speculative_tokens=0, kv_cache_tokens=16384)
    os.environ["SERVE_APP_FUSED_FORWARD"] = "0" if unfused else "1"  # read when the runner is built
    try:
        return BatchEngine(model, tokenizer, eos_token_ids(model, tokenizer), engine_config(args, "cpu", 4096))
    finally:
        os.environ.pop("SERVE_APP_FUSED_FORWARD")


def request(request_id: str, prompt: list[int], max_tokens: int) -> GenerationRequest:
    return GenerationRequest(request_id=request_id, prompt_token_ids=prompt,
                             params=SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0))


def measure(engines: dict[str, BatchEngine], rounds: int) -> dict[tuple[str, str], list[float]]:
    prompts = torch.randint(100, 1000, (32, 2000)).tolist()
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for rows, label in ((1, STEPS[0]), (8, STEPS[1]), (32, STEPS[2])):
            for variant, engine in engines.items():
                for i in range(rows):  # room for the steps that prefill the others, then 16 of all rows
                    engine.add(request(f"r{i}", prompts[i][:128], 64))
                while engine.waiting or any(not s.prefilled for s in engine.running):
                    engine.step()
                for _ in range(16):  # only steps that decode every row (rows prefilled first finish first)
                    engine.step()
                    if len(engine.running) == rows:
                        times.setdefault((variant, label), []).append(engine.last_step_seconds * 1e3)
                for i in range(rows):
                    engine.cancel(f"r{i}")
                while engine.has_work:
                    engine.step()
        for variant, engine in engines.items():
            engine.add(request("prefill", prompts[0], 1))
            start = time.perf_counter()
            while engine.has_work:
                engine.step()
            times.setdefault((variant, STEPS[3]), []).append((time.perf_counter() - start) * 1e3)
    return times


def profile(engines: dict[str, BatchEngine], steps: int = 5, top: int = 12) -> None:
    """Where one 32-row decode step's time goes, by torch op (self CPU time, mean per step)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    prompts = torch.randint(100, 1000, (32, 128)).tolist()
    for variant, engine in engines.items():
        for i in range(32):
            engine.add(request(f"p{i}", prompts[i], 3 + steps + 2))
        while engine.waiting or any(not s.prefilled for s in engine.running):
            engine.step()
        for _ in range(3):
            engine.step()
        started = time.perf_counter()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.step()
        wall = (time.perf_counter() - started) * 1e3 / steps
        while engine.has_work:
            engine.step()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
        print(f"\n{variant}: a 32-row decode step, {wall:.1f} ms with the profiler on ({total:.1f} ms in ops)\n")
        print("| op | ms per step | share | calls per step |")
        print("|---|---:|---:|---:|")
        for e in events[:top]:
            ms = e.self_cpu_time_total / 1e3 / steps
            print(f"| `{e.key}` | {ms:.1f} | {100 * ms / total:.0f}% | {e.count // steps} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--variants", nargs="+", default=["transformers:float32", "native:float32"])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--profile", action="store_true", help="a per-op profile of one 32-row decode step instead")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    engines = {v: make_engine(a.model, v) for v in a.variants}
    if a.profile:
        profile(engines)
        return
    times = measure(engines, a.rounds)
    first = a.variants[0]
    print(f"{a.model}, {a.threads} threads, {a.rounds} rounds; median ms (speed-up over {first})\n")
    print("| step | " + " | ".join(a.variants) + " |")
    print("|---|" + "---|" * len(a.variants))
    for what in STEPS:
        base = statistics.median(times[(first, what)])
        cells = [f"{statistics.median(times[(v, what)]):.1f}" + ("" if v == first else
                 f" ({base / statistics.median(times[(v, what)]):.2f}×)") for v in a.variants]
        print(f"| {what} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

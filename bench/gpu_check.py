"""The GPU path in one short run: what a session lent a GPU checks first (none has been lent yet).

    .venv/bin/python -m bench.gpu_check                  # on CUDA: the built-in SmolLM2, bf16
    .venv/bin/python -m bench.gpu_check --device cpu     # a dry run of this script on the CPU

1. Correctness, float32 and then the served dtype (bf16 on a GPU): the same requests (joining
   one per step, ending at different lengths) through an engine replaying CUDA graphs
   (decode_graphs.py) and one launching every operation (cuda_graphs off), greedy; and the eager
   one beside transformers' `generate` on the same weights (in float32 they must agree; in bf16
   `generate` rounds activations, we do not). Reports how many requests' tokens are identical and
   where the first difference is.
2. Speed, served dtype: median decode step time at 1, 8 and 32 rows (128-token prompts), graphs
   on vs off, and the speed-up; which graphs were captured.

On a CPU nothing is captured: `--device cpu` runs the graphs' function through the same static
buffers (decode_graphs.Rerun), checking this script, not the GPU.
Writes $OUT/gpu_check.json when OUT is set (the device machine's output folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback

import torch

from serve_app.config import DEFAULT_MODEL, ModelServingArgs
from serve_app.engine.batch_engine import BatchEngine
from serve_app.engine.factory import engine_config
from serve_app.engine.loading import eos_token_ids, load_model
from serve_app.engine.types import GenerationRequest, SamplingParams

PROMPTS = ["The quick brown fox", "Ray Serve routes requests to replicas", "def fibonacci(n):",
           "Hello, world! How are you today?", "a", "Paged attention reads the keys of a sequence",
           "The capital of France is", "1, 2, 3, 4,"]


def request(request_id: str, prompt: list[int], max_tokens: int) -> GenerationRequest:
    return GenerationRequest(request_id=request_id, prompt_token_ids=prompt,
                             params=SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0))


def make_engine(model, tokenizer, device: torch.device, graphs: bool) -> BatchEngine:
    args = ModelServingArgs(enable_prefix_caching=False, num_speculative_tokens=0, cuda_graphs=graphs,
                            max_batch_size=32, kv_cache_tokens=32 * 1024)
    engine = BatchEngine(model, tokenizer, eos_token_ids(model, tokenizer), engine_config(args, device.type, 2048))
    if graphs and device.type == "cpu":  # the dry run: the same function through static buffers
        engine.runner.graphs = engine.runner.decode_graphs(32, capture=False)
    return engine


def reply_length(i: int) -> int:
    return 24 + 16 * (i % 4)


def staggered(engine: BatchEngine, prompts: list[list[int]], length=reply_length) -> dict[str, list[int]]:
    """Greedy replies of `length(i)` tokens to prompts that join one per step (the decode batch
    grows, then shrinks as replies end; late ones wait for a slot and reuse finished ones' blocks)."""
    pending = [request(str(i), p, length(i)) for i, p in enumerate(prompts)]
    done: dict[str, list[int]] = {}
    while pending or engine.has_work:
        if pending:
            engine.add(pending.pop(0))
        for out in engine.step():
            done.setdefault(out.request_id, []).extend(out.token_ids)
    return done


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Where two greedy streams first differ; None when one is the other's start (generate stops
    at EOS, our engines were told to go on)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def compare(name: str, mine: dict[str, list[int]], theirs: dict[str, list[int]]) -> dict:
    diffs = {rid: first_difference(mine[rid], theirs[rid]) for rid in mine}
    same = sum(d is None for d in diffs.values())
    at = sorted(d for d in diffs.values() if d is not None)
    print(f"{name}: {same}/{len(diffs)} requests identical; first differences at {at}")
    return {"identical": same, "requests": len(diffs), "first_differences": diffs}


def generate_reference(model, prompts: list[list[int]], device: torch.device) -> dict[str, list[int]]:
    out = {}
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt], device=device)
        tokens = model.generate(ids, max_new_tokens=reply_length(i), do_sample=False)
        out[str(i)] = tokens[0, len(prompt):].tolist()
    return out


def step_times(engine: BatchEngine, rows: int, prompt: list[int], device: torch.device, steps: int = 40) -> float:
    for i in range(rows):
        engine.add(request(f"t{i}", prompt, steps + 8))
    while engine.waiting or any(not s.prefilled for s in engine.running):
        engine.step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()  # sampling reads the tokens back: the step has finished on the device
        times.append(time.perf_counter() - start)
    while engine.has_work:
        engine.step()
    return statistics.median(times[5:]) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    device = torch.device(args.device)
    report: dict = {"device": str(device), "model": args.model, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    print(f"{args.model} on {device} ({report['gpu'] or 'cpu'}), torch {torch.__version__}")
    for dtype in ("float32", "auto"):  # float32: tokens must be generate's; auto (bf16): what serves
        model, tokenizer = load_model(args.model, dtype, device)
        engines = {"graphs": make_engine(model, tokenizer, device, True),
                   "eager": make_engine(model, tokenizer, device, False)}
        print(f"{model.dtype}: runner {engines['graphs'].runner.name}, kv cache {engines['graphs'].kv_dtype}")
        prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
        try:  # a failure is reported and the run goes on: a device run is rare and short
            outputs = {name: staggered(engine, prompts) for name, engine in engines.items()}
            report[str(model.dtype)] = {
                "graphs_vs_eager": compare("  graphs vs eager", outputs["graphs"], outputs["eager"]),
                "eager_vs_generate": compare("  eager vs generate", outputs["eager"],
                                             generate_reference(model, prompts, device))}
        except Exception:  # noqa: BLE001
            report[str(model.dtype)] = {"error": traceback.format_exc()}
            print(report[str(model.dtype)]["error"])
    prompt = torch.randint(100, 1000, (128,)).tolist()
    rows = {}
    print(f"{'decode step':>14} | {'graphs ms':>9} | {'eager ms':>8} | speed-up")
    for n in args.rows:
        try:
            graphed, eager = (step_times(engines[k], n, prompt, device) for k in ("graphs", "eager"))
        except Exception:  # noqa: BLE001
            rows[n] = {"error": traceback.format_exc()}
            print(rows[n]["error"])
            continue
        rows[n] = {"graphs_ms": graphed, "eager_ms": eager, "speedup": eager / graphed}
        print(f"{n:>9} rows | {graphed:9.2f} | {eager:8.2f} | {eager / graphed:.2f}x")
    graphs = engines["graphs"].runner.graphs
    report.update(step_ms=rows, graphs_captured=sorted(graphs.graphs) if graphs else [],
                  graphs_failed=bool(graphs and graphs.failed))
    print("graphs (rows, blocks):", report["graphs_captured"], "(a capture failed)" * report["graphs_failed"])
    if device.type == "cuda":
        report["memory_gib"] = {"allocated": torch.cuda.memory_allocated() / 2**30,
                                "reserved": torch.cuda.memory_reserved() / 2**30,
                                "peak": torch.cuda.max_memory_allocated() / 2**30}
        print("GPU memory (GiB):", {k: round(v, 2) for k, v in report["memory_gib"].items()})
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_check.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()

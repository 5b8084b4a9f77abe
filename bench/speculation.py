"""Prompt-lookup speculative decoding against one token per step, for the bare engine (no
server): the same model behind two BatchEngines (drafts off / on) in one process, each
workload run on both in turn, round after round, so both see the same machine. Prints
output tokens/s (median over rounds) and whether the tokens were identical.

    .venv/bin/python -m bench.speculation [--rows 1 2 4 8 16] [--rounds 3] [--max-tokens 128]

Workloads: the benchmark's completions prompts (random words; SmolLM2's greedy
continuations of them loop: the best case for prompt lookup) and the chat questions
(natural stops; text that repeats much less). See README "Performance".
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench.loadgen import CHAT_QUESTIONS, Workload
from serve_app.config import ModelArgs, ModelServingArgs
from serve_app.engine.batch_engine import BatchEngine
from serve_app.engine.factory import engine_config
from serve_app.engine.loading import eos_token_ids, load_model
from serve_app.engine.types import GenerationRequest, SamplingParams


def workloads(tokenizer, n: int) -> dict[str, tuple[list[list[int]], bool]]:
    """name -> (prompts, ignore_eos)."""
    completions = [tokenizer(p)["input_ids"] for p, _ in Workload(128, 128).requests(n)]
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": CHAT_QUESTIONS[i % len(CHAT_QUESTIONS)]}],
                                          add_generation_prompt=True, return_dict=True)["input_ids"]
            for i in range(n)]
    return {"completions (loops)": (completions, True), "chat (natural stops)": (chat, False)}


def run(engine: BatchEngine, prompts: list[list[int]], max_tokens: int, ignore_eos: bool) -> tuple[float, list]:
    """Output tokens/s of these prompts started together, and their tokens."""
    for i, prompt in enumerate(prompts):
        engine.add(GenerationRequest(request_id=str(i), prompt_token_ids=prompt, params=SamplingParams(
            max_tokens=max_tokens, temperature=0, ignore_eos=ignore_eos)))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    start = time.perf_counter()
    while engine.has_work:
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    return sum(map(len, tokens.values())) / (time.perf_counter() - start), list(tokens.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model, tokenizer = load_model(a.model, "auto", "cpu")
    k = ModelArgs().num_speculative_tokens
    def engine(draft: int) -> BatchEngine:
        args = ModelServingArgs(model=a.model, max_batch_size=max(a.rows), kv_cache_tokens=max(a.rows) * 512,
                       num_speculative_tokens=draft, speculative_max_rows=max(a.rows), enable_prefix_caching=False)
        return BatchEngine(model, tokenizer, eos_token_ids(model, tokenizer), engine_config(args, "cpu", 2048))

    engines = {draft: engine(draft) for draft in (0, k)}
    loads = workloads(tokenizer, max(a.rows))
    rates: dict[tuple, list[float]] = {}
    same: dict[tuple, bool] = {}
    for _ in range(a.rounds):
        for name, (prompts, ignore_eos) in loads.items():
            for rows in a.rows:
                outputs = {}
                for draft, engine in engines.items():
                    rate, outputs[draft] = run(engine, prompts[:rows], a.max_tokens, ignore_eos)
                    rates.setdefault((name, rows, draft), []).append(rate)
                same[(name, rows)] = same.get((name, rows), True) and outputs[0] == outputs[k]
    print(f"\n{a.model}, {a.threads} threads, drafts of up to {k} tokens, {a.rounds} rounds (median tok/s)\n")
    print("| workload | rows | one token per step | speculative | speed-up | same tokens |")
    print("|---|---|---|---|---|---|")
    for name in loads:
        for rows in a.rows:
            plain, spec = (statistics.median(rates[(name, rows, d)]) for d in (0, k))
            print(f"| {name} | {rows} | {plain:.1f} | {spec:.1f} | {spec / plain:.2f}× | {same[(name, rows)]} |")


if __name__ == "__main__":
    main()

"""What structured output costs a step (issue 20's target: every row of a c=32 batch constrained
by a JSON schema costs <= 10% more per step than none; unconstrained rows in a mixed batch pay
nothing measurable), and whether every constrained output validates.

One engine (the server's defaults, no server), rounds alternating: 32 rows unconstrained,
32 rows constrained by a JSON schema, 16 + 16. Rows are sampled (temperature 0.8) from chat
prompts asking for the JSON; a decode step's time is taken once every row has prefilled.

    .venv/bin/python -m bench.structured --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import jsonschema
import torch

from serve_app.config import ModelServingArgs
from serve_app.engine.batch_engine import BatchEngine
from serve_app.engine.factory import engine_config
from serve_app.engine.grammar_spec import GrammarSpec
from serve_app.engine.loading import eos_token_ids, load_model
from serve_app.engine.types import GenerationRequest, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["vip", "new", "churned"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "email", "tags", "address"],
    "additionalProperties": False,
}
MIXES = {"unconstrained": 0, "all constrained": 32, "16 + 16": 16}


def prompts(tokenizer, n: int) -> list[list[int]]:
    people = ["a bakery owner", "a retired pilot", "a student", "a nurse", "a chess coach", "a farmer",
              "a software tester", "a museum guide"]
    out = []
    for i in range(n):
        messages = [{"role": "user", "content": f"Describe {people[i % len(people)]} number {i} as a JSON "
                     f"object with name, age, email, tags and address."}]
        out.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False))
    return out


def run_round(engine: BatchEngine, tokenizer, constrained: int, max_tokens: int, seed: int):
    grammar = GrammarSpec.json_schema(SCHEMA)
    ids = prompts(tokenizer, 32)
    for i in range(32):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=seed + i,
                                grammar=grammar if i < constrained else None)
        engine.add(GenerationRequest(request_id=f"r{i}", prompt_token_ids=ids[i], params=params))
    texts: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    steps: list[float] = []
    while engine.has_work:
        decoding = not engine.waiting and all(s.prefilled for s in engine.running)
        for out in engine.step():
            texts.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finish_reason:
                reasons[out.request_id] = out.finish_reason
        if decoding and len(engine.running) >= 24:  # the steps of a (nearly) full batch
            steps.append(engine.last_step_seconds * 1e3)
    valid = stopped = 0
    for i in range(constrained):
        rid = f"r{i}"
        if reasons.get(rid) != "stop":
            continue  # cut at max_tokens: an unfinished document
        stopped += 1
        try:
            jsonschema.validate(json.loads(tokenizer.decode(texts[rid], skip_special_tokens=True)), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return steps, stopped, valid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    args = ModelServingArgs(model=a.model)
    model, tokenizer = load_model(a.model, args.dtype, "cpu")
    engine = BatchEngine(model, tokenizer, eos_token_ids(model, tokenizer), engine_config(args, "cpu", 4096))
    run_round(engine, tokenizer, 32, 8, seed=0)  # warm-up: compiles the schema's grammar once
    steps = {m: [] for m in MIXES}
    stopped = valid = 0
    for r in range(a.rounds):
        for mix, constrained in MIXES.items():
            s, n_stopped, n_valid = run_round(engine, tokenizer, constrained, a.max_tokens, seed=1000 * r)
            steps[mix] += s
            stopped, valid = stopped + n_stopped, valid + n_valid
    base = statistics.median(steps["unconstrained"])
    print(f"{a.model}, {a.threads} threads, {a.rounds} rounds, decode steps with >= 24 of 32 rows running\n")
    print("| batch of 32 | median step ms | ÷ unconstrained | steps |")
    print("|---|---:|---:|---:|")
    for mix in MIXES:
        median = statistics.median(steps[mix])
        print(f"| {mix} | {median:.1f} | {median / base:.3f} | {len(steps[mix])} |")
    print(f"\nconstrained outputs that stopped by themselves: {stopped}; valid JSON matching the schema: "
          f"{valid} ({100 * valid / max(1, stopped):.0f}%)")


if __name__ == "__main__":
    main()

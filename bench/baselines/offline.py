"""What the hardware can do with no server: `generate` on static batches.

- throughput: output tokens/s of `model.generate` over the same prompts in
  static batches (left-padded, greedy, exactly `max_new_tokens` each);
- prefill: time to the first token of one prompt at batch 1 (forward over the
  prompt + argmax), the floor under any server's TTFT.
"""

from __future__ import annotations

import statistics
import time

import torch


def offline_throughput(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int) -> dict:
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
            tokens += (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    duration = time.perf_counter() - start
    return {"batch_size": batch_size, "requests": len(prompts), "output_tokens": tokens,
            "duration_s": duration, "output_tokens_per_s": tokens / duration}


def prefill_latency(model, tokenizer, prompt: str, repeats: int = 7) -> float:
    ids = tokenizer(prompt, return_tensors="pt")
    times = []
    with torch.inference_mode():
        model(**ids)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model(**ids, logits_to_keep=1).logits[:, -1].argmax(-1)
            times.append(time.perf_counter() - start)
    return statistics.median(times)

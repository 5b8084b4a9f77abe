"""Decode attention (one query token per row) at the engine's shapes: SDPA with
`enable_gqa` against the grouped form the engine uses (query heads of one KV head
attended as that head's queries). Prints best-of-7 microseconds per call.

    .venv/bin/python -m bench.decode_attention [--heads 9 --kv-heads 3 --head-dim 64]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def best_us(fn, calls: int = 50, repeats: int = 7) -> float:
    best = float("inf")
    for _ in range(repeats):
        for _ in range(3):
            fn()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=9)  # SmolLM2-135M
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    hq, hkv, d = a.heads, a.kv_heads, a.head_dim
    print(f"{hq} query heads, {hkv} KV heads, head dim {d}, {a.threads} threads\n")
    print("| rows | keys | SDPA enable_gqa µs | grouped µs | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|")
    for rows, keys in ((1, 200), (8, 200), (32, 208), (32, 1024)):
        t_gqa, t_grouped, diff = measure(rows, keys, hq, hkv, d)
        print(f"| {rows} | {keys} | {t_gqa:.1f} | {t_grouped:.1f} | {t_gqa / t_grouped:.2f}× | {diff:.1e} |")


def measure(rows: int, keys: int, hq: int, hkv: int, d: int) -> tuple[float, float, float]:
    # Strided like the engine's cache reads: [rows, keys, Hkv, D] viewed as [rows, Hkv, keys, D].
    k = torch.randn(rows, keys, hkv, d).transpose(1, 2)
    v = torch.randn(rows, keys, hkv, d).transpose(1, 2)
    q = torch.randn(rows, hq, 1, d)
    lens = torch.randint(keys // 2, keys + 1, (rows,))
    mask = (torch.arange(keys) < lens.unsqueeze(1)).view(rows, 1, 1, keys) if rows > 1 else None

    def gqa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def grouped():
        return F.scaled_dot_product_attention(q.view(rows, hkv, hq // hkv, d), k, v, attn_mask=mask)

    diff = (gqa() - grouped().view(rows, hq, 1, d)).abs().max().item()
    return best_us(gqa), best_us(grouped), diff


if __name__ == "__main__":
    main()

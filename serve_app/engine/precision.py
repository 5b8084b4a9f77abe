"""Which dtype a replica computes in: `dtype: auto` decides per machine, and says why.

bfloat16 halves the bytes every decode step reads and, where the hardware multiplies it
natively (CUDA; CPUs with AVX512-BF16 or AMX), the matrix products get 2-4x faster. Where it
is emulated, torch's bf16 products are slower than float32; there the native Llama runner
multiplies bf16 weights in float32 with our compiled kernel (cpu_kernels.BF16WeightLinear):
half the bytes, float32 arithmetic. On a CPU, auto therefore takes:
- bfloat16 for a bfloat16 checkpoint (most current models) when that kernel can run it: the
  weights are exactly the checkpoint's, and every product is float32 or native bf16;
- for other checkpoints, bfloat16 only when the CPU advertises native support and a short
  measurement at startup confirms the matrix products are faster (rounding the weights is then
  worth it); otherwise float32.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
MIN_SPEEDUP = 1.15  # below this the measurement is within noise of a tie: keep float32's accuracy


@functools.cache  # a property of the machine; the fused forward asks on every step
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS)


def native_bf16_min_tokens() -> int | None:
    """Tokens per step from which oneDNN's bf16 products (activations rounded to bf16) take over
    from our float32-arithmetic kernels and the fused forward for bf16 weights on this CPU; None
    where it has no bf16 instructions. AVX512-BF16 alone (AMD Zen 4/5, Intel Cooper Lake): 96,
    measured on a Zen 5 by stepping both paths alternately (docs/performance.md): the fused
    forward is 1.2-1.5x faster up to 32 decode rows + 32 prompt tokens, even at ~70-95 tokens,
    and oneDNN 1.15x faster from ~130. AMX (Intel Sapphire Rapids on): 16, not measured here; its
    tile products are several times AVX512-BF16's, so arithmetic bounds them from fewer rows."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return 16
    if "avx512_bf16" in flags:
        return 96
    return None


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype the checkpoint's weights were saved in, as its config says (None if unsaid)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = DTYPES.get(value.removeprefix("torch."))
    return value if isinstance(value, torch.dtype) else None


def bf16_weight_kernel_runs(config, runner: str, device: torch.device) -> bool:
    """Whether bf16 weights of this model would be multiplied by our float32 kernel."""
    from serve_app.engine import cpu_kernels
    from serve_app.engine.llama import unsupported_reason

    if config is None or runner == "transformers" or not cpu_kernels.has_bf16_weight_linear(device):
        return False
    # the model's full context: conservative for sliding-window models (they then stay float32)
    return unsupported_reason(config, getattr(config, "max_position_embeddings", 1 << 20)) is None


def _matmul_seconds(dtype: torch.dtype, rows: int, size: int = 1024, repeats: int = 5) -> float:
    weight = torch.randn(4 * size, size).to(dtype)
    x = torch.randn(rows, size).to(dtype)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(4):
            torch.nn.functional.linear(x, weight)
        best = min(best, time.perf_counter() - start)
    return best


def bf16_speedup() -> tuple[float, float]:
    """float32 time / bfloat16 time of a decode-sized matrix product, at 1 and 32 rows: measured
    once per machine (CPU flags, torch version, threads) and kept in the serve_app cache, so that
    every replica and every restart on it decides the same. Measured by each replica, a speed-up
    near MIN_SPEEDUP gave two replicas of one model different dtypes (embeddings ~1e-3 apart)."""
    from serve_app.engine.builtin_models import cache_root  # (it imports nothing of this module)

    key = hashlib.sha256(" ".join([torch.__version__, str(torch.get_num_threads()), *sorted(cpu_flags())])
                         .encode()).hexdigest()[:16]
    path = cache_root() / f"bf16-speedup-{key}.json"
    try:
        return tuple(json.loads(path.read_text()))
    except (OSError, ValueError):
        pass
    measured = tuple(_matmul_seconds(torch.float32, rows) / _matmul_seconds(torch.bfloat16, rows) for rows in (1, 32))
    try:  # the first replica's figures win: written whole, never replaced
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(measured))
        try:
            os.link(tmp, path)
        finally:
            tmp.unlink()
        return measured
    except FileExistsError:
        return tuple(json.loads(path.read_text()))
    except OSError:  # a read-only cache: this replica's own measurement
        return measured


def choose_dtype(requested: str, device: torch.device, config=None, runner: str = "auto") -> tuple[torch.dtype, str]:
    """(dtype, why) for `dtype` as configured; `config` is the model's (transformers) config."""
    if requested != "auto":
        return DTYPES[requested], "configured"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "auto: the GPU computes bfloat16 natively"
        return torch.float16, "auto: the GPU has no bfloat16; float16"
    if device.type != "cpu":
        return torch.float32, f"auto: float32 on {device.type}"
    native = [f for f in NATIVE_BF16_FLAGS if f in cpu_flags()]
    if checkpoint_dtype(config) == torch.bfloat16 and bf16_weight_kernel_runs(config, runner, device):
        how = f"bf16 products on {'+'.join(native)} from {native_bf16_min_tokens()} tokens per step, else " \
            "float32" if native else "products in float32 (this CPU has no bf16 instructions)"
        return torch.bfloat16, f"auto: a bfloat16 checkpoint keeps its weights (half float32's bytes); {how}"
    if not native:
        return torch.float32, "auto: this CPU has no native bfloat16 (no AVX512-BF16 or AMX): float32"
    one, many = bf16_speedup()
    measured = f"bfloat16 matmul measured {one:.2f}x float32 at 1 row, {many:.2f}x at 32 rows"
    if min(one, many) >= MIN_SPEEDUP:
        return torch.bfloat16, f"auto: the CPU has {'+'.join(native)}; {measured}: bfloat16"
    return torch.float32, f"auto: the CPU has {'+'.join(native)} but {measured}: float32"


def choose_kv_dtype(requested: str, compute: torch.dtype, device: torch.device,
                    weights: torch.dtype = torch.float32) -> tuple[torch.dtype, str]:
    """(dtype of the KV cache, why). auto on a CPU with our compiled kernels and 16-bit weights:
    float16. Decode attention reads every cached key and value each step, at 32 rows x 200
    positions more bytes than the weights, and the kernels widen float16 in registers; float16
    keeps 11 significant bits where the bf16 weights keep 8 (top-1 agreement with a float32 cache
    1.000, tests/test_precision.py), as llama.cpp's default F16 cache does. float32 weights keep a
    float32 cache (exact against transformers). On a GPU, 16-bit weights with float32 attention
    (the native runner) get a float16 cache too (decode attention computes in it:
    attention.gpu_attention_dtype). Elsewhere (transformers' module) the attention's own dtype.
    float16/bfloat16 also halve the cache's memory."""
    if requested != "auto":
        return DTYPES[requested], "configured"
    if device.type == "cuda" and weights != torch.float32 and compute == torch.float32:
        return torch.float16, "auto: 16-bit weights on a GPU: a float16 cache (half the memory and bytes read)"
    if device.type == "cpu" and weights != torch.float32 and compute == torch.float32:
        from serve_app.engine import cpu_kernels  # here: cpu_kernels imports this module (cpu_flags)

        if cpu_kernels.supports(torch.float32, torch.float16, device):
            return torch.float16, "auto: 16-bit weights on CPU: a float16 cache (half the bytes decode attention reads)"
    return compute, "auto: the attention's dtype"

"""Compiled CPU kernels (kernels/*.c): built once per machine with the system C compiler, loaded
with ctypes, and used only where they exist. Without a compiler the engine still runs, through
torch's gather + SDPA path (attention.py).

Why a kernel of our own: torch has no paged attention for the CPU, so decoding rows had their
KV blocks gathered into padded copies every layer; the copies cost as much as the attention.
The kernel reads each key and value once, in place.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from serve_app.engine.builtin_models import cache_root
from serve_app.engine.precision import cpu_flags

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels") / "paged_attention.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
KERNELS = {  # (query dtype, cache dtype) -> function
    (torch.float32, torch.float32): "paged_decode_attention_f32_f32",
    (torch.float32, torch.float16): "paged_decode_attention_f32_f16",
    (torch.float32, torch.bfloat16): "paged_decode_attention_f32_bf16",
    (torch.bfloat16, torch.bfloat16): "paged_decode_attention_bf16_bf16",
}
DISABLE_ENV = "SERVE_APP_CPU_KERNELS"  # "0": never build or use them


def _compile(cc: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)
        built.rename(target)  # atomic: replicas starting together never load half a file


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built (no compiler, not x86/ARM Linux...)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        logger.info("no C compiler: decode attention gathers KV blocks through torch")
        return None
    # One build per source, compiler, flags and CPU: -march=native code must not run elsewhere.
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *FLAGS, *sorted(cpu_flags())]).encode()).hexdigest()
    target = cache_root() / "kernels" / f"paged_attention-{key[:16]}.so"
    try:
        if not target.exists():
            _compile(cc, target)
        lib = ctypes.CDLL(str(target))  # after torch: its libgomp is the OpenMP runtime this one uses
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or e
        logger.warning("CPU kernels could not be built (%s); using torch's gather path", str(detail)[:500])
        return None
    for name in KERNELS.values():
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p] + \
            [ctypes.c_int64] * 5 + [ctypes.c_float]
    return lib


def supports(query_dtype: torch.dtype, cache_dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and (query_dtype, cache_dtype) in KERNELS and library() is not None


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, lens: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """out[n] = attention of query[n] ([N, Hq, D]) over the first lens[n] positions of row n's blocks
    (block_tables [N, W] int64) in the cache ([blocks, bs, Hkv, D]); all contiguous."""
    n, hq, d = query.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    fn = getattr(library(), KERNELS[(query.dtype, k_cache.dtype)])
    with torch.profiler.record_function("paged_decode_attention"):  # a ctypes call: named for profiles
        failed = fn(query.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
                    block_tables.stride(0), lens.data_ptr(), out.data_ptr(), n, hq, hkv, d, bs, scale)
    if failed:
        raise MemoryError("paged decode attention could not allocate its score buffer")

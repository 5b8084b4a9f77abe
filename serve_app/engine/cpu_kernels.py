"""Compiled CPU kernels (kernels/*.c): built once per machine with the system C compiler, loaded
with ctypes, and used only where they exist. Without a compiler the engine still runs, through
torch's gather + SDPA path (attention.py).

Why kernels of our own:
- paged_attention.c: torch has no paged attention for the CPU, so decoding rows had their KV
  blocks gathered into padded copies every layer; the copies cost as much as the attention.
  The kernel reads each key and value once, in place.
- layer_ops.c: the small float32 operations between a layer's products (residual + RMSNorm,
  SiLU x up, rotary), fused: at a few rows torch's per-op dispatch cost more than the arithmetic.
- linear_bf16w.c: matrix products over bfloat16 weights in float32 arithmetic. Where the CPU
  has no bf16 instructions, torch emulates bf16 products (slower than float32); this kernel
  reads half float32's bytes and widens them in registers (llama.cpp's BF16 does the same).
- llama_forward.c: a whole Llama forward for steps whose attention is small (decode rows,
  drafts, short prompts) in one call and one OpenMP region: no Python or fork/join between
  a layer's operations.
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

KERNELS_DIR = Path(__file__).with_name("kernels")
SOURCES = [KERNELS_DIR / name for name in ("paged_attention.c", "linear_bf16w.c", "layer_ops.c", "llama_forward.c")]
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
        subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", str(built), "-lm"], check=True, capture_output=True,
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
    sources = b"".join(path.read_bytes() for path in sorted(KERNELS_DIR.glob("*.[ch]")))
    key = hashlib.sha256(sources + " ".join([cc, *FLAGS, *sorted(cpu_flags())]).encode()).hexdigest()
    target = cache_root() / "kernels" / f"serve_app_kernels-{key[:16]}.so"
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
    lib.packed_bf16w_elements.restype = ctypes.c_int64
    lib.packed_bf16w_elements.argtypes = [ctypes.c_int64] * 2
    lib.pack_bf16w.restype = None
    lib.pack_bf16w.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
    lib.linear_f32_bf16w.restype = None
    lib.linear_f32_bf16w.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    lib.add_rms_norm.restype = lib.silu_mul.restype = lib.rope.restype = None
    lib.add_rms_norm.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 2 + [ctypes.c_float]
    lib.silu_mul.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
    lib.rope.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4
    lib.llama_forward_scratch.restype = ctypes.c_int64
    lib.llama_forward_scratch.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.llama_forward.restype = ctypes.c_int
    lib.llama_forward.argtypes = [ctypes.c_void_p] * 9 + [ctypes.c_int64] * 2 + [ctypes.c_void_p] * 2 + [ctypes.c_int64]
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


def has_bf16_weight_linear(device: torch.device) -> bool:
    return device.type == "cpu" and library() is not None


class BF16WeightLinear:
    """x @ W.T (+ b) for float32 x, with W kept in bfloat16 (packed by linear_bf16w.c's layout)."""

    __slots__ = ("bias", "in_features", "out_features", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        lib = library()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().contiguous()
        if weight.dtype not in (torch.float32, torch.bfloat16):
            weight = weight.float()
        self.packed = torch.empty(lib.packed_bf16w_elements(*weight.shape), dtype=torch.int16)
        lib.pack_bf16w(weight.data_ptr(), int(weight.dtype == torch.float32), self.packed.data_ptr(), *weight.shape)
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous()
        out = torch.empty(x.shape[0], self.out_features, dtype=torch.float32, device=x.device)
        with torch.profiler.record_function("linear_f32_bf16w"):  # a ctypes call: named for profiles
            library().linear_f32_bf16w(x.data_ptr(), self.packed.data_ptr(),
                                       None if self.bias is None else self.bias.data_ptr(), out.data_ptr(),
                                       x.shape[0], self.out_features, self.in_features)
        return out


class LayerOps:
    """layer_ops.c for float32 CPU tensors (all contiguous); see the file for each operation."""

    def __init__(self):
        self.lib = library()

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
        """x += delta (in place, when given); returns rms_norm(x) * weight."""
        out = torch.empty_like(x)
        self.lib.add_rms_norm(x.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(),
                              out.data_ptr(), x.shape[0], x.shape[1], eps)
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        rows, width = gate_up.shape
        out = gate_up.new_empty(rows, width // 2)
        self.lib.silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, width // 2)
        return out

    def rope(self, x: torch.Tensor, heads: int, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotates the first `heads` heads of x [T, all heads, D] in place."""
        self.lib.rope(x.data_ptr(), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), x.shape[0], x.shape[1],
                      heads, x.shape[2])


def layer_ops(device: torch.device) -> LayerOps | None:
    return LayerOps() if device.type == "cpu" and library() is not None else None


class _LlamaLayer(ctypes.Structure):  # llama_forward.c's LlamaLayer
    _fields_ = [(name, ctypes.c_void_p) for name in (
        "input_norm", "post_norm", "qkv", "qkv_bias", "o", "o_bias", "gate_up", "gate_up_bias", "down", "down_bias",
        "k_cache", "v_cache")]


class _LlamaShape(ctypes.Structure):  # llama_forward.c's LlamaShape
    _fields_ = [(name, ctypes.c_int64) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim",
                                                      "intermediate", "kv_f16")] + [("eps", ctypes.c_float),
                                                                          ("scale", ctypes.c_float)]


def _ptr(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


class LlamaForward:
    """llama_forward.c over a LlamaRunner's weights (every product a BF16WeightLinear) and one KV
    cache (float32 or float16). `layers` are the runner's LayerWeights; they and the cache must
    outlive this."""

    def __init__(self, layers, final_norm: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 k_caches: list[torch.Tensor], v_caches: list[torch.Tensor], *, heads: int, kv_heads: int,
                 head_dim: int, eps: float, scale: float):
        self.lib = library()
        hidden = layers[0].input_norm.shape[0]
        intermediate = layers[0].down.bf16w.in_features
        kv_f16 = int(k_caches[0].dtype == torch.float16)
        self.shape = _LlamaShape(len(layers), hidden, heads, kv_heads, head_dim, intermediate, kv_f16, eps, scale)
        self.layers = (_LlamaLayer * len(layers))(*[_LlamaLayer(
            _ptr(w.input_norm), _ptr(w.post_norm), _ptr(w.qkv.bf16w.packed), _ptr(w.qkv.bf16w.bias),
            _ptr(w.o.bf16w.packed), _ptr(w.o.bf16w.bias), _ptr(w.gate_up.bf16w.packed), _ptr(w.gate_up.bf16w.bias),
            _ptr(w.down.bf16w.packed), _ptr(w.down.bf16w.bias), _ptr(k), _ptr(v))
            for w, k, v in zip(layers, k_caches, v_caches)])
        self.final_norm, self.cos, self.sin = final_norm, cos, sin
        self.hidden = hidden
        self.block_size = k_caches[0].shape[1]

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                 tables: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden states [T, hidden] of the step's tokens; x [T, hidden] float32
        (the embeddings) is the residual stream, updated in place. tables [T, W] int64: each
        token's block table; it attends to its first position + 1 positions."""
        T = x.shape[0]
        scratch = torch.empty(self.lib.llama_forward_scratch(ctypes.byref(self.shape), T), dtype=torch.float32)
        out = torch.empty(T, self.hidden, dtype=torch.float32)
        with torch.profiler.record_function("llama_forward"):  # a ctypes call: named for profiles
            failed = self.lib.llama_forward(
                ctypes.addressof(self.layers), ctypes.addressof(self.shape), self.final_norm.data_ptr(), x.data_ptr(),
                out.data_ptr(), scratch.data_ptr(), positions.data_ptr(), slots.data_ptr(), tables.data_ptr(),
                tables.stride(0), self.block_size, self.cos.data_ptr(), self.sin.data_ptr(), T)
        if failed:
            raise MemoryError("the fused forward could not allocate its attention buffer")
        return out

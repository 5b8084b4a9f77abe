"""Our own forward pass for the Llama family: Llama (1-3), Mistral, Qwen2, Qwen3.

The weights are those transformers loaded (config, safetensors, any dtype it supports),
rearranged once: q/k/v into one matrix and gate/up into another (one matrix product each
instead of three and two), the rotary embedding as cos/sin tables for every position (built
by transformers' own rotary module, so every rope type it precomputes is exact). A step runs
every packed token through the layers with no per-module Python, attends over the paged cache
(attention.py), and computes the LM head only for the rows that sample. On a CPU, small steps
run as one compiled call (cpu_kernels.LlamaForward); on a GPU, decode steps replay captured
CUDA graphs (decode_graphs.py).

Precision: the weights are in the model's dtype; everything between the matrix products (the
residual stream, norms, rotary, attention, SiLU) is float32, as llama.cpp keeps its
activations. How each product multiplies (float32 over bf16 weights, or natively in bf16) is
Projection's choice, per device. The KV cache has its own dtype
(precision.choose_kv_dtype).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from serve_app.engine import cpu_kernels
from serve_app.engine.attention import gpu_attention_dtype, paged_attention, paged_decode, write_kv
from serve_app.engine.decode_graphs import DecodeGraphs
from serve_app.engine.precision import native_bf16_min_tokens

# rope types whose tables do not depend on the sequence length (transformers precomputes them)
STATIC_ROPE = {"default", "linear", "llama3", "yarn"}
FAMILY = {"llama", "mistral", "qwen2", "qwen3"}


def unsupported_reason(config, max_model_len: int) -> str | None:
    """Why this model cannot run on LlamaRunner, or None when it can."""
    if config.model_type not in FAMILY:
        return f"model type {config.model_type!r} is not in the Llama family ({', '.join(sorted(FAMILY))})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in STATIC_ROPE:
        return f"rope type {rope_type!r} varies with the length"
    window = getattr(config, "sliding_window", None)
    uses_window = getattr(config, "use_sliding_window", True)
    if window and uses_window and window < max_model_len:
        return f"sliding-window attention ({window} < context {max_model_len})"
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return "layers with sliding-window attention"
    return None


PACKED_MIN_ROWS = 4  # below this a plain (GEMV) product is faster than oneDNN's packed one


class Projection:
    """x @ W.T (+ b) for float32 activations, returning float32, in the fastest way this device
    has for W's dtype (chosen once per weight):

    - bfloat16 W on a CPU: our kernel (cpu_kernels.BF16WeightLinear) reads W as bfloat16 and
      multiplies in float32: half the bytes of float32, float32 arithmetic. Where the CPU has
      bf16 instructions (AVX512-BF16, AMX), oneDNN's bf16 products (activations rounded to
      bf16) take over from `precision.native_bf16_min_tokens()` rows, where arithmetic, not
      bytes, bounds them; never for `exact_activations` (the LM head: its products decide
      between near-tied tokens).
    - float32 W on a CPU with oneDNN: also kept packed in oneDNN's blocked layout, used from
      PACKED_MIN_ROWS rows up: MKL's plain sgemm repacks W on every call, which dominated the
      products of a decode step (32 rows x SmolLM2's 576 x 3072 gate/up: 1.9 ms plain, 0.6 ms
      packed, 2 cores). The packed copy doubles the weights' memory.
    - otherwise (CUDA, no compiler): torch's product in W's dtype."""

    __slots__ = ("bf16w", "bias", "native_from", "packed", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, exact_activations: bool = False):
        self.weight = weight.detach().contiguous()
        self.bias = None if bias is None else bias.detach().contiguous()
        self.packed = None
        self.bf16w = None
        self.native_from = PACKED_MIN_ROWS
        device = self.weight.device
        if self.weight.dtype == torch.bfloat16 and cpu_kernels.has_bf16_weight_linear(device):
            self.bf16w = cpu_kernels.BF16WeightLinear(self.weight, self.bias)
            native_from = native_bf16_min_tokens()
            if exact_activations or native_from is None:
                self.weight = None  # only the packed copy is read: free a fused (q/k/v, gate/up) matrix
                return
            self.native_from = native_from
        if device.type == "cpu" and self.weight.dtype in (torch.float32, torch.bfloat16) \
                and torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight)
            except (RuntimeError, AttributeError):  # a torch build without oneDNN: plain products
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.bf16w is not None and (self.packed is None or rows < self.native_from):
            return self.bf16w(x)
        x = x.to(self.weight.dtype)
        if self.packed is not None and rows >= self.native_from:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "").float()
        return F.linear(x, self.weight, self.bias).float()


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Projection
    o: Projection
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm of each head's query and key
    k_norm: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: Projection
    down: Projection


def _cat(*tensors: torch.Tensor | None) -> torch.Tensor | None:
    return None if any(t is None for t in tensors) else torch.cat(tensors).contiguous()


class LlamaRunner:
    name = "native"

    def __init__(self, model, max_model_len: int, graph_rows: int = 0):
        """graph_rows: on a GPU, replay decode steps of up to this many rows from CUDA graphs (0: never)."""
        config = model.config
        self.config = config
        self.dtype = model.dtype
        self.attention_dtype = torch.float32  # queries, keys and values as computed (see the docstring)
        self.device = next(model.parameters()).device
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        inner = model.model
        self.ops = cpu_kernels.layer_ops(self.device)  # fused float32 ops between the products (CPU)
        with torch.no_grad():
            self.embed = inner.embed_tokens.weight.detach()
            self.final_norm = inner.norm.weight.detach().float()
            # The LM head's products decide between near-tied tokens, so its activations are never
            # rounded: with bf16 weights and bf16 activations, the head flipped 2.7% of SmolLM2's
            # top-1 choices on tests/data/precision_text.md, with float32 ones 1.0%
            # (tests/test_precision.py). bf16 weights stay bf16 only where our kernel multiplies
            # them in float32.
            head = model.lm_head.weight
            if head.dtype != torch.float32 and not (head.dtype == torch.bfloat16
                                                     and cpu_kernels.has_bf16_weight_linear(self.device)):
                head = head.float()
            self.lm_head = Projection(head, None, exact_activations=True)
            self.layers = [self._layer(layer) for layer in inner.layers]
            self.cos, self.sin = self._rope_tables(inner.rotary_emb, max_model_len)
        # The fused forward (llama_forward.c) for small steps; SERVE_APP_FUSED_FORWARD=0 turns it off.
        projections = [p for w in self.layers for p in (w.qkv, w.o, w.gate_up, w.down)]
        self.fusable = (self.ops is not None and os.environ.get("SERVE_APP_FUSED_FORWARD", "1") != "0"
                        and all(p.bf16w is not None for p in projections)
                        and self.layers[0].q_norm is None and self.head_dim % 2 == 0)
        self._fused: tuple | None = None  # (the KV cache, its LlamaForward)
        self.native_from = native_bf16_min_tokens()  # steps this large take oneDNN's bf16 products, unfused
        self.vocab = model.lm_head.weight.shape[0]
        self.max_model_len = max_model_len
        self.graphs = self.decode_graphs(graph_rows) if graph_rows and self.device.type == "cuda" else None

    def _layer(self, layer) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp

        def bias(module):
            return None if module.bias is None else module.bias.detach()

        return LayerWeights(
            input_norm=layer.input_layernorm.weight.detach().float(),
            qkv=Projection(_cat(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight),
                           _cat(bias(attn.q_proj), bias(attn.k_proj), bias(attn.v_proj))),
            o=Projection(attn.o_proj.weight, bias(attn.o_proj)),
            q_norm=attn.q_norm.weight.detach().float() if hasattr(attn, "q_norm") else None,
            k_norm=attn.k_norm.weight.detach().float() if hasattr(attn, "k_norm") else None,
            post_norm=layer.post_attention_layernorm.weight.detach().float(),
            gate_up=Projection(_cat(mlp.gate_proj.weight, mlp.up_proj.weight),
                               _cat(bias(mlp.gate_proj), bias(mlp.up_proj))),
            down=Projection(mlp.down_proj.weight, bias(mlp.down_proj)),
        )

    def _rope_tables(self, rotary, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [length, 1, head_dim] in float32, exactly as transformers computes them."""
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        positions = torch.arange(length, device=self.device).unsqueeze(0)
        cos, sin = rotary(probe, positions)
        return cos[0].float().unsqueeze(1), sin[0].float().unsqueeze(1)

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
        """x += delta in place (the residual stream), then RMSNorm(x) * weight, all float32:
        transformers' LlamaRMSNorm."""
        if self.ops is not None:
            return self.ops.add_rms_norm(x, delta, weight, self.eps)
        if delta is not None:
            x.add_(delta)
        return torch.rms_norm(x, weight.shape, weight, self.eps)

    def _silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.ops is not None:
            return self.ops.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _rotary(self, qkv: torch.Tensor, w: LayerWeights, positions: torch.Tensor):
        """(q, k, v) from the fused projection [T, Hq + 2 Hkv, D], with rotary applied to q and k
        (after Qwen3's per-head norms)."""
        heads = self.num_heads + self.num_kv_heads
        if self.ops is not None and w.q_norm is None:
            self.ops.rope(qkv, heads, positions, self.cos, self.sin)  # in place
            return qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        qk, v = qkv.split([heads, self.num_kv_heads], dim=1)
        if w.q_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat((torch.rms_norm(q, w.q_norm.shape, w.q_norm, self.eps),
                            torch.rms_norm(k, w.k_norm.shape, w.k_norm, self.eps)), dim=1)
        cos = self.cos.index_select(0, positions)
        sin = self.sin.index_select(0, positions)
        half = qk.shape[-1] // 2
        rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
        q, k = (qk * cos + rotated * sin).split([self.num_heads, self.num_kv_heads], dim=1)
        return q, k, v

    def _fused_forward(self, step) -> cpu_kernels.LlamaForward | None:
        """The whole-model CPU kernel for this step, when it can run it (see llama_forward.c): bf16
        weights all on our product kernel, no per-head norms, a float32 or float16 cache, small
        attention."""
        if step.token_tables is None or not self.fusable:
            return None
        cache = step.layout.cache
        if cache.keys[0].dtype not in (torch.float32, torch.float16) or (
                self.native_from is not None and len(step.input_ids) >= self.native_from):
            return None
        if self._fused is None or self._fused[0] is not cache:
            self._fused = (cache, cpu_kernels.LlamaForward(
                self.layers, self.final_norm, self.cos, self.sin, cache.keys, cache.values, heads=self.num_heads,
                kv_heads=self.num_kv_heads, head_dim=self.head_dim, eps=self.eps, scale=self.scale))
        return self._fused[1]

    def _layers(self, input_ids: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
        """The final hidden states [T, hidden] (float32, normed) of the packed tokens;
        attend(q, k, v, layer) stores the layer's keys and values and returns its attention."""
        T = input_ids.shape[0]
        q_size = self.num_heads * self.head_dim
        x = F.embedding(input_ids, self.embed).float()  # the residual stream, float32
        h = self._add_norm(x, None, self.layers[0].input_norm)
        next_norms = [layer.input_norm for layer in self.layers[1:]] + [self.final_norm]
        for i, (w, next_norm) in enumerate(zip(self.layers, next_norms)):
            qkv = w.qkv(h).view(T, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
            q, k, v = self._rotary(qkv, w, positions)
            o = attend(q, k, v, i)
            h = self._add_norm(x, w.o(o.view(T, q_size)), w.post_norm)
            h = self._add_norm(x, w.down(self._silu_mul(w.gate_up(h))), next_norm)
        return h

    def decode_forward(self, cache, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                       tables: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab] of n decoding rows, one token each, over `cache`, with shapes fixed by
        n and the tables' width and no reads back to the host: what decode_graphs.py captures."""

        def attend(q, k, v, layer):
            write_kv(cache, layer, slots, k, v)
            k_cache = cache.keys[layer]
            return paged_decode(q, k_cache, cache.values[layer], tables, lens, self.scale,
                                gpu_attention_dtype(q, k_cache))

        return self.lm_head(self._layers(ids, positions, attend))

    def decode_graphs(self, max_rows: int, capture: bool = True) -> DecodeGraphs:
        """Graphs of decode_forward for steps of up to max_rows rows (capture=False: rerun, for a CPU)."""
        return DecodeGraphs(self.decode_forward, max_rows, self.max_model_len, self.vocab, capture)

    @torch.inference_mode()
    def forward(self, step) -> torch.Tensor:
        """Logits [rows, vocab] (float32) for the step's `logit_rows`."""
        if self.graphs is not None and (shape := self.graphs.shape(step)) is not None:
            logits = self.graphs(step, shape)
            if logits is not None:
                return logits
        fused = self._fused_forward(step)
        if fused is not None:
            x = F.embedding(step.input_ids, self.embed).float()
            h = fused(x, step.positions, step.layout.write_slots, step.token_tables)
            return self.lm_head(h.index_select(0, step.logit_rows))
        h = self._layers(step.input_ids, step.positions,
                         lambda q, k, v, layer: paged_attention(q, k, v, layer, step.layout, self.scale))
        return self.lm_head(h.index_select(0, step.logit_rows))

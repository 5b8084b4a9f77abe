"""Our own forward pass for the Llama family: Llama (1-3), Mistral, Qwen2, Qwen3.

The weights are those transformers loaded (config, safetensors, any dtype it supports),
rearranged once: q/k/v into one matrix and gate/up into another (one matrix product each
instead of three and two), the rotary embedding as cos/sin tables for every position (built
by transformers' own rotary module, so every rope type it precomputes is exact). A step runs
every packed token through the layers with no per-module Python, attends over the paged cache
(attention.py), and computes the LM head only for the rows that sample.

Precision: the weights are in the model's dtype and the matrix products run in it; everything
between them (the residual stream, norms, rotary, attention, SiLU) is float32, as llama.cpp
keeps its activations, and so is the LM head. The KV cache has its own dtype
(precision.choose_kv_dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from serve_app.engine.attention import paged_attention

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


PACKED_MIN_ROWS = 4  # below this a plain (GEMV) product is faster than the packed one


class Projection:
    """x @ W.T (+ b). On a CPU with oneDNN, W is also kept packed in oneDNN's blocked layout, used
    from PACKED_MIN_ROWS rows up: MKL's plain sgemm repacks W on every call, which dominated the
    products of a decode step (32 rows x SmolLM2's 576 x 3072 gate/up: 1.9 ms plain, 0.6 ms packed,
    2 cores). The packed copy doubles the weights' memory."""

    __slots__ = ("bias", "packed", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool):
        self.weight = weight.detach().contiguous()
        self.bias = None if bias is None else bias.detach().contiguous()
        self.packed = None
        if pack:
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight)
            except (RuntimeError, AttributeError):  # a torch build without oneDNN: plain products
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] >= PACKED_MIN_ROWS:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def can_pack(dtype: torch.dtype, device: torch.device) -> bool:
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()


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

    def __init__(self, model, max_model_len: int):
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
        self.pack = can_pack(self.dtype, self.device)
        with torch.no_grad():
            self.embed = inner.embed_tokens.weight.detach()
            self.final_norm = inner.norm.weight.detach().float()
            # The LM head stays float32 whatever the weights' dtype: its products decide between
            # near-tied tokens. With bf16 weights, a bf16 head flipped 2.7% of SmolLM2's top-1 choices
            # on tests/data/precision_text.md; a float32 one 1.0% (tests/test_precision.py).
            self.lm_head = Projection(model.lm_head.weight.float(), None, self.pack)
            self.layers = [self._layer(layer) for layer in inner.layers]
            self.cos, self.sin = self._rope_tables(inner.rotary_emb, max_model_len)

    def _layer(self, layer) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp

        def bias(module):
            return None if module.bias is None else module.bias.detach()

        return LayerWeights(
            input_norm=layer.input_layernorm.weight.detach().float(),
            qkv=Projection(_cat(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight),
                           _cat(bias(attn.q_proj), bias(attn.k_proj), bias(attn.v_proj)), self.pack),
            o=Projection(attn.o_proj.weight, bias(attn.o_proj), self.pack),
            q_norm=attn.q_norm.weight.detach().float() if hasattr(attn, "q_norm") else None,
            k_norm=attn.k_norm.weight.detach().float() if hasattr(attn, "k_norm") else None,
            post_norm=layer.post_attention_layernorm.weight.detach().float(),
            gate_up=Projection(_cat(mlp.gate_proj.weight, mlp.up_proj.weight),
                               _cat(bias(mlp.gate_proj), bias(mlp.up_proj)), self.pack),
            down=Projection(mlp.down_proj.weight, bias(mlp.down_proj), self.pack),
        )

    def _rope_tables(self, rotary, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [length, 1, head_dim] in float32, exactly as transformers computes them."""
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        positions = torch.arange(length, device=self.device).unsqueeze(0)
        cos, sin = rotary(probe, positions)
        return cos[0].float().unsqueeze(1), sin[0].float().unsqueeze(1)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm in float32 (x is float32): transformers' LlamaRMSNorm, as one op."""
        return torch.rms_norm(x, weight.shape, weight, self.eps)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def forward(self, step) -> torch.Tensor:
        """Logits [rows, vocab] (float32) for the step's `logit_rows`."""
        T = step.input_ids.shape[0]
        dtype = self.dtype
        q_size = self.num_heads * self.head_dim
        cos = self.cos.index_select(0, step.positions)
        sin = self.sin.index_select(0, step.positions)
        x = F.embedding(step.input_ids, self.embed).float()  # the residual stream, float32
        for i, w in enumerate(self.layers):
            h = self._norm(x, w.input_norm).to(dtype)
            qkv = w.qkv(h).float().view(T, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
            qk, v = qkv.split([self.num_heads + self.num_kv_heads, self.num_kv_heads], dim=1)
            if w.q_norm is not None:
                q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
                qk = torch.cat((self._norm(q, w.q_norm), self._norm(k, w.k_norm)), dim=1)
            q, k = self._rotate(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
            o = paged_attention(q, k, v, i, step.layout, self.scale)
            x = x + w.o(o.view(T, q_size).to(dtype)).float()
            h = self._norm(x, w.post_norm).to(dtype)
            gate, up = w.gate_up(h).float().chunk(2, dim=-1)
            x = x + w.down((F.silu(gate) * up).to(dtype)).float()
        x = x.index_select(0, step.logit_rows)
        h = self._norm(x, self.final_norm).to(self.lm_head.weight.dtype)
        return self.lm_head(h).float()

"""Our own forward pass for the Llama family: Llama (1-3), Mistral, Qwen2, Qwen3.

The weights are those transformers loaded (config, safetensors, any dtype it supports),
rearranged once: q/k/v into one matrix and gate/up into another (one matrix product each
instead of three and two), the rotary embedding as cos/sin tables for every position (built
by transformers' own rotary module, so every rope type it precomputes is exact). A step runs
every packed token through the layers with no per-module Python, attends over the paged cache
(attention.py), and computes the LM head only for the rows that sample.

Precision: the weights are in the model's dtype; the residual stream and the norms stay in
float32 (as llama.cpp keeps its activations), so bfloat16 weights cost accuracy only inside
the matrix products.
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


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm of each head's query and key
    k_norm: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


def _cat(*tensors: torch.Tensor | None) -> torch.Tensor | None:
    return None if any(t is None for t in tensors) else torch.cat(tensors).contiguous()


class LlamaRunner:
    name = "native"

    def __init__(self, model, max_model_len: int):
        config = model.config
        self.config = config
        self.dtype = model.dtype
        self.device = next(model.parameters()).device
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        inner = model.model
        with torch.no_grad():
            self.embed = inner.embed_tokens.weight.detach()
            self.final_norm = inner.norm.weight.detach().float()
            self.lm_head = model.lm_head.weight.detach()
            self.layers = [self._layer(layer) for layer in inner.layers]
            self.cos, self.sin = self._rope_tables(inner.rotary_emb, max_model_len)

    def _layer(self, layer) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp

        def bias(module):
            return None if module.bias is None else module.bias.detach()

        return LayerWeights(
            input_norm=layer.input_layernorm.weight.detach().float(),
            qkv=_cat(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight),
            qkv_bias=_cat(bias(attn.q_proj), bias(attn.k_proj), bias(attn.v_proj)),
            o=attn.o_proj.weight.detach(),
            o_bias=bias(attn.o_proj),
            q_norm=attn.q_norm.weight.detach().float() if hasattr(attn, "q_norm") else None,
            k_norm=attn.k_norm.weight.detach().float() if hasattr(attn, "k_norm") else None,
            post_norm=layer.post_attention_layernorm.weight.detach().float(),
            gate_up=_cat(mlp.gate_proj.weight, mlp.up_proj.weight),
            down=mlp.down_proj.weight.detach(),
        )

    def _rope_tables(self, rotary, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [length, 1, head_dim] in float32, exactly as transformers computes them."""
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        positions = torch.arange(length, device=self.device).unsqueeze(0)
        cos, sin = rotary(probe, positions)
        return cos[0].float().unsqueeze(1), sin[0].float().unsqueeze(1)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm in float32 (x is float32), as transformers' LlamaRMSNorm."""
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def forward(self, step) -> torch.Tensor:
        """Logits [rows, vocab] (float32) for the step's `logit_rows`."""
        T = step.input_ids.shape[0]
        dtype = self.dtype
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        cos = step_cos = self.cos.index_select(0, step.positions)
        sin = self.sin.index_select(0, step.positions)
        if dtype != torch.float32:
            step_cos, sin = cos.to(dtype), sin.to(dtype)
        x = F.embedding(step.input_ids, self.embed).float()  # the residual stream, float32
        for i, w in enumerate(self.layers):
            h = self._norm(x, w.input_norm).to(dtype)
            qkv = F.linear(h, w.qkv, w.qkv_bias)
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(T, self.num_heads, self.head_dim)
            k = k.view(T, self.num_kv_heads, self.head_dim)
            v = v.view(T, self.num_kv_heads, self.head_dim)
            if w.q_norm is not None:
                q = self._norm(q.float(), w.q_norm).to(dtype)
                k = self._norm(k.float(), w.k_norm).to(dtype)
            q = self._rotate(q, step_cos, sin)
            k = self._rotate(k, step_cos, sin)
            o = paged_attention(q, k, v, i, step.layout, self.scale)
            x = x + F.linear(o.view(T, q_size), w.o, w.o_bias).float()
            h = self._norm(x, w.post_norm).to(dtype)
            gate, up = F.linear(h, w.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w.down).float()
        x = x.index_select(0, step.logit_rows)
        h = self._norm(x, self.final_norm).to(dtype)
        return F.linear(h, self.lm_head).float()

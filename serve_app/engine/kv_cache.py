"""The paged KV cache's memory: one preallocated tensor per layer for keys and one for values.

Each is `[num_blocks + 2, block_size, kv_heads, head_dim]`; which sequence holds which block
is the block manager's business (block_manager.py). A token at position p of a sequence lives
in slot `block_table[p // block_size] * block_size + p % block_size` of the flattened tensor
(`Sequence.slot_map`). Nothing is copied when a sequence joins, grows or leaves.
"""

from __future__ import annotations

import math

import torch


class KVCache:
    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int, dtype: torch.dtype, device: torch.device):
        self.block_size = block_size
        self.num_blocks = num_blocks
        # Two blocks past the end that no sequence holds: the padding target of batched reads
        # (always zero, never written), and the scratch block that the padding rows of a captured
        # decode step (decode_graphs.py) write into and read.
        self.pad_block = num_blocks
        self.scratch_block = num_blocks + 1
        shape = (num_blocks + 2, block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @classmethod
    def for_model(cls, model_config, num_tokens: int, block_size: int, dtype: torch.dtype,
                  device: torch.device) -> "KVCache":
        """Size the cache for a transformers config to hold `num_tokens` tokens."""
        heads = model_config.num_attention_heads
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
        return cls(num_layers=model_config.num_hidden_layers, num_kv_heads=kv_heads, head_dim=head_dim,
                   num_blocks=math.ceil(num_tokens / block_size), block_size=block_size, dtype=dtype,
                   device=device)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    @staticmethod
    def flat(tensor: torch.Tensor) -> torch.Tensor:
        """A layer's cache as `[slots, kv_heads, head_dim]` (a view), for writing by slot."""
        return tensor.view(-1, *tensor.shape[2:])

"""A paged KV cache: fixed-size blocks of token slots, preallocated and written in place.

Each layer's keys and values live in one tensor `[num_blocks + 1, block_size,
kv_heads, head_dim]` allocated once; a sequence owns a list of blocks (its
block table) and its token at position p lives in slot `block_table[p //
block_size] * block_size + p % block_size` of the flattened tensor. Nothing is copied when a sequence joins, grows or leaves:
admitting one takes blocks from the free list, finishing returns them.

Reading for attention gathers a sequence's blocks (`index_select` of whole
blocks: 2x faster than gathering token slots, measured), because there is no
paged attention kernel on CPU; on a GPU the same block tables are
what a paged kernel (flash-attn `block_table`) reads in place.
"""

from __future__ import annotations

import math

import torch


class KVCacheFull(Exception):
    """Not enough free blocks for the requested tokens."""


class PagedKVCache:
    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int, dtype: torch.dtype, device: torch.device):
        self.block_size = block_size
        self.num_blocks = num_blocks
        # One extra block past the end is the padding target of batched reads: always zero, never written.
        self.pad_block = num_blocks
        shape = (num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: reuse recent blocks first
        self._tables: dict[str, list[int]] = {}
        self._block_tables: dict[str, torch.Tensor] = {}
        self._first_slots: dict[str, int] = {}  # sequences whose blocks happen to be consecutive
        self._slot_maps: dict[str, torch.Tensor] = {}
        self._offsets = torch.arange(block_size, device=device)

    @classmethod
    def for_model(cls, model_config, num_tokens: int, block_size: int, dtype: torch.dtype,
                  device: torch.device) -> "PagedKVCache":
        """Size the cache for a transformers config to hold `num_tokens` tokens."""
        heads = model_config.num_attention_heads
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
        return cls(num_layers=model_config.num_hidden_layers, num_kv_heads=kv_heads, head_dim=head_dim,
                   num_blocks=math.ceil(num_tokens / block_size), block_size=block_size, dtype=dtype,
                   device=device)

    # ------------------------------------------------------------ blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def allocate(self, seq_id: str, num_tokens: int) -> None:
        """Reserve room for `num_tokens` tokens of a new sequence (all its blocks at once)."""
        needed = self.blocks_for(num_tokens)
        if needed > len(self._free):
            raise KVCacheFull(f"{needed} blocks needed, {len(self._free)} free")
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already holds blocks")
        table = [self._free.pop() for _ in range(needed)]
        self._tables[seq_id] = table
        blocks = torch.tensor(table, dtype=torch.long, device=self._offsets.device)
        self._block_tables[seq_id] = blocks
        if table == list(range(table[0], table[0] + needed)):
            self._first_slots[seq_id] = table[0] * self.block_size
        self._slot_maps[seq_id] = (blocks.unsqueeze(1) * self.block_size + self._offsets).flatten()

    def free(self, seq_id: str) -> None:
        """Return a sequence's blocks (no-op for a sequence that holds none)."""
        self._free.extend(reversed(self._tables.pop(seq_id, [])))
        self._block_tables.pop(seq_id, None)
        self._first_slots.pop(seq_id, None)
        self._slot_maps.pop(seq_id, None)

    # ------------------------------------------------------------ slots

    def slots(self, seq_id: str, start: int, end: int) -> torch.Tensor:
        """Physical slots of positions [start, end) of a sequence (a view, no copy)."""
        return self._slot_maps[seq_id][start:end]

    def first_slot(self, seq_id: str) -> int | None:
        """Where a sequence starts if its blocks are consecutive (then its keys are one slice of
        the flat cache, read without a gather), else None."""
        return self._first_slots.get(seq_id)

    def blocks(self, seq_id: str, num_tokens: int) -> torch.Tensor:
        """The blocks holding a sequence's first `num_tokens` positions."""
        return self._block_tables[seq_id][:self.blocks_for(num_tokens)]

    def flat(self, tensor: torch.Tensor) -> torch.Tensor:
        """A layer's cache as `[slots, kv_heads, head_dim]` (a view), for writing by slot."""
        return tensor.view(-1, *tensor.shape[2:])

    @property
    def num_sequences(self) -> int:
        return len(self._tables)

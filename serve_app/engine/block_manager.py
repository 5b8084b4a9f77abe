"""The KV cache's blocks: who holds which, and which hold a reusable prefix.

The cache is `num_blocks` blocks of `block_size` token slots (the tensors live in
`kv_cache.KVCache`). A sequence holds a block table, a list of block ids covering every
position it may reach: all of it is reserved when the sequence is admitted (prompt +
max_tokens), so a running sequence never runs out of memory and nothing is preempted.

Prefix caching (vLLM's automatic prefix caching, in nano-vllm's shape): a full block is named
by a hash chain of its tokens (`prefix_hash`). An arriving prompt takes, block by block, the
longest chain of blocks already in the cache and prefills only the rest. Blocks are reference
counted; when the last holder leaves, a full block whose keys are written stays cached on an
LRU list and is evicted only when a new block is needed, so cached blocks never make a
request wait that an empty cache would admit.

A prompt's blocks are registered when it is admitted, before they are computed: a sequence
with the same prefix arriving meanwhile (another choice of the same prompt, another user with
the same system prompt) shares them and waits for their writer instead of computing them
again. Each block has one writer (`owner`); no other sequence ever writes a shared block.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from serve_app.engine.prefix_hash import extend_hashes
from serve_app.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    id: int
    ref_count: int = 0
    hash: bytes | None = None  # set while the block is in the prefix cache's index
    computed: bool = False  # every slot holds its token's keys/values
    owner: str | None = None  # the sequence that writes it; None: its writer left, a holder takes over


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 device: torch.device | str = "cpu"):
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # nothing cached: reuse recent first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free, but holding a cached prefix; LRU first
        self._by_hash: dict[bytes, int] = {}
        self.queries = 0  # prompt tokens of admitted sequences
        self.hits = 0  # of them, served from the cache

    # ------------------------------------------------------------ capacity

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new sequence may take (cached ones are evicted for it when needed)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks in the prefix cache's index (held by a sequence or not)."""
        return len(self._by_hash)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    # ------------------------------------------------------------ admission and release

    def allocate(self, seq: Sequence) -> bool:
        """Give a sequence blocks for its whole length, sharing the longest cached prefix of its
        prompt; False (nothing taken) when the free blocks do not suffice."""
        needed = self.blocks_for(seq.max_len)
        matched = self._match(seq)
        revived = sum(1 for b in matched if self.blocks[b].ref_count == 0)  # leave the free pool as shared
        if needed - len(matched) > self.num_free_blocks - revived:
            return False
        for b in matched:
            block = self.blocks[b]
            if block.ref_count == 0:
                del self._evictable[b]
            block.ref_count += 1
        fresh = [self._take() for _ in range(needed - len(matched))]
        for b in fresh:
            block = self.blocks[b]
            block.ref_count, block.owner, block.computed = 1, seq.request_id, False
        seq.set_block_table(matched + fresh, self.block_size, self.device)
        if self.enable_prefix_caching:
            # Index the prompt's full blocks now: sequences arriving while they are computed share them.
            for i in range(len(matched), len(seq.block_hashes)):
                self._register(self.blocks[seq.block_table[i]], seq.block_hashes[i])
        seq.num_cached_prompt = len(matched) * self.block_size
        self.queries += seq.prompt_len
        self.hits += seq.num_cached_prompt
        self.skip_computed(seq)
        return True

    def free(self, seq: Sequence) -> None:
        """Return a finished or cancelled sequence's blocks (tail first: the end of a sequence is
        the least likely part to be shared, so it is evicted first)."""
        for b in reversed(seq.block_table):
            block = self.blocks[b]
            block.ref_count -= 1
            if block.owner == seq.request_id:
                block.owner = None
            if block.ref_count == 0:
                if block.hash is not None and block.computed:
                    self._evictable[b] = None
                else:
                    self._unregister(block)
                    block.computed = False
                    self._free.append(b)
        seq.set_block_table([], self.block_size)

    # ------------------------------------------------------------ prefill progress

    def skip_computed(self, seq: Sequence) -> None:
        """Advance a prefilling sequence over the shared blocks other sequences have written."""
        bs, table = self.block_size, seq.block_table
        while seq.num_cached % bs == 0 and seq.num_cached // bs < len(table):
            block = self.blocks[table[seq.num_cached // bs]]
            if not block.computed:
                return
            seq.num_cached += bs
            seq.num_computed_blocks = seq.num_cached // bs

    def writable_end(self, seq: Sequence, want: int) -> int:
        """The position up to which a prefilling sequence may compute its prompt now (at most
        `want` tokens): it stops at a shared block that another sequence is writing."""
        bs, table = self.block_size, seq.block_table
        end = min(seq.prompt_len, seq.num_cached + want)
        i = seq.num_cached // bs
        while i * bs < end:
            block = self.blocks[table[i]]
            if block.owner is None and not block.computed:
                block.owner = seq.request_id  # its writer left: this holder writes it
            if block.owner != seq.request_id:
                return max(seq.num_cached, i * bs)
            i += 1
        return end

    def mark_computed(self, seq: Sequence) -> None:
        """After a step: the blocks this sequence has filled become readable by others, and
        full blocks of its output join the prefix cache (a later turn of a chat repeats them)."""
        full = seq.num_cached // self.block_size
        if full <= seq.num_computed_blocks:
            return
        if self.enable_prefix_caching and len(seq.block_hashes) < full:
            extend_hashes(seq.block_hashes, seq.token_ids(full * self.block_size), self.block_size,
                          seq.cache_salt, full * self.block_size)
        for i in range(seq.num_computed_blocks, full):
            block = self.blocks[seq.block_table[i]]
            if block.owner == seq.request_id and not block.computed:
                block.computed = True
                if self.enable_prefix_caching and block.hash is None:
                    self._register(block, seq.block_hashes[i])
        seq.num_computed_blocks = full

    # ------------------------------------------------------------ internals

    def _match(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the start of the prompt. At least the prompt's last token is
        always computed (its logits start the output), so a block ending there never matches."""
        if not self.enable_prefix_caching:
            return []
        matched = []
        for h in seq.block_hashes[:(seq.prompt_len - 1) // self.block_size]:
            b = self._by_hash.get(h)
            if b is None:
                break
            matched.append(b)
        return matched

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        b, _ = self._evictable.popitem(last=False)  # the least recently used cached block
        block = self.blocks[b]
        self._unregister(block)
        block.computed = False
        return b

    def _register(self, block: Block, h: bytes) -> None:
        if h not in self._by_hash:  # an equal block already indexed stays the one to share
            self._by_hash[h] = block.id
            block.hash = h

    def _unregister(self, block: Block) -> None:
        if block.hash is not None:
            if self._by_hash.get(block.hash) == block.id:
                del self._by_hash[block.hash]
            block.hash = None

    def check_invariants(self, sequences: list[Sequence]) -> None:
        """Every block is free, cached or held, exactly once (tests call this)."""
        held: dict[int, int] = {}
        for seq in sequences:
            for b in seq.block_table:
                held[b] = held.get(b, 0) + 1
        for block in self.blocks:
            assert block.ref_count == held.get(block.id, 0), (block, held.get(block.id))
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not free & evictable
        assert all(self.blocks[b].ref_count == 0 for b in free | evictable)
        assert len(free) + len(evictable) + len(held) == self.num_blocks
        for h, b in self._by_hash.items():
            assert self.blocks[b].hash == h

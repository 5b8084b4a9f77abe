"""Attention over the paged KV cache for one packed step (decode rows + prompt chunks).

Every token of a step is packed into one row of T tokens. Per layer, the new keys and
values are written into the cache at their slots, then each segment of the step attends to
its own sequence's keys:

- `DecodeRows` are all the sequences decoding one token each, attended by a compiled kernel
  that reads their blocks in place (cpu_kernels.py) where it exists; elsewhere
- a `DecodeGroup` is many decoding sequences attended as one batched SDPA call over their
  gathered, padded keys. Rows are grouped by length so one long sequence does not make every
  row gather its length;
- a `PrefillChunk` is consecutive tokens of one sequence (a prompt chunk, or a decoding
  row's last token + its speculative draft), causal over its cached past and itself.

What does not depend on the layer (slots, masks, which blocks to read) is computed once per
step into an `AttentionLayout`. There is no paged kernel for the CPU: a sequence's blocks are
gathered (`index_select` of whole blocks), or read as one slice when they are consecutive.
The model runners (model_runner.py) call `paged_attention` once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from serve_app.engine import cpu_kernels
from serve_app.engine.kv_cache import KVCache
from serve_app.engine.sequence import Sequence


# torch's CPU flash attention splits the queries of a head into blocks of 32 rows below 192 rows
# (64 below 768, 256 above) and runs a task per (head, block). For a prompt chunk of fewer than
# STACK_BELOW_ROWS tokens, a KV head's query heads go in as one head with `groups` x the rows: the
# same result in bigger blocks, reading the keys once per KV head. SmolLM2 (9 query / 3 KV heads),
# 2 cores, engine step with a 128-token chunk after 2,000 cached positions: 577 -> 433 ms; at 192
# tokens (64-row blocks either way) stacking was slower, 598 -> 681 ms.
STACK_BELOW_ROWS = 192


@dataclass(slots=True)
class DecodeRows:
    start: int
    size: int  # sequences (one token each)
    block_tables: torch.Tensor  # [size, blocks] int64
    lens: torch.Tensor  # [size] int64: positions each attends to (this step's token included)


@dataclass(slots=True)
class DecodeGroup:
    start: int  # first packed token of the group
    size: int  # sequences (one token each)
    read_blocks: torch.Tensor | None  # [size * blocks] cache blocks, padded with the cache's pad block
    mask: torch.Tensor | None  # [size, 1, 1, blocks * block_size] bool, True = attend
    read_span: tuple[int, int] | None = None  # one sequence in consecutive slots: read them as a view


@dataclass(slots=True)
class PrefillChunk:
    start: int
    size: int  # tokens
    read_blocks: torch.Tensor | None  # the blocks of past + these tokens; None when there is no past
    mask: torch.Tensor | None  # [size, keys] lower-right causal; None when there is no past
    read_span: tuple[int, int] | None = None  # past + these tokens in consecutive slots


@dataclass
class AttentionLayout:
    cache: KVCache
    write_slots: torch.Tensor  # [T]: where each packed token's keys/values go
    segments: list[DecodeRows | DecodeGroup | PrefillChunk] = field(default_factory=list)


def decode_rows(cache: KVCache, start: int, seqs: list[Sequence]) -> DecodeRows:
    """Every decoding sequence, for the paged kernel."""
    lengths = [s.total_len for s in seqs]
    tables = torch.nn.utils.rnn.pad_sequence(
        [s.block_table_tensor[:cache.blocks_for(n)] for s, n in zip(seqs, lengths)], batch_first=True)
    return DecodeRows(start, len(seqs), tables, torch.tensor(lengths, dtype=torch.long))


def use_decode_kernel(cache: KVCache, query_dtype: torch.dtype) -> bool:
    return cpu_kernels.supports(query_dtype, cache.keys[0].dtype, cache.keys[0].device)


def decode_group(cache: KVCache, start: int, seqs: list[Sequence]) -> DecodeGroup:
    """A group of decoding sequences; each attends to its total_len positions (this step's token included)."""
    lengths = [s.total_len for s in seqs]
    size = len(seqs)
    if size == 1 and seqs[0].first_slot is not None:  # its keys as one slice: no gather, no mask
        first = seqs[0].first_slot
        return DecodeGroup(start, 1, None, None, (first, first + lengths[0]))
    device = cache.keys[0].device
    width = cache.blocks_for(max(lengths))
    read = torch.full((size, width), cache.pad_block, dtype=torch.long, device=device)
    for row, (seq, n) in enumerate(zip(seqs, lengths)):
        blocks = seq.block_table_tensor[:cache.blocks_for(n)]
        read[row, :len(blocks)] = blocks
    lens = torch.tensor(lengths, device=device)
    keys = width * cache.block_size
    mask = (torch.arange(keys, device=device) < lens.unsqueeze(1)).view(size, 1, 1, keys)
    return DecodeGroup(start, size, read.view(-1), mask)


def prefill_chunk(cache: KVCache, start: int, seq: Sequence, past: int, size: int) -> PrefillChunk:
    """`size` tokens of a sequence from position `past`, attending causally to everything before."""
    if past == 0:
        return PrefillChunk(start, size, None, None)
    device = cache.keys[0].device
    if seq.first_slot is not None:
        mask = torch.ones(size, past + size, dtype=torch.bool, device=device).tril(past)
        return PrefillChunk(start, size, None, mask, (seq.first_slot, seq.first_slot + past + size))
    blocks = seq.block_table_tensor[:cache.blocks_for(past + size)]
    keys = len(blocks) * cache.block_size
    # Row i (position past + i) sees positions <= past + i; the blocks' unused tail stays masked.
    mask = torch.ones(size, keys, dtype=torch.bool, device=device).tril(past)
    return PrefillChunk(start, size, blocks, mask)


def group_by_length(lengths: list[int], max_waste: float = 0.5) -> list[list[int]]:
    """Split indices (sorted longest first) into groups whose rows are at least
    `max_waste` of the group's longest, bounding the padding each group reads."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] >= max_waste * lengths[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def paged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer: int,
                    layout: AttentionLayout, scale: float | None = None) -> torch.Tensor:
    """query [T, Hq, D], key/value [T, Hkv, D] (rotary applied) -> [T, Hq, D].
    Writes this layer's new keys and values into the cache first."""
    cache = layout.cache
    k_cache, v_cache = cache.keys[layer], cache.values[layer]
    cache.flat(k_cache).index_copy_(0, layout.write_slots, key.to(k_cache.dtype))
    cache.flat(v_cache).index_copy_(0, layout.write_slots, value.to(v_cache.dtype))
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    out = query.new_empty(query.shape)

    def gather(seg, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The segment's keys and values as [rows, Hkv, keys, D] in the query's dtype."""
        if seg.read_span is not None:  # consecutive slots: a slice of the flat cache, no copy
            a, b = seg.read_span
            k = cache.flat(k_cache)[a:b].unsqueeze(0).transpose(1, 2)
            v = cache.flat(v_cache)[a:b].unsqueeze(0).transpose(1, 2)
        else:  # [rows * blocks, block_size, Hkv, D] -> [rows, Hkv, keys, D]
            k = k_cache.index_select(0, seg.read_blocks).view(rows, -1, kv_heads, head_dim).transpose(1, 2)
            v = v_cache.index_select(0, seg.read_blocks).view(rows, -1, kv_heads, head_dim).transpose(1, 2)
        return k.to(query.dtype), v.to(query.dtype)

    for seg in layout.segments:
        end = seg.start + seg.size
        if isinstance(seg, DecodeRows):
            cpu_kernels.paged_decode_attention(query[seg.start:end].contiguous(), k_cache, v_cache,
                                               seg.block_tables, seg.lens, out[seg.start:end],
                                               scale if scale is not None else head_dim ** -0.5)
        elif isinstance(seg, DecodeGroup):
            k, v = gather(seg, seg.size)
            # One query token per row: the query heads sharing a KV head are attended as that
            # head's queries, [n, Hkv, Hq/Hkv, D] (head h reads KV head h // group, as
            # transformers' repeat_kv). Same result as enable_gqa, without repeating the keys.
            q = query[seg.start:end].reshape(seg.size, kv_heads, -1, head_dim)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=seg.mask, scale=scale)
            out[seg.start:end] = o.reshape(seg.size, -1, head_dim)
        else:
            q = query[seg.start:end].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
            if seg.mask is None:  # no past: the chunk attends causally to itself
                k = key[seg.start:end].transpose(0, 1).unsqueeze(0)
                v = value[seg.start:end].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            else:
                k, v = gather(seg, 1)
                groups = query.shape[1] // kv_heads
                if groups > 1 and query.device.type == "cpu" and seg.size < STACK_BELOW_ROWS:
                    # The query heads of a KV head as one head with groups x more rows, head h =
                    # kv head h // groups (transformers' repeat_kv): same result, bigger query blocks.
                    q = query[seg.start:end].view(seg.size, kv_heads, groups, head_dim).permute(1, 2, 0, 3)
                    o = F.scaled_dot_product_attention(q.reshape(1, kv_heads, groups * seg.size, head_dim), k, v,
                                                       attn_mask=seg.mask.repeat(groups, 1), scale=scale)
                    out[seg.start:end] = o.view(kv_heads, groups, seg.size, head_dim).permute(2, 0, 1, 3).reshape(
                        seg.size, -1, head_dim)
                    continue
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=seg.mask, scale=scale, enable_gqa=True)
            out[seg.start:end] = o[0].transpose(0, 1)
    return out

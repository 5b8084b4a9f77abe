"""Attention over the paged KV cache for one packed step (decode rows + prompt chunks).

Every token of a step is packed into one row of T tokens. Per layer, the new keys and
values are written into the cache at their slots, then each segment of the step attends to
its own sequence's keys:

- `DecodeRows` are all the sequences decoding one token each. On a CPU a compiled kernel reads
  their blocks in place (cpu_kernels.py); elsewhere (a GPU, a CPU without a compiler)
  `paged_decode` gathers each row's blocks by its block table and attends with one masked SDPA
  call per group of rows of similar length (so one long sequence does not make every row
  gather its length). Within a CUDA graph (decode_graphs.py) it is one call over all rows:
  its shapes depend only on the rows and the tables' width;
- a `PrefillChunk` is consecutive tokens of one sequence (a prompt chunk, or a decoding
  row's last token + its speculative draft), causal over its cached past and itself, its
  blocks gathered (`index_select` of whole blocks) or read as one slice when consecutive.

What does not depend on the layer (slots, masks, which blocks to read, groups) is computed once
per step into an `AttentionLayout`. Runners call `paged_attention` once per layer (the graphed
decode forward calls `write_kv` and `paged_decode` itself).
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
    lengths: list[int]  # the same, on the host
    # rows of similar length (index into the rows, None: all of them) and the blocks they read,
    # for paged_decode outside a graph; computed at the first layer that needs them
    groups: list[tuple[torch.Tensor | None, int]] | None = None

    def length_groups(self, block_size: int) -> list[tuple[torch.Tensor | None, int]]:
        if self.groups is None:
            groups = group_by_length(self.lengths)
            self.groups = [(None, self.block_tables.shape[1])] if len(groups) == 1 else [
                (torch.tensor(rows, device=self.lens.device), -(-self.lengths[rows[0]] // block_size))
                for rows in groups]  # longest first in each group
        return self.groups


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
    segments: list[DecodeRows | PrefillChunk] = field(default_factory=list)


def decode_rows(cache: KVCache, start: int, seqs: list[Sequence]) -> DecodeRows:
    """Every decoding sequence: its block table (padded with block 0: masked) and length."""
    lengths = [s.total_len for s in seqs]
    tables = torch.nn.utils.rnn.pad_sequence(
        [s.block_table_tensor[:cache.blocks_for(n)] for s, n in zip(seqs, lengths)], batch_first=True)
    lens = torch.tensor(lengths, dtype=torch.long, device=tables.device)
    return DecodeRows(start, len(seqs), tables, lens, lengths)


def use_decode_kernel(cache: KVCache, query_dtype: torch.dtype) -> bool:
    return cpu_kernels.supports(query_dtype, cache.keys[0].dtype, cache.keys[0].device)


def write_kv(cache: KVCache, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Store a layer's new keys and values [T, Hkv, D] at their slots."""
    k_cache, v_cache = cache.keys[layer], cache.values[layer]
    cache.flat(k_cache).index_copy_(0, slots, key.to(k_cache.dtype))
    cache.flat(v_cache).index_copy_(0, slots, value.to(v_cache.dtype))


def _decode_sdpa(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 scale: float | None) -> torch.Tensor:
    """One query token per row, query [n, Hq, D], keys/values [n, Hkv, keys, D] -> [n, Hq, D].
    The query heads sharing a KV head are attended as that head's queries, [n, Hkv, Hq/Hkv, D]
    (head h reads KV head h // group, as transformers' repeat_kv): the result of enable_gqa,
    without repeating the keys."""
    rows, kv_heads, head_dim = k.shape[0], k.shape[1], k.shape[3]
    q = query.reshape(rows, kv_heads, -1, head_dim)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).reshape(rows, -1, head_dim)


def gpu_attention_dtype(query: torch.Tensor, cache: torch.Tensor) -> torch.dtype:
    """What GPU decode attention computes in: a 16-bit cache's own dtype (SDPA's kernels sum in
    float32; no widened copy of the gathered keys), else the query's."""
    return cache.dtype if query.device.type == "cuda" and cache.element_size() == 2 else query.dtype


def paged_decode(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                 lens: torch.Tensor, scale: float | None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Decoding rows attended over their block tables in torch: query [n, Hq, D], tables [n, W]
    (row i reads the first lens[i] positions; the rest of its W blocks may be any block, masked),
    the cache layer's keys and values [blocks, block_size, Hkv, D] -> [n, Hq, D] in the query's
    dtype, computed in `dtype` (default: the query's). Shapes depend only on n and W and nothing
    is read back to the host: a CUDA graph can capture it."""
    rows, width = tables.shape
    _, block_size, kv_heads, head_dim = k_cache.shape
    keys = width * block_size
    dtype = dtype or query.dtype
    index = tables.reshape(-1)
    k = k_cache.index_select(0, index).view(rows, keys, kv_heads, head_dim).transpose(1, 2).to(dtype)
    v = v_cache.index_select(0, index).view(rows, keys, kv_heads, head_dim).transpose(1, 2).to(dtype)
    mask = (torch.arange(keys, device=query.device) < lens.unsqueeze(1)).view(rows, 1, 1, keys)
    return _decode_sdpa(query.to(dtype), k, v, mask, scale).to(query.dtype)


def paged_decode_by_length(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seg: DecodeRows,
                           scale: float | None) -> torch.Tensor:
    """paged_decode outside a graph: each group of rows of similar length reads only its longest
    row's blocks."""
    dtype = gpu_attention_dtype(query, k_cache)
    groups = seg.length_groups(k_cache.shape[1])
    if groups[0][0] is None:
        return paged_decode(query, k_cache, v_cache, seg.block_tables, seg.lens, scale, dtype)
    out = torch.empty_like(query)
    for index, width in groups:
        out[index] = paged_decode(query[index], k_cache, v_cache, seg.block_tables[index, :width], seg.lens[index],
                                  scale, dtype)
    return out


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
    write_kv(cache, layer, layout.write_slots, key, value)
    k_cache, v_cache = cache.keys[layer], cache.values[layer]
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    out = query.new_empty(query.shape)

    def gather(seg: PrefillChunk) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's past and own keys and values as [1, Hkv, keys, D] in the query's dtype."""
        if seg.read_span is not None:  # consecutive slots: a slice of the flat cache, no copy
            a, b = seg.read_span
            k, v = cache.flat(k_cache)[a:b], cache.flat(v_cache)[a:b]
        else:  # [blocks, block_size, Hkv, D] -> [keys, Hkv, D]
            k = k_cache.index_select(0, seg.read_blocks).view(-1, kv_heads, head_dim)
            v = v_cache.index_select(0, seg.read_blocks).view(-1, kv_heads, head_dim)
        return k.unsqueeze(0).transpose(1, 2).to(query.dtype), v.unsqueeze(0).transpose(1, 2).to(query.dtype)

    for seg in layout.segments:
        end = seg.start + seg.size
        if isinstance(seg, DecodeRows):
            if use_decode_kernel(cache, query.dtype):
                cpu_kernels.paged_decode_attention(query[seg.start:end].contiguous(), k_cache, v_cache,
                                                   seg.block_tables, seg.lens, out[seg.start:end],
                                                   scale if scale is not None else head_dim ** -0.5)
            else:
                out[seg.start:end] = paged_decode_by_length(query[seg.start:end], k_cache, v_cache, seg, scale)
        else:
            q = query[seg.start:end].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
            if seg.mask is None:  # no past: the chunk attends causally to itself
                k = key[seg.start:end].transpose(0, 1).unsqueeze(0)
                v = value[seg.start:end].transpose(0, 1).unsqueeze(0)
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            else:
                k, v = gather(seg)
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

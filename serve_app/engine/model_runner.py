"""One step's forward pass: the scheduled work packed into one row of tokens, run by a model runner.

`pack_step` turns a `ScheduledStep` into the runner's inputs: token ids and positions of every
token of the step (decode rows, prompt chunks, drafted rows), where their keys and values go,
the attention layout, and which rows need logits (only those that sample this step). A runner
maps that to logits `[rows, vocab]`:

- `LlamaRunner` (llama.py): our own forward for the Llama family (Llama, Mistral, Qwen2,
  Qwen3), weights fused, rotary from precomputed tables;
- `TransformersRunner`: transformers' own module for every other architecture, with our
  paged attention registered as its attention function.

Both read and write the same paged cache through `attention.paged_attention`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from serve_app.engine.attention import (
    AttentionLayout,
    decode_rows,
    paged_attention,
    prefill_chunk,
    use_decode_kernel,
)
from serve_app.engine.kv_cache import KVCache
from serve_app.engine.scheduler import ScheduledStep
from serve_app.engine.sequence import Sequence

logger = logging.getLogger(__name__)

ATTENTION_NAME = "serve_app_paged"


@dataclass
class PackedStep:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    layout: AttentionLayout
    logit_rows: torch.Tensor  # [R]: packed tokens whose logits are needed, in this order:
    sampled: list[Sequence]  # one row per sequence that samples a token this step, then
    num_draft_rows: int  # 1 + k rows per drafted sequence (plan.drafts order)
    # [T, W] each token's block table, when every token's attention is small enough for the fused
    # CPU forward (llama_forward.c: token t attends to its table's first positions[t] + 1 slots)
    token_tables: torch.Tensor | None = None


# The fused CPU forward attends token by token (no matrix products), so a prompt chunk of n tokens
# after p cached ones goes there only while n * (p + n) is at most this: a 128-token prompt, or a
# draft of 4 after 6,000 positions. Longer chunks attend through SDPA, a layer at a time.
FUSED_MAX_CHUNK_WORK = 32768


def token_tables(cache: KVCache, layout: AttentionLayout, plan: ScheduledStep, num_tokens: int) -> torch.Tensor | None:
    """Each packed token's block table (pack_step's order: decode rows, prompt chunks, drafts), or
    None when some chunk's attention is too large for the fused forward."""
    chunks = [(seq, seq.num_cached, n) for seq, n in plan.prefills] + \
        [(seq, seq.total_len - 1, 1 + len(draft)) for seq, draft in plan.drafts]
    if any(n * (past + n) > FUSED_MAX_CHUNK_WORK for _, past, n in chunks):
        return None
    parts = [(n, seq.block_table_tensor[:cache.blocks_for(past + n)]) for seq, past, n in chunks]
    decode_tables = layout.segments[0].block_tables if plan.decodes else None
    width = max([len(t) for _, t in parts] + ([decode_tables.shape[1]] if decode_tables is not None else []))
    tables = torch.zeros(num_tokens, width, dtype=torch.long)
    row = 0
    if decode_tables is not None:
        tables[:len(plan.decodes), :decode_tables.shape[1]] = decode_tables
        row = len(plan.decodes)
    for n, table in parts:
        tables[row:row + n, :len(table)] = table
        row += n
    return tables


def pack_step(plan: ScheduledStep, cache: KVCache, device: torch.device, dtype: torch.dtype) -> PackedStep:
    """The step's inputs for a runner computing in `dtype` over `cache`."""
    tokens: list[int] = []
    positions: list[int] = []
    writes: list[torch.Tensor] = []
    layout = AttentionLayout(cache, torch.empty(0))
    sampled: list[Sequence] = []
    logit_rows: list[int] = []
    decodes = plan.decodes
    kernel = use_decode_kernel(cache, dtype)
    if decodes:  # one segment for every decoding row
        layout.segments.append(decode_rows(cache, 0, decodes))
    for seq in decodes:
        pos = seq.total_len - 1  # the last sampled token enters the cache now
        logit_rows.append(len(tokens))
        tokens.append(seq.output_ids[-1])
        positions.append(pos)
        writes.append(seq.slot_map[pos:pos + 1])
        sampled.append(seq)
    for seq, n in plan.prefills:
        past = seq.num_cached
        layout.segments.append(prefill_chunk(cache, len(tokens), seq, past, n))
        tokens += seq.prompt_ids[past:past + n]
        positions += range(past, past + n)
        writes.append(seq.slot_map[past:past + n])
        if past + n == seq.prompt_len:  # the prompt is complete: its last position predicts
            logit_rows.append(len(tokens) - 1)
            sampled.append(seq)
    draft_rows = 0
    for seq, draft in plan.drafts:  # its last token + the draft, causal over its cached past
        past, n = seq.total_len - 1, 1 + len(draft)
        layout.segments.append(prefill_chunk(cache, len(tokens), seq, past, n))
        logit_rows += range(len(tokens), len(tokens) + n)
        draft_rows += n
        tokens += [seq.output_ids[-1], *draft]
        positions += range(past, past + n)
        writes.append(seq.slot_map[past:past + n])
    layout.write_slots = torch.cat(writes)
    return PackedStep(
        token_tables=token_tables(cache, layout, plan, len(tokens)) if kernel and device.type == "cpu" else None,
        input_ids=torch.tensor(tokens, device=device),
        positions=torch.tensor(positions, device=device),
        layout=layout,
        logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=device),
        sampled=sampled,
        num_draft_rows=draft_rows,
    )


class TransformersRunner:
    """Any transformers causal LM, run as one packed row with our paged attention."""

    name = "transformers"

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.dtype = model.dtype
        self.attention_dtype = model.dtype
        self.device = next(model.parameters()).device
        model.set_attn_implementation(ATTENTION_NAME)

    @torch.inference_mode()
    def forward(self, step: PackedStep) -> torch.Tensor:
        out = self.model(
            input_ids=step.input_ids.unsqueeze(0),
            position_ids=step.positions.unsqueeze(0),
            # Already "prepared": transformers passes a 4-D mask through untouched; ours is in the layout.
            attention_mask=torch.empty(1, 1, 0, 0, device=self.device),
            use_cache=False,
            logits_to_keep=step.logit_rows,
            attention_layout=step.layout,
        )
        return out.logits[0]


def _transformers_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask=None, scaling: float | None = None, dropout: float = 0.0,
                            attention_layout: AttentionLayout | None = None, **kwargs):
    """transformers' attention interface: query [1, Hq, T, D], key/value [1, Hkv, T, D] -> [1, T, Hq, D]."""
    if attention_layout is None:  # an ordinary forward (e.g. `generate`) on a model the engine uses
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    out = paged_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                          module.layer_idx, attention_layout, scaling)
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, _transformers_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # for the ordinary-forward fallback


def build_runner(model, max_model_len: int, runner: str = "auto", graph_rows: int = 0):
    """Our own forward for the Llama family, transformers' module for the rest (or when asked).
    graph_rows: decode steps of up to this many rows replay CUDA graphs (native runner, GPU)."""
    from serve_app.engine.llama import LlamaRunner, unsupported_reason

    if runner == "transformers":
        return TransformersRunner(model)
    reason = unsupported_reason(model.config, max_model_len)
    if reason is None:
        return LlamaRunner(model, max_model_len, graph_rows)
    if runner == "native":
        raise ValueError(f"runner: native does not support this model: {reason}")
    logger.info("model runner: transformers (%s)", reason)
    return TransformersRunner(model)


def weights_per_token(model) -> int:
    """The weights each token is multiplied by: every parameter but the input and output
    embeddings (a lookup, and the LM head runs only for the rows that sample)."""
    skip = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    head = model.get_output_embeddings()
    if head is not None:
        skip |= {id(p) for p in head.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)

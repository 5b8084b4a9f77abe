"""Which tokens run in the next engine step: token-budget scheduling with chunked prefill.

Every step has a budget of `max_num_batched_tokens`. Sequences that are
decoding take one token each, every step, first. What is left goes to
prompts: those already being prefilled continue, then waiting sequences are
admitted (in arrival order) while a row is free and the KV cache can hold
their whole length; a prompt longer than what is left is prefilled in chunks
over several steps. So no prompt, however long, stalls the decoding rows, and
no sequence is admitted that could later run out of KV memory (no preemption).
While sequences are decoding, a chunk deep into a long prompt is charged for its attention
as well (`chunk_cost`), so such a step silences their streams no longer than one that
prefills a prompt's start.
A prompt whose start is in the prefix cache prefills only the rest; one whose
start another sequence is computing right now waits for it (block_manager.py).

When only a few sequences are decoding and no prompt is waiting, the step's spare
budget goes to speculative drafts (speculation.py): a row with a draft of k tokens
takes k + 1 tokens of the budget and may advance by up to k + 1 tokens.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from serve_app.engine.block_manager import BlockManager
from serve_app.engine.sequence import Sequence


MIN_PREFILL = 16  # prompt tokens a step may always take, however long steps run


def attention_horizon(weights_per_token: int, config) -> float | None:
    """After how many cached positions a prompt token's attention costs as much arithmetic as
    its matrix products: those are 2 FLOPs per weight (embeddings aside), attention is 4 per
    query head, head dimension and layer for each position it attends to (scores and values).
    SmolLM2-135M: ~3,070 positions; Llama-3-8B: ~27,000. None when the config does not say."""
    heads = getattr(config, "num_attention_heads", None)
    layers = getattr(config, "num_hidden_layers", None)
    if not heads or not layers or not weights_per_token:
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * weights_per_token / (4 * heads * head_dim * layers)


def chunk_cost(past: int, horizon: float | None) -> float:
    """Budget tokens one prompt token costs after `past` cached positions (1 at the start)."""
    return 1.0 + past / horizon if horizon else 1.0


@dataclass
class ScheduledStep:
    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, prompt tokens this step)
    drafts: list[tuple[Sequence, list[int]]] = field(default_factory=list)  # decoding rows with a draft to check

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills) + sum(1 + len(d) for _, d in self.drafts)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills or self.drafts)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 num_speculative_tokens: int, speculative_max_rows: int, attention_horizon: float | None = None):
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be at least "
                             f"max_num_seqs ({max_num_seqs}): every running sequence decodes each step")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # What this step may use, <= max_num_batched_tokens: the engine lowers it when steps
        # run long (see BatchEngine.step_time_target_s). Prompts always get MIN_PREFILL tokens.
        self.token_budget = max_num_batched_tokens
        # Drafts pay off while a step is bound by reading the weights, i.e. at few rows; beyond
        # that every drafted token is real compute (see AppArgs.speculative_max_rows).
        self.num_speculative_tokens = num_speculative_tokens
        self.speculative_max_rows = speculative_max_rows
        # While rows decode, a chunk after p cached positions is charged chunk_cost(p) per token:
        # the step's time, which is the silence of every stream in it, stays near that of a chunk
        # at a prompt's start (measured on 2 CPU cores: a 256-token chunk after ~2,000 positions
        # took 1.05 s, at the start 0.65 s). With nobody decoding, prompts take the full budget.
        self.attention_horizon = attention_horizon
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admitted: holds KV blocks, prefilling or decoding

    def add(self, seq: Sequence) -> None:
        if self.blocks.blocks_for(seq.max_len) > self.blocks.num_blocks:
            raise ValueError(f"a sequence of up to {seq.max_len} tokens does not fit the KV cache "
                             f"({self.blocks.capacity_tokens} tokens)")
        self.waiting.append(seq)

    @property
    def num_sequences(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep(decodes=[s for s in self.running if s.prefilled])
        limit = min(self.max_num_batched_tokens, max(self.token_budget, len(step.decodes) + MIN_PREFILL))
        budget = max(0, limit - len(step.decodes))
        horizon = self.attention_horizon if step.decodes else None
        for seq in self.running:
            if budget == 0:
                return step
            if not seq.prefilled:
                budget -= self._prefill(step, seq, budget, horizon)
        for seq in list(self.waiting):
            if not budget or len(self.running) >= self.max_num_seqs:
                break
            if not seq.ready:
                continue  # its grammar is still compiling: the next arrival may go first
            if not self.blocks.allocate(seq):
                break  # first come, first served: later arrivals do not overtake it
            self.waiting.remove(seq)
            self.running.append(seq)
            budget -= self._prefill(step, seq, budget, horizon)
        if (self.num_speculative_tokens and not step.prefills and not self.waiting
                and len(step.decodes) <= self.speculative_max_rows):
            self._add_drafts(step, budget)
        return step

    def _prefill(self, step: ScheduledStep, seq: Sequence, budget: int, horizon: float | None) -> int:
        """Schedule the next chunk of a prompt (none while another sequence writes the shared
        block it needs next); return the budget it takes."""
        self.blocks.skip_computed(seq)
        cost = chunk_cost(seq.num_cached, horizon)
        want = max(min(budget, MIN_PREFILL), int(budget / cost))
        n = self.blocks.writable_end(seq, want) - seq.num_cached
        if n <= 0:
            return 0
        step.prefills.append((seq, n))
        # A chunk the budget cut takes all of it: what rounding leaves would admit the next
        # prompt to prefill a token or two per step.
        return budget if n == want else min(budget, math.ceil(n * cost))

    def _add_drafts(self, step: ScheduledStep, budget: int) -> None:
        for seq in list(step.decodes):
            if budget <= 0:
                return
            if not seq.can_speculate:
                continue
            draft = seq.propose_draft(min(self.num_speculative_tokens, budget))
            if draft:
                step.decodes.remove(seq)
                step.drafts.append((seq, draft))
                budget -= len(draft)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or cancelled sequence out, returning its KV blocks."""
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free(seq)
        else:
            self.waiting.remove(seq)

"""A request's state inside the engine."""

from __future__ import annotations

import torch

from serve_app.engine.detokenizer import IncrementalDetokenizer
from serve_app.engine.prefix_hash import block_hashes
from serve_app.engine.sampling import make_generator
from serve_app.engine.speculation import NgramIndex
from serve_app.engine.types import FinishReason, GenerationRequest, SequenceOutput


class Sequence:
    """Prompt and output tokens, the KV blocks that hold them, and how it ends."""

    __slots__ = ("request", "params", "prompt_ids", "output_ids", "num_cached", "max_len", "detok",
                 "generator", "finish_reason", "ngrams", "draft_len", "cache_salt", "block_hashes",
                 "block_table", "block_table_tensor", "slot_map", "first_slot", "num_computed_blocks",
                 "num_cached_prompt", "grammar", "grammar_future")

    def __init__(self, request: GenerationRequest, tokenizer, device: torch.device, max_model_len: int,
                 block_size: int = 16, cache_salt: str = ""):
        self.request = request
        self.params = request.params
        self.prompt_ids = request.prompt_token_ids
        self.output_ids: list[int] = []
        self.num_cached = 0  # tokens whose keys/values are in the cache
        # Prefix caching (block_manager.py): the hash chain of the prompt's full blocks, salted by
        # the model and the request's cache_salt; extended with output blocks as they fill.
        self.cache_salt = cache_salt
        self.block_hashes = block_hashes(self.prompt_ids, block_size, cache_salt)
        self.block_table: list[int] = []  # set by the block manager on admission
        self.block_table_tensor: torch.Tensor | None = None
        self.slot_map: torch.Tensor | None = None  # position -> slot of the flat cache
        self.first_slot: int | None = None  # where it starts if its blocks are consecutive
        self.num_computed_blocks = 0  # leading blocks whose keys/values are all written
        self.num_cached_prompt = 0  # prompt tokens served from the prefix cache
        # Constrained decoding (constraints.py): its grammar being compiled, then its state.
        self.grammar_future = None
        self.grammar = None
        # The most tokens it can ever hold: what admission reserves in the KV cache.
        self.max_len = min(len(self.prompt_ids) + self.params.max_tokens, max_model_len)
        self.detok = IncrementalDetokenizer(tokenizer, self.params.stop)
        self.generator = make_generator(self.params, device)
        self.finish_reason: FinishReason | None = None
        self.ngrams: NgramIndex | None = None  # built on the first draft (most sequences never draft)
        self.draft_len: int | None = None  # how many tokens to draft next (follows what was accepted)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def total_len(self) -> int:
        return self.prompt_len + len(self.output_ids)

    def token_ids(self, n: int) -> list[int]:
        """Its first n tokens (prompt, then output)."""
        if n <= self.prompt_len:
            return self.prompt_ids[:n]
        return self.prompt_ids + self.output_ids[:n - self.prompt_len]

    def set_block_table(self, blocks: list[int], block_size: int, device: torch.device | None = None) -> None:
        """Blocks for every position it may reach (see BlockManager.allocate), and what reading
        and writing them needs: the table as a tensor and each position's slot."""
        self.block_table = blocks
        if not blocks:
            self.block_table_tensor = self.slot_map = self.first_slot = None
            return
        table = torch.tensor(blocks, dtype=torch.long, device=device)
        self.block_table_tensor = table
        offsets = torch.arange(block_size, device=table.device)
        self.slot_map = (table.unsqueeze(1) * block_size + offsets).flatten()
        consecutive = blocks == list(range(blocks[0], blocks[0] + len(blocks)))
        self.first_slot = blocks[0] * block_size if consecutive else None

    @property
    def ready(self) -> bool:
        """Nothing keeps it from being admitted (its grammar, if any, is compiled)."""
        return self.grammar_future is None or self.grammar is not None

    @property
    def prefilled(self) -> bool:
        """The whole prompt is cached: from now on it decodes one token per step."""
        return self.num_cached >= self.prompt_len

    @property
    def can_speculate(self) -> bool:
        """Drafts are checked against tokens drawn from each position's own distribution
        (see speculation.check_drafts). Not for rows whose logits depend on the tokens
        before them (penalties), that report logprobs, or whose seed must replay the same
        draws in any batch (a checked draft consumes one draw per drafted position)."""
        p = self.params
        return (p.greedy or p.seed is None) and p.logprobs is None and not p.processes_logits

    def propose_draft(self, max_len: int) -> list[int]:
        """Up to `max_len` tokens guessed from this sequence's own past (see speculation.py),
        never more than its max_tokens or its reserved KV slots can take."""
        room = min(self.params.max_tokens - len(self.output_ids) - 1, self.max_len - self.total_len)
        if self.draft_len is None:
            self.draft_len = max_len
        k = min(self.draft_len, max_len, room)
        if k <= 0:
            return []
        if self.ngrams is None:
            self.ngrams = NgramIndex()
            self.ngrams.extend(self.prompt_ids)
        done = len(self.ngrams.tokens) - self.prompt_len
        self.ngrams.extend(self.output_ids[done:])
        return self.ngrams.propose(k)

    def record_draft(self, proposed: int, accepted: int, max_len: int) -> None:
        """Draft longer after a draft was taken whole, as long as the part taken after one was not."""
        self.draft_len = min(max_len, proposed + 1) if accepted == proposed else max(1, accepted)

    def output(self, text: str, token_ids: list[int]) -> SequenceOutput:
        return SequenceOutput(
            request_id=self.request_id, text=text, token_ids=token_ids, finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_len, completion_tokens=len(self.output_ids),
            cached_tokens=self.num_cached_prompt,
        )

"""The engine's side of constrained decoding (grammar.py has the machinery and the contract).

A sequence whose request carries a grammar has it compiled when it arrives, on the
compiler's thread; it is not admitted until the grammar is ready, so the engine thread never
waits for a compilation. Every step, the logits of its rows (and of its drafted positions)
are masked to the tokens the grammar allows before sampling, and each token it emits is
accepted by its grammar state. A row whose grammar cannot go on fails alone, with an error
that starts with `grammar_dead_end` (the frontend answers it as such), never hangs.
Unconstrained rows are not touched, and a batch without constrained rows costs nothing.
"""

from __future__ import annotations

import torch

from serve_app.engine.sequence import Sequence


class RowFailed(Exception):
    """One row's failure, whose message the client sees as it is."""


class Constraints:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids, cache_size: int):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = eos_token_ids
        self._cache_size = cache_size
        self._compiler = None  # made on the first constrained request (imports llguidance)

    def submit(self, seq: Sequence) -> None:
        """Start compiling a new sequence's grammar, if it has one."""
        spec = seq.params.grammar
        if spec is None:
            return
        if self._compiler is None:
            from serve_app.engine.grammar import GrammarCompiler

            self._compiler = GrammarCompiler(self._tokenizer, vocab_size=self._vocab_size,
                                             eos_token_ids=self._eos, cache_size=self._cache_size)
        seq.grammar_future = self._compiler.compile(spec)

    @staticmethod
    def resolve(waiting) -> list[tuple[Sequence, str]]:
        """Give waiting sequences whose grammar compiled their state; return those whose grammar
        failed, with the error (the ingress compiled the same spec, so this is rare)."""
        failed = []
        for seq in waiting:
            future = seq.grammar_future
            if future is None or seq.grammar is not None or not future.done():
                continue
            try:
                seq.grammar = future.result().new_state()
            except Exception as e:
                failed.append((seq, f"grammar failed to compile: {e}"))
        return failed

    @staticmethod
    def mask(logits: torch.Tensor, seqs: list[Sequence], raw: torch.Tensor) -> tuple[torch.Tensor, dict[int, str]]:
        """Mask the constrained rows of the sampled logits; (logits to sample from, {row: error}
        for rows whose grammar cannot advance). `raw` (what logprobs are read from) stays unmasked."""
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if not rows:
            return logits, {}
        from serve_app.engine.grammar import apply_masks, dead_end_message

        if logits is raw:
            logits = logits.float().clone()
        states = [seqs[i].grammar for i in rows]
        dead = apply_masks(logits, rows, states)
        return logits, {rows[j]: dead_end_message(states[j]) for j in dead}

    @staticmethod
    def mask_drafts(logits: torch.Tensor, drafts: list[tuple[Sequence, list[int]]]) -> torch.Tensor:
        """Mask the 1 + k logits rows of each constrained drafted row: row j by the grammar's state
        after the draft's first j tokens (grammar.GrammarState.fill_draft_masks)."""
        spans, start = [], 0
        for seq, draft in drafts:
            if seq.grammar is not None:
                spans.append((seq, draft, start))
            start += 1 + len(draft)
        if not spans:
            return logits
        from serve_app.engine.grammar import apply_bitmask, bitmask_words

        logits = logits.float().clone()
        rows = [r for _, draft, first in spans for r in range(first, first + 1 + len(draft))]
        words = max(bitmask_words(logits.shape[-1]), max(seq.grammar.words for seq, _, _ in spans))
        bitmask = torch.empty(len(rows), words, dtype=torch.int32)
        at = 0
        for seq, draft, _ in spans:
            seq.grammar.fill_draft_masks(draft, bitmask, at)
            at += 1 + len(draft)
        apply_bitmask(logits, rows, bitmask)
        return logits

    @staticmethod
    def accept(seq: Sequence, token: int) -> None:
        """The grammar takes an emitted token (the mask allowed it); a refusal fails the row."""
        if seq.grammar is not None and not seq.grammar.accept(token):
            from serve_app.engine.grammar import dead_end_message

            raise RowFailed(dead_end_message(seq.grammar))

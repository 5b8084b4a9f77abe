"""Prompt-lookup speculative decoding: drafts a sequence's next tokens from its own past.

Text often repeats itself: an answer quotes its prompt, code is edited in place, a list
repeats its pattern, a small model loops. When the last few tokens of a sequence occurred
before, what followed them then is a cheap guess of what follows now (vLLM's "ngram"
method, TGI's `--speculate`). The engine checks a draft of k tokens in the same forward
as the row's next token (k + 1 query tokens over its cached past), draws a token at each
position as decoding one at a time would (greedy: the argmax), and keeps the draft while it
matches those draws, plus the first draw that did not: the same tokens (greedy) or the same
distribution (sampled) as one per step, in fewer steps. On a CPU at batch 1 the forward is
bound by reading the weights: with the fused bf16 forward, 2, 3, 4 and 5 tokens cost 1.0x,
1.2x, 1.2x and 1.3x one token (SmolLM2-135M, 2 cores: 15.4, 15.6, 18.4, 18.3, 20.4 ms per
step). A fully kept draft of 4 wins (5 tokens for 1.3x); drafts shrink as soon as part of one
is rejected (Sequence.record_draft).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from serve_app.engine.sampling import sample_next_tokens
from serve_app.engine.types import SamplingParams

MIN_NGRAM = 2  # a single repeated token is too weak a signal: most of its drafts were rejected
MAX_NGRAM = 3


class NgramIndex:
    """For each n-gram of a token sequence (n in [MIN_NGRAM, MAX_NGRAM]), where its latest
    occurrence with a known continuation ends. Extended incrementally: O(1) per new token."""

    __slots__ = ("_follows", "tokens")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self._follows: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token that followed it

    def extend(self, tokens: list[int]) -> None:
        seq, follows = self.tokens, self._follows
        for token in tokens:
            end = len(seq)
            for n in range(MIN_NGRAM, min(MAX_NGRAM, end) + 1):
                follows[tuple(seq[end - n:end])] = end
            seq.append(token)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the longest earlier occurrence of the current suffix.
        A continuation that runs into the present repeats itself (a loop of period p keeps
        its period), so short loops still give full drafts."""
        seq = self.tokens
        end = len(seq)
        for n in range(min(MAX_NGRAM, end), MIN_NGRAM - 1, -1):
            start = self._follows.get(tuple(seq[end - n:]))
            if start is not None:
                draft: list[int] = []
                for i in range(k):  # past the present, the draft continues from itself
                    j = start + i
                    draft.append(seq[j] if j < end else draft[j - end])
                return draft
        return []


def check_drafts(logits: torch.Tensor, drafts: Sequence[list[int]], params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator | None]) -> list[list[int | Exception]]:
    """The tokens each drafted row emits this step. `logits` holds 1 + len(draft) rows per
    drafted row (its last token's position, then each draft token's), rows in order.

    Each position gets the token one-at-a-time decoding would draw there (greedy: the argmax);
    the draft is kept while it matches, then the first draw that did not match (or the draw
    after a fully kept draft) ends the row: 1 to k + 1 tokens. For a sampled row this is exact
    speculative sampling with a draft that is one token for sure: the draft token is kept with
    probability p(token), and otherwise the emitted draw follows p conditioned on differing from
    it, i.e. p without that token, renormalized (the rejection rule of Leviathan et al. 2023)."""
    row_params, row_generators = [], []
    for draft, p, g in zip(drafts, params, generators):
        row_params += [p] * (1 + len(draft))
        row_generators += [g] * (1 + len(draft))
    draws = sample_next_tokens(logits, row_params, row_generators)
    out, row = [], 0
    for draft in drafts:
        chosen = draws[row:row + 1 + len(draft)]
        row += 1 + len(draft)
        kept = 0
        while kept < len(draft) and draft[kept] == chosen[kept]:
            kept += 1
        out.append(chosen[:kept + 1])
    return out

"""Continuous batching over a Hugging Face causal LM, one step at a time.

The running batch is a left-padded KV cache plus a 2-D attention mask. Each
`step()` either prefills newly admitted sequences (and merges them into the
running cache) or decodes one token for every running sequence. Finished or
cancelled rows leave between steps, so their slots free immediately.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from serve_app.engine.detokenizer import IncrementalDetokenizer
from serve_app.engine.sampling import make_generator, sample_next_tokens
from serve_app.engine.types import FinishReason, GenerationRequest, SequenceOutput


class Sequence:
    """A request's state inside the engine."""

    __slots__ = ("request", "params", "prompt_len", "output_ids", "detok", "generator", "finish_reason")

    def __init__(self, request: GenerationRequest, tokenizer, device: torch.device):
        self.request = request
        self.params = request.params
        self.prompt_len = len(request.prompt_token_ids)
        self.output_ids: list[int] = []
        self.detok = IncrementalDetokenizer(tokenizer, self.params.stop)
        self.generator = make_generator(self.params, device)
        self.finish_reason: FinishReason | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def total_len(self) -> int:
        return self.prompt_len + len(self.output_ids)

    def output(self, text: str, token_ids: list[int]) -> SequenceOutput:
        return SequenceOutput(
            request_id=self.request_id, text=text, token_ids=token_ids, finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_len, completion_tokens=len(self.output_ids),
        )


class BatchEngine:
    """Generates for many sequences at once; not thread-safe (one driver thread)."""

    def __init__(self, model, tokenizer, eos_token_ids: Iterable[int], max_batch_size: int, max_model_len: int):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._cancelled: set[str] = set()
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, kv_len], 0 = left padding
        self._last_tokens: list[int] = []  # the token each running row feeds next

    # ------------------------------------------------------------ public

    def add(self, request: GenerationRequest) -> None:
        if len(request.prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(request.prompt_token_ids)} tokens does not fit "
                             f"the context of {self.max_model_len}")
        self.waiting.append(Sequence(request, self.tokenizer, self.device))

    def cancel(self, request_id: str) -> None:
        """Stop a sequence at the next step boundary (waiting or running)."""
        self._cancelled.add(request_id)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_sequences(self) -> int:
        return len(self.waiting) + len(self.running)

    @torch.inference_mode()
    def step(self) -> list[SequenceOutput]:
        """Advance every sequence by at most one token; return what changed."""
        outputs = self._drop_cancelled()
        room = self.max_batch_size - len(self.running)
        if self.waiting and room > 0:
            admitted = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
            outputs += self._prefill(admitted)
        elif self.running:
            outputs += self._decode()
        return outputs

    def abort_all(self, error: str) -> list[SequenceOutput]:
        """Fail every sequence (after an unrecoverable error) and reset state."""
        outs = []
        for seq in [*self.running, *self.waiting]:
            seq.finish_reason = "error"
            out = seq.output("", [])
            out.error = error
            outs.append(out)
        self.waiting.clear()
        self.running = []
        self._cache = self._mask = None
        self._last_tokens = []
        self._cancelled.clear()
        return outs

    # ------------------------------------------------------------ steps

    def _prefill(self, seqs: list[Sequence]) -> list[SequenceOutput]:
        longest = max(s.prompt_len for s in seqs)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (longest - s.prompt_len) + s.request.prompt_token_ids for s in seqs],
                           device=self.device)
        mask = torch.tensor([[0] * (longest - s.prompt_len) + [1] * s.prompt_len for s in seqs],
                            device=self.device)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, cache)
        self._merge(seqs, cache, mask)
        return self._advance(seqs, logits, offset=len(self.running) - len(seqs))

    def _decode(self) -> list[SequenceOutput]:
        ids = torch.tensor(self._last_tokens, device=self.device).unsqueeze(-1)
        self._mask = F.pad(self._mask, (0, 1), value=1)
        logits = self._forward(ids, self._mask, self._cache)
        return self._advance(self.running, logits, offset=0)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        # Positions count real tokens only, so left padding does not shift them.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor, offset: int) -> list[SequenceOutput]:
        """Sample one token per row, update text and finish state, retire finished rows."""
        tokens = sample_next_tokens(logits, [s.params for s in seqs], [s.generator for s in seqs])
        outputs = []
        for i, (seq, token) in enumerate(zip(seqs, tokens)):
            self._last_tokens[offset + i] = token
            seq.output_ids.append(token)
            is_eos = token in self.eos_token_ids and not seq.params.ignore_eos
            text = "" if is_eos else seq.detok.add_token(token)
            if is_eos or seq.detok.stopped:
                seq.finish_reason = "stop"
            elif len(seq.output_ids) >= seq.params.max_tokens or seq.total_len >= self.max_model_len:
                seq.finish_reason = "length"
            if seq.finish_reason and not seq.detok.stopped:
                text += seq.detok.flush()
            outputs.append(seq.output(text, [token]))
        self._retire(lambda s: s.finish_reason is not None)
        return outputs

    # ------------------------------------------------------------ batch surgery

    def _drop_cancelled(self) -> list[SequenceOutput]:
        if not self._cancelled:
            return []
        outputs = []
        for seq in [*self.waiting, *self.running]:
            if seq.request_id in self._cancelled and seq.finish_reason is None:
                seq.finish_reason = "cancelled"
                outputs.append(seq.output("", []))
        self.waiting = deque(s for s in self.waiting if s.finish_reason is None)
        self._retire(lambda s: s.finish_reason is not None)
        self._cancelled.clear()
        return outputs

    def _merge(self, seqs: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append prefilled rows to the running batch, left-padding the shorter side."""
        self._last_tokens += [0] * len(seqs)
        if not self.running:
            self.running, self._cache, self._mask = list(seqs), cache, mask
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        total = max(old_len, new_len)
        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([F.pad(old.keys, (0, 0, total - old_len, 0)),
                                  F.pad(new.keys, (0, 0, total - new_len, 0))])
            old.values = torch.cat([F.pad(old.values, (0, 0, total - old_len, 0)),
                                    F.pad(new.values, (0, 0, total - new_len, 0))])
        self._mask = torch.cat([F.pad(self._mask, (total - old_len, 0)), F.pad(mask, (total - new_len, 0))])
        self.running += seqs

    def _retire(self, done) -> None:
        keep = [i for i, s in enumerate(self.running) if not done(s)]
        if len(keep) == len(self.running):
            return
        if not keep:
            self.running, self._cache, self._mask, self._last_tokens = [], None, None, []
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask.index_select(0, index)
        self.running = [self.running[i] for i in keep]
        self._last_tokens = [self._last_tokens[i] for i in keep]
        # Columns that are padding for every remaining row are dead weight: cut them.
        first = int(self._mask.any(0).nonzero()[0])
        if first:
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, first:]
                layer.values = layer.values[:, :, first:]

"""A request's state inside the engine."""

from __future__ import annotations

import torch

from serve_app.engine.detokenizer import IncrementalDetokenizer
from serve_app.engine.sampling import make_generator
from serve_app.engine.types import FinishReason, GenerationRequest, SequenceOutput


class Sequence:
    """Prompt and output tokens, how many of them are in the KV cache, and how it ends."""

    __slots__ = ("request", "params", "prompt_ids", "output_ids", "num_cached", "max_len", "detok",
                 "generator", "finish_reason")

    def __init__(self, request: GenerationRequest, tokenizer, device: torch.device, max_model_len: int):
        self.request = request
        self.params = request.params
        self.prompt_ids = request.prompt_token_ids
        self.output_ids: list[int] = []
        self.num_cached = 0  # tokens whose keys/values are in the cache
        # The most tokens it can ever hold: what admission reserves in the KV cache.
        self.max_len = min(len(self.prompt_ids) + self.params.max_tokens, max_model_len)
        self.detok = IncrementalDetokenizer(tokenizer, self.params.stop)
        self.generator = make_generator(self.params, device)
        self.finish_reason: FinishReason | None = None

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def total_len(self) -> int:
        return self.prompt_len + len(self.output_ids)

    @property
    def prefilled(self) -> bool:
        """The whole prompt is cached: from now on it decodes one token per step."""
        return self.num_cached >= self.prompt_len

    def output(self, text: str, token_ids: list[int]) -> SequenceOutput:
        return SequenceOutput(
            request_id=self.request_id, text=text, token_ids=token_ids, finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_len, completion_tokens=len(self.output_ids),
        )

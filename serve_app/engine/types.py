"""What goes into the engine and what comes out of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from serve_app.engine.grammar_spec import GrammarSpec

GREEDY_BELOW_TEMPERATURE = 1e-5  # as vLLM

# The bounds of a sampling parameter, declared once: the engine's SamplingParams and the
# HTTP protocol's request models use the same types, so nothing the edge accepts is refused
# (or crashes) in the engine.
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
TopK = Annotated[int, Field(ge=0)]  # 0 = off
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]  # what torch.Generator accepts
MinTokens = Annotated[int, Field(ge=0)]  # EOS is impossible before this many tokens
OpenAIPenalty = Annotated[float, Field(ge=-2.0, le=2.0)]  # presence / frequency, as OpenAI
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0)]  # HF/vLLM: prompt and output tokens
TopLogprobs = Annotated[int, Field(ge=0, le=20)]  # the chosen token's logprob and this many top ones


class SamplingParams(BaseModel):
    """Per-sequence decoding parameters; every row of a batch has its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0)  # 0 = greedy
    top_p: TopP = 1.0
    top_k: TopK = 0
    stop: tuple[str, ...] = ()
    seed: Seed | None = None
    ignore_eos: bool = False
    min_tokens: MinTokens = 0
    presence_penalty: OpenAIPenalty = 0.0  # per token present in the output
    frequency_penalty: OpenAIPenalty = 0.0  # per occurrence in the output
    repetition_penalty: RepetitionPenalty = 1.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    logprobs: TopLogprobs | None = None
    # Structured output / forced tool calls: the output must match this grammar (the replica
    # compiles it; serve_app/engine/grammar.py says how the sampler applies it).
    grammar: GrammarSpec | None = None

    @property
    def processes_logits(self) -> bool:
        """Whether anything changes this row's logits before sampling."""
        return bool(self.min_tokens or self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0 or self.logit_bias)

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows float32; it is argmax in all but name.
        return self.temperature < GREEDY_BELOW_TEMPERATURE


class GenerationRequest(BaseModel):
    """One sequence to generate: already tokenized, already validated."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    prompt_token_ids: list[int] = Field(min_length=1)
    params: SamplingParams = Field(default_factory=SamplingParams)
    # Sequences share cached KV blocks only under the same salt (see prefix_hash.py).
    cache_salt: str | None = None


FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(slots=True)
class SequenceOutput:
    """What one engine step produced for one sequence: a delta, plus totals."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # Per token of token_ids when asked: (logprob of the chosen token, [(token id, logprob) of the top ones])
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def absorb(self, later: SequenceOutput) -> None:
        """Fold a later delta of the same sequence into this one."""
        self.text += later.text
        self.token_ids += later.token_ids
        self.finish_reason = later.finish_reason
        self.prompt_tokens = later.prompt_tokens
        self.completion_tokens = later.completion_tokens
        self.cached_tokens = later.cached_tokens
        self.error = later.error
        if later.logprobs is not None:
            self.logprobs = (self.logprobs or []) + later.logprobs


def coalesce(outputs: list[SequenceOutput]) -> list[SequenceOutput]:
    """Merge deltas per sequence (in first-seen order): one message carries each sequence once."""
    merged: dict[str, SequenceOutput] = {}
    for out in outputs:
        if out.request_id in merged:
            merged[out.request_id].absorb(out)
        else:
            merged[out.request_id] = SequenceOutput(
                out.request_id, out.text, list(out.token_ids), out.finish_reason,
                out.prompt_tokens, out.completion_tokens, out.error, out.cached_tokens,
                list(out.logprobs) if out.logprobs is not None else None)
    return list(merged.values())

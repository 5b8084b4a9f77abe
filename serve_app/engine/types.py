"""What goes into the engine and what comes out of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GREEDY_BELOW_TEMPERATURE = 1e-5  # as vLLM


class SamplingParams(BaseModel):
    """Per-sequence decoding parameters; every row of a batch has its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # 0 = off
    stop: tuple[str, ...] = ()
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator accepts
    ignore_eos: bool = False

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

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def absorb(self, later: "SequenceOutput") -> None:
        """Fold a later delta of the same sequence into this one."""
        self.text += later.text
        self.token_ids += later.token_ids
        self.finish_reason = later.finish_reason
        self.prompt_tokens = later.prompt_tokens
        self.completion_tokens = later.completion_tokens
        self.error = later.error


def coalesce(outputs: list[SequenceOutput]) -> list[SequenceOutput]:
    """Merge deltas per sequence (in first-seen order): one message carries each sequence once."""
    merged: dict[str, SequenceOutput] = {}
    for out in outputs:
        if out.request_id in merged:
            merged[out.request_id].absorb(out)
        else:
            merged[out.request_id] = SequenceOutput(
                out.request_id, out.text, list(out.token_ids), out.finish_reason,
                out.prompt_tokens, out.completion_tokens, out.error)
    return list(merged.values())

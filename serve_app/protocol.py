"""OpenAI-compatible request/response models and the error shape.

Protocol only: no serving logic. Requests are validated here; anything the
server cannot honour is rejected with an `APIError` naming the field.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from serve_app.engine.types import MinTokens, OpenAIPenalty, RepetitionPenalty, Seed, TopK, TopLogprobs, TopP


class APIError(Exception):
    """An error a client sees, in OpenAI's shape, with its HTTP status.

    Raised anywhere in the graph (ingress, router, replica); Ray re-raises it at
    the caller as an instance of this class, so the ingress maps it 1:1.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def __reduce__(self):  # keep every field across pickling (Ray, subprocesses)
        return (
            APIError,
            (self.status, self.message, self.type, self.param, self.code, self.retry_after),
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def queue_full(message: str, retry_after: int) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="queue_full", retry_after=retry_after)


# ---------------------------------------------------------------- requests

# Fields of OpenAI's API we accept but cannot honour except at their default.
_UNSUPPORTED_UNLESS_DEFAULT: dict[str, Any] = {
    "echo": False,
    "suffix": None,
    "functions": None,  # the deprecated form of tools
    "function_call": None,
}


# ---------------------------------------------------------------- structured output and tools

FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: the answer is JSON matching `schema`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] | bool = Field({}, alias="schema")
    strict: bool | None = Field(None, description="Accepted; the output is always constrained to the schema.")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("'json_schema' is required when type is 'json_schema'")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"'json_schema' is only allowed when type is 'json_schema', not {self.type!r}")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` extension: exactly one constraint."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict[str, Any] | bool | str | None = Field(None, alias="json", description="A JSON schema.")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = Field(None, description="Lark (llguidance's dialect) or GBNF.")
    json_object: bool | None = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON schema of the arguments; none = no arguments.")
    strict: bool | None = Field(None, description="Accepted; forced calls always match the schema.")


class ChatTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionName


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str = Field(description="The arguments as JSON text.")


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _GenerationFields(BaseModel):
    """Sampling fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, description="Tokens to generate (default from config).")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: TopP = 1.0
    top_k: TopK = Field(0, description="Extension: 0 disables top-k.")
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: Seed | None = Field(None, description="Any 64-bit integer.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="Extension (vLLM): generate exactly max_tokens.")
    n: int = Field(1, ge=1, le=128, description="Choices per prompt, each its own sequence.")
    best_of: int | None = Field(None, description="Accepted only equal to n (no server-side ranking).")
    min_tokens: MinTokens = Field(0, description="Extension (vLLM): no EOS before this many tokens.")
    presence_penalty: OpenAIPenalty = 0.0
    frequency_penalty: OpenAIPenalty = 0.0
    repetition_penalty: RepetitionPenalty = Field(1.0, description="Extension (vLLM/HF).")
    logit_bias: dict[str, float] | None = Field(None, description="Token id -> bias in [-100, 100].")
    cache_salt: str | None = Field(None, max_length=256, description="Extension (vLLM): requests with "
                                   "different salts never share cached prompt blocks.")
    # vLLM's structured-output extensions (at most one; on chat, not with response_format).
    guided_json: dict[str, Any] | bool | str | None = Field(None, description="Output matches this JSON schema.")
    guided_regex: str | None = Field(None, description="Output matches this regular expression.")
    guided_choice: list[str] | None = Field(None, description="Output is one of these strings.")
    guided_grammar: str | None = Field(None, description="Output matches this grammar (Lark or GBNF).")
    structured_outputs: StructuredOutputs | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.strip().isdigit():
                raise ValueError(f"logit_bias keys are token ids; got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values lie in [-100, 100]; got {bias}")
        return v

    @field_validator("max_tokens")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("max_tokens must be at least 1")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def check_supported(self) -> None:
        """Reject fields we accept syntactically but do not implement."""
        for name, default in _UNSUPPORTED_UNLESS_DEFAULT.items():
            if name in self.model_fields_set and getattr(self, name, default) not in (default, None):
                raise APIError(400, f"'{name}' is not supported by this server (only the default {default!r})",
                               param=name, code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "'best_of' is supported only equal to 'n' (no server-side ranking)", param="best_of",
                           code="unsupported_parameter")


class CompletionRequest(_GenerationFields):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    logprobs: TopLogprobs | None = Field(None, description="Top tokens to report per token, with the chosen one.")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None  # sent back by clients that echo a whole assistant message

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs the 'tool_call_id' of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only 'assistant' messages carry 'tool_calls'")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_GenerationFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: TopLogprobs | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = Field(None, description="Default true: a forced call may be several.")

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if not v:
            raise ValueError("messages must contain at least one message")
        return v

    @field_validator("max_completion_tokens")
    @classmethod
    def _positive_completion(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("max_completion_tokens must be at least 1")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request, with vLLM's `truncate_prompt_tokens` and `add_special_tokens`.

    `input` is checked by the embeddings frontend (its four shapes, each error naming the
    exact item), not here."""

    model_config = ConfigDict(extra="forbid")

    model: str
    input: Any
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Shorter vectors, for Matryoshka-trained models.")
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, description="Extension (vLLM): keep the first k tokens of each input; -1 = the model's limit.")
    add_special_tokens: bool = Field(True, description="Extension (vLLM): the tokenizer's special tokens on texts.")

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _not_zero(cls, v: int | None) -> int | None:
        if v == 0:
            raise ValueError("truncate_prompt_tokens must be at least 1, or -1 for the model's limit")
        return v


class GenerateRequest(BaseModel):
    """The original design's simple API: `{"prompt", "max_length"}`."""

    model_config = ConfigDict(extra="forbid")
    prompt: str
    max_length: int = Field(50, ge=1, description="Tokens to generate.")


# ---------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


# What a choice reports (OpenAI's values); the engine's own FinishReason adds "error", which a
# client never sees as a finish reason (it becomes an error response or event).
ChoiceFinishReason = Literal["stop", "length", "tool_calls", "cancelled"] | None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: ChoiceFinishReason
    logprobs: dict | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # null when the answer is only tool calls
    tool_calls: list[ToolCall] | None = None

    @model_serializer(mode="wrap")
    def _omit_absent_tool_calls(self, handler):
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: ChoiceFinishReason
    logprobs: dict | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A fragment of a streamed tool call: the first of a call has its id, type and name
    (arguments ""); the next ones add pieces of the arguments' JSON text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: ChoiceFinishReason = None
    logprobs: dict | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "serve_app"
    max_model_len: int | None = None
    task: Literal["generate", "embed"] | None = None
    dimensions: int | None = Field(None, description="An embedding model's vector length.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32, as OpenAI encodes it


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage

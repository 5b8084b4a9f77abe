"""What a constrained sequence must generate: a grammar's description, as pure data.

A `GrammarSpec` travels with the request (`SamplingParams.grammar`) from the ingress,
which builds and validates it, to the replica, which compiles it for its tokenizer
(`serve_app.engine.grammar`). It is frozen and hashable: the compilers' caches are keyed
by it. Kept apart from the compiler so that importing the engine's types (as the router
does) needs neither torch nor the grammar library.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "grammar", "tool_calls"]

# The text a forced tool call takes (Hermes / Qwen style), one block per call:
#   <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>
# Parallel calls are such blocks separated by TOOL_CALL_SEPARATOR.
TOOL_CALL_OPEN = "<tool_call>\n"
TOOL_CALL_CLOSE = "\n</tool_call>"
TOOL_CALL_SEPARATOR = "\n"

# The error of a sequence whose grammar no token can continue (finish_reason "error").
DEAD_END = "grammar_dead_end"


def canonical_json(value: Any) -> str:
    """Compact JSON text with the keys in their given order (property order steers generation)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class ToolSpec(BaseModel):
    """One callable function: its name and the JSON schema of its arguments (JSON text)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    parameters: str = '{"type":"object","properties":{}}'  # no parameters: the arguments are {}


class GrammarSpec(BaseModel):
    """A grammar to constrain a sequence's output to; build it with the class methods.

    - json_schema: `value` is the schema as JSON text; output is one JSON value matching it.
    - json_object: any JSON object.
    - regex: `value` is a regular expression (Rust `regex` syntax, no look-around); the whole
      output matches it.
    - choice: output is exactly one of `choices`.
    - grammar: `value` is a context-free grammar in llguidance's Lark dialect (a `start:`
      rule, lowercase rules, uppercase terminals, /regex/ terminals, `%json {schema}`
      embeds) or in llama.cpp's GBNF (`root ::= ...`).
    - tool_calls: one call (or several, with `parallel`) of one of `tools`, in the
      TOOL_CALL_OPEN ... TOOL_CALL_CLOSE format, arguments matching the tool's schema; with a
      `value` (a JSON schema as text), either such calls or a JSON answer matching it (a
      request with tools, tool_choice "auto" and a JSON response_format).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: GrammarKind
    value: str = ""
    choices: tuple[str, ...] = ()
    tools: tuple[ToolSpec, ...] = ()
    parallel: bool = Field(False, description="tool_calls: allow several calls, one after another.")

    @model_validator(mode="after")
    def _fields_of_kind(self) -> GrammarSpec:
        if self.kind in ("json_schema", "regex", "grammar") and not self.value:
            raise ValueError(f"a {self.kind} grammar needs its text in 'value'")
        if self.kind == "choice" and not self.choices:
            raise ValueError("a choice grammar needs at least one choice")
        if self.kind == "tool_calls" and not self.tools:
            raise ValueError("a tool_calls grammar needs at least one tool")
        return self

    @classmethod
    def json_schema(cls, schema: dict | bool) -> GrammarSpec:
        return cls(kind="json_schema", value=canonical_json(schema))

    @classmethod
    def json_object(cls) -> GrammarSpec:
        return cls(kind="json_object")

    @classmethod
    def regex(cls, pattern: str) -> GrammarSpec:
        return cls(kind="regex", value=pattern)

    @classmethod
    def choice(cls, choices: list[str]) -> GrammarSpec:
        return cls(kind="choice", choices=tuple(choices))

    @classmethod
    def grammar(cls, text: str) -> GrammarSpec:
        return cls(kind="grammar", value=text)

    @classmethod
    def tool_calls(cls, tools: list[tuple[str, dict | None]], parallel: bool = False) -> GrammarSpec:
        """`tools`: (name, parameters schema or None for a function without parameters)."""
        specs = tuple(ToolSpec(name=name) if params is None else ToolSpec(name=name, parameters=canonical_json(params))
                      for name, params in tools)
        return cls(kind="tool_calls", tools=specs, parallel=parallel)

    def describe(self) -> str:
        """A short human description, for logs and error messages."""
        if self.kind == "tool_calls":
            return f"tool_calls({', '.join(t.name for t in self.tools)})"
        if self.kind == "choice":
            return f"choice of {len(self.choices)}"
        return self.kind

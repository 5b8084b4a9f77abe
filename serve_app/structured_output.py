"""A request's output constraint: OpenAI's `response_format`, vLLM's `guided_*` fields and
`structured_outputs`, and the tools of a chat request, turned into one `GrammarSpec`.

Protocol-level only: the frontend validates the spec by compiling it (serve_app/engine/grammar.py)
and sends it to the engine in `SamplingParams.grammar`.
"""

from __future__ import annotations

import json
from typing import Any

from serve_app.config import AppArgs
from serve_app.engine.grammar_spec import GrammarSpec, canonical_json
from serve_app.protocol import APIError, ChatCompletionRequest, CompletionRequest
from serve_app.tool_calls import ToolContext, tool_choice_of


def _schema(value: Any, param: str) -> dict | bool:
    """A JSON schema given as an object, a boolean, or JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise APIError(400, f"'{param}' is not a JSON schema: {e}", param=param, code="invalid_schema") from None
    if not isinstance(value, (dict, bool)):
        raise APIError(400, f"'{param}' must be a JSON schema (an object)", param=param, code="invalid_schema")
    return value


def requested_constraints(req: CompletionRequest | ChatCompletionRequest) -> list[tuple[str, GrammarSpec]]:
    """Every output constraint the request gives, as (the field that gave it, its spec)."""
    found: list[tuple[str, GrammarSpec]] = []
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", GrammarSpec.json_object()))
    elif fmt is not None and fmt.type == "json_schema":
        found.append(("response_format", GrammarSpec.json_schema(_schema(fmt.json_schema.schema_, "response_format"))))
    if req.guided_json is not None:
        found.append(("guided_json", GrammarSpec.json_schema(_schema(req.guided_json, "guided_json"))))
    if req.guided_regex is not None:
        found.append(("guided_regex", _non_empty(req.guided_regex, "guided_regex", GrammarSpec.regex)))
    if req.guided_choice is not None:
        if not req.guided_choice:
            raise APIError(400, "'guided_choice' must list at least one choice", param="guided_choice",
                           code="invalid_value")
        found.append(("guided_choice", GrammarSpec.choice(req.guided_choice)))
    if req.guided_grammar is not None:
        found.append(("guided_grammar", _non_empty(req.guided_grammar, "guided_grammar", GrammarSpec.grammar)))
    if req.structured_outputs is not None:
        found.append(_structured_outputs(req.structured_outputs))
    return found


def _non_empty(text: str, param: str, make) -> GrammarSpec:
    if not text:
        raise APIError(400, f"'{param}' must not be empty", param=param, code="invalid_value")
    return make(text)


def _structured_outputs(so) -> tuple[str, GrammarSpec]:
    given = [name for name in ("json_", "regex", "choice", "grammar", "json_object")
             if getattr(so, name) not in (None, False)]
    if len(given) != 1:
        raise APIError(400, "'structured_outputs' takes exactly one of json, regex, choice, grammar, json_object",
                       param="structured_outputs", code="invalid_value")
    kind = given[0]
    param = f"structured_outputs.{kind.rstrip('_')}"
    if kind == "json_":
        return param, GrammarSpec.json_schema(_schema(so.json_, param))
    if kind == "json_object":
        return param, GrammarSpec.json_object()
    if kind == "choice":
        if not so.choice:
            raise APIError(400, f"'{param}' must list at least one choice", param=param, code="invalid_value")
        return param, GrammarSpec.choice(so.choice)
    return param, _non_empty(getattr(so, kind), param, GrammarSpec.regex if kind == "regex" else GrammarSpec.grammar)


def spec_bytes(spec: GrammarSpec) -> int:
    return (len(spec.value.encode()) + sum(len(c.encode()) for c in spec.choices)
            + sum(len(t.parameters.encode()) for t in spec.tools))


def check_size(spec: GrammarSpec, param: str, args: AppArgs) -> None:
    size = spec_bytes(spec)
    if size > args.max_schema_bytes:
        raise APIError(400, f"'{param}' is {size} bytes; this server accepts output constraints of at most "
                            f"{args.max_schema_bytes} bytes", param=param, code="schema_too_large")


def tool_context(req: ChatCompletionRequest, args: AppArgs) -> ToolContext | None:
    """The request's tools, checked; None when the model is not to call any (no tools, or
    tool_choice "none")."""
    tools = req.tools or []
    choice, forced_name = tool_choice_of(req.tool_choice)
    if not tools:
        if "tool_choice" in req.model_fields_set and choice not in ("none", "auto"):
            raise APIError(400, "'tool_choice' needs 'tools' to choose from", param="tool_choice",
                           code="invalid_value")
        return None
    if len(tools) > args.max_tools:
        raise APIError(400, f"'tools' lists {len(tools)} tools; this server accepts at most {args.max_tools}",
                       param="tools", code="too_many_tools")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if tool.function.name in seen:
            raise APIError(400, f"two tools are named {tool.function.name!r}", param=f"tools.{i}.function.name",
                           code="invalid_value")
        seen.add(tool.function.name)
    if choice == "named" and forced_name not in seen:
        raise APIError(400, f"'tool_choice' names {forced_name!r}, which is not in 'tools'",
                       param="tool_choice.function.name", code="invalid_value")
    if choice == "none":
        return None
    size = sum(len(canonical_json(t.function.parameters or {}).encode()) for t in tools)
    if size > args.max_schema_bytes:
        raise APIError(400, f"the tools' parameter schemas are {size} bytes; this server accepts at most "
                            f"{args.max_schema_bytes}", param="tools", code="schema_too_large")
    return ToolContext(tuple(tools), choice, forced_name, req.parallel_tool_calls is not False)


def output_grammar(req: CompletionRequest | ChatCompletionRequest, tools: ToolContext | None, args: AppArgs
                   ) -> tuple[GrammarSpec, str] | None:
    """The grammar the output must follow and the request field to name in errors, or None.

    At most one of response_format / guided_* / structured_outputs. With tools: a forced
    call (tool_choice "required" or named) constrains to the calls (a response_format is
    then for the final answer of a later turn); with "auto", a JSON response_format
    constrains to calls *or* that JSON; other constraints do not combine with tools."""
    found = requested_constraints(req)
    if len(found) > 1:
        (first, _), (second, _) = found[:2]
        raise APIError(400, f"'{second}' cannot be combined with '{first}': give one output constraint",
                       param=second, code="invalid_value")
    param, spec = found[0] if found else (None, None)
    if tools is not None:
        if spec is not None and not tools.forced and spec.kind not in ("json_schema", "json_object"):
            raise APIError(400, f"'{param}' cannot be combined with 'tools' (unless tool_choice is 'none')",
                           param=param, code="invalid_value")
        answer = "" if spec is None or tools.forced else (
            spec.value if spec.kind == "json_schema" else canonical_json({"type": "object"}))
        tools_spec = tools.grammar(answer)
        if tools_spec is None:
            return None  # auto, no response format: the model answers freely, calls are parsed
        spec, param = tools_spec, "tools"
    if spec is None:
        return None
    check_size(spec, param, args)
    if req.ignore_eos:
        raise APIError(400, f"'ignore_eos' cannot be combined with '{param}': the output ends where its grammar "
                            "does", param="ignore_eos", code="invalid_value")
    if req.min_tokens:
        raise APIError(400, f"'min_tokens' cannot be combined with '{param}': the output ends where its grammar "
                            "does", param="min_tokens", code="invalid_value")
    return spec, param

"""Tool calls in OpenAI's chat API on a model that only writes text.

- The prompt: a template that knows tools (it reads `tools` and messages' `tool_calls`)
  gets them through `apply_chat_template`; for one that does not (SmolLM2's, the tiny
  model's), the tool list goes into the system prompt with the format to answer in, past
  calls become that format in the assistant's text, and tool results become user turns.
- The format (Hermes / Qwen style, which small models have seen most):
      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>
  one block per call. When a call is required (`tool_choice` "required" or a named
  function), a grammar forces exactly this, with each tool's parameter schema.
- Reading calls back: `ToolCallParser` turns the model's text into content and calls, as a
  whole or incrementally for streaming (OpenAI's `delta.tool_calls` fragments); both paths
  use the same parser, so a streamed answer reassembles to the unary one. A bare JSON
  object `{"name": ..., "arguments": ...}` (or a list of them) as the whole answer also
  counts as calls (Llama 3.1-style templates), when it names a known tool.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from serve_app.engine.grammar_spec import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_SEPARATOR, GrammarSpec
from serve_app.protocol import (
    ChatTool, FunctionCallDelta, NamedToolChoice, ToolCall, ToolCallDelta, ToolCallFunction,
)

OPEN_TAG = TOOL_CALL_OPEN.strip()  # "<tool_call>"
CLOSE_TAG = TOOL_CALL_CLOSE.strip()  # "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolContext:
    """The tools a chat request offers and how the model must use them."""

    tools: tuple[ChatTool, ...]
    choice: str  # "auto" | "required" | "named"
    forced_name: str | None = None  # choice == "named"
    parallel: bool = True
    json_answer: bool = False  # a JSON response_format too: a bare JSON answer is that, not a call

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t.function.name for t in self.tools)

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")

    def grammar(self, answer_schema: str = "") -> GrammarSpec | None:
        """The grammar that forces calls (required / named): one call, or several with
        `parallel`. `answer_schema` (JSON text, with `auto` only): calls or a JSON answer
        matching it, for requests that give both tools and a response_format."""
        if not self.forced and not answer_schema:
            return None
        tools = [t for t in self.tools if self.choice != "named" or t.function.name == self.forced_name]
        spec = GrammarSpec.tool_calls([(t.function.name, t.function.parameters) for t in tools],
                                      parallel=self.parallel and self.choice != "named")
        if answer_schema and not self.forced:
            spec = spec.model_copy(update={"value": answer_schema})
        return spec


def tool_choice_of(tool_choice: str | NamedToolChoice | None) -> tuple[str, str | None]:
    """(choice, forced name) of a request's tool_choice (tools present)."""
    if isinstance(tool_choice, NamedToolChoice):
        return "named", tool_choice.function.name
    return tool_choice or "auto", None


# ---------------------------------------------------------------- the prompt


def template_supports_tools(tokenizer) -> bool:
    """Whether the chat template renders a `tools` list (it changes the text)."""
    probe = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "probe_tool_xyz", "description": "d",
                                             "parameters": {"type": "object", "properties": {}}}}
    try:
        plain = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        with_tools = tokenizer.apply_chat_template(probe, tools=[tool], tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that fails on tools does not support them
        return False
    return "probe_tool_xyz" in with_tools and with_tools != plain


def tools_system_prompt(ctx: ToolContext) -> str:
    """Instructions and the tools' schemas, for a template without tool support."""
    listing = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False) for t in ctx.tools)
    if ctx.choice == "named":
        rule = f"You must call the function {ctx.forced_name} now."
    elif ctx.choice == "required":
        rule = "You must call one or more of these functions now." if ctx.parallel else \
            "You must call one of these functions now."
    else:
        rule = "Call a function when it helps answer the user; otherwise answer normally."
    example = TOOL_CALL_OPEN + '{"name": "<function name>", "arguments": {<arguments as JSON>}}' + TOOL_CALL_CLOSE
    return (f"You can call functions. Their JSON schemas:\n<tools>\n{listing}\n</tools>\n{rule}\n"
            f"To call a function, answer with one block per call, each a JSON object with its name and "
            f"arguments:\n{example}")


def _call_block(call: ToolCall) -> str:
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        arguments = call.function.arguments
    return TOOL_CALL_OPEN + json.dumps({"name": call.function.name, "arguments": arguments},
                                       ensure_ascii=False) + TOOL_CALL_CLOSE


def template_messages(messages: list, ctx: ToolContext | None, supports_tools: bool) -> tuple[list[dict], list | None]:
    """The conversation as `apply_chat_template` should see it, and its `tools` argument.

    `messages` are protocol ChatMessages. With a tool-aware template, calls and results
    pass through in the Hugging Face form (arguments as objects). Otherwise the template
    sees plain turns: tool instructions in the system prompt (when tools are offered),
    past calls as blocks in the assistant's text, results as user turns."""
    if supports_tools:
        out = []
        for m in messages:
            d: dict[str, Any] = {"role": m.role, "content": m.text() if m.content is not None else None}
            if m.tool_calls:
                d["tool_calls"] = [{"id": c.id, "type": "function",
                                    "function": {"name": c.function.name, "arguments": _arguments_object(c)}}
                                   for c in m.tool_calls]
            if m.role == "tool":
                d["tool_call_id"] = m.tool_call_id
            if m.name:
                d["name"] = m.name
            out.append(d)
        tools = [t.model_dump(exclude_none=True) for t in ctx.tools] if ctx else None
        return out, tools

    out = []
    for m in messages:
        if m.role == "tool":
            result = f"{RESPONSE_OPEN}\n{m.text()}\n{RESPONSE_CLOSE}"
            if out and out[-1].get("_tool_results"):  # parallel results: one turn
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "_tool_results": True})
            continue
        text = m.text()
        if m.tool_calls:
            blocks = TOOL_CALL_SEPARATOR.join(_call_block(c) for c in m.tool_calls)
            text = f"{text}\n{blocks}" if text else blocks
        out.append({"role": m.role, "content": text})
    for d in out:
        d.pop("_tool_results", None)
    if ctx is not None:
        prompt = tools_system_prompt(ctx)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _arguments_object(call: ToolCall):
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments


# ---------------------------------------------------------------- reading calls back

_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


@dataclass
class ParsedOutput:
    """What a whole answer holds: its content (None when only calls) and its calls."""

    content: str | None
    tool_calls: list[ToolCall]


@dataclass
class _Call:
    index: int
    id: str
    name: str
    arguments: str = ""


@dataclass
class ToolCallParser:
    """Splits model text into content and tool calls, incrementally.

    `feed(text)` and `finish()` return the deltas to send: ("content", str) and
    ("tool_call", ToolCallDelta). A call's first fragment carries its id, type and name
    (arguments ""), the next ones pieces of its arguments' JSON text, as the model writes
    them. Whitespace between content and calls is dropped; a block that is not a call of a
    known tool is passed on as content."""

    names: frozenset[str]
    bare_calls: bool = True  # whether a whole answer that is JSON may be calls
    calls: list[_Call] = field(default_factory=list)
    _buffer: str = ""
    _mode: str = "text"  # text | call | arguments | after | bare
    _pending_space: str = ""
    _emitted_content: bool = False
    _args_depth: int = 0
    _args_in_string: bool = False
    _args_escape: bool = False
    _args_started: bool = False

    def feed(self, text: str) -> list[tuple[str, Any]]:
        self._buffer += text
        events: list[tuple[str, Any]] = []
        while True:
            before = (self._mode, len(self._buffer))
            getattr(self, f"_step_{self._mode}")(events, final=False)
            if (self._mode, len(self._buffer)) == before:
                return events

    def finish(self) -> list[tuple[str, Any]]:
        events: list[tuple[str, Any]] = []
        while True:
            before = (self._mode, len(self._buffer))
            getattr(self, f"_step_{self._mode}")(events, final=True)
            if (self._mode, len(self._buffer)) == before:
                break
        if self._buffer and self._mode in ("call", "text"):
            self._content(events, (OPEN_TAG if self._mode == "call" else "") + self._buffer)
        self._buffer = ""
        return events

    # -- content

    def _content(self, events: list, text: str) -> None:
        """Content, with whitespace held back until something else follows it."""
        text = self._pending_space + text
        stripped = text.rstrip()
        self._pending_space = text[len(stripped):]
        if not stripped:
            return
        if not self._emitted_content:
            stripped = stripped.lstrip()
        self._emitted_content = True
        events.append(("content", stripped))

    def _step_text(self, events: list, final: bool) -> None:
        buf = self._buffer
        if self.bare_calls and not self._emitted_content and not self.calls and buf.lstrip()[:1] in ("{", "["):
            self._mode = "bare"  # maybe a bare JSON call: decided at the end
            return
        start = buf.find(OPEN_TAG)
        if start >= 0:
            self._content(events, buf[:start])
            self._pending_space = ""
            self._buffer = buf[start + len(OPEN_TAG):]
            self._mode = "call"
            return
        keep = 0 if final else _partial_suffix(buf, OPEN_TAG)
        if self.bare_calls and not buf.lstrip() and not final:
            keep = len(buf)  # only whitespace so far: a bare JSON answer may still start
        self._content(events, buf[:len(buf) - keep])
        self._buffer = buf[len(buf) - keep:]

    # -- inside <tool_call>

    def _step_call(self, events: list, final: bool) -> None:
        header = _HEADER.match(self._buffer)
        if header and header.end() < len(self._buffer) and self._buffer[header.end()] == "{":
            name = json.loads(f'"{header.group(1)}"')
            if name in self.names:
                call = _Call(len(self.calls), new_call_id(), name)
                self.calls.append(call)
                events.append(("tool_call", ToolCallDelta(index=call.index, id=call.id, type="function",
                                                          function=FunctionCallDelta(name=name, arguments=""))))
                self._buffer = self._buffer[header.end():]
                self._mode = "arguments"
                self._args_depth, self._args_in_string, self._args_escape, self._args_started = 0, False, False, False
                return
        end = self._buffer.find(CLOSE_TAG)
        if end >= 0:  # a whole block that did not stream as a call: parse it whole
            block = self._buffer[:end]
            self._buffer = self._buffer[end + len(CLOSE_TAG):]
            self._mode = "text"
            parsed = _as_call(block, self.names)
            if parsed is None:
                self._content(events, f"{OPEN_TAG}{block}{CLOSE_TAG}")
            else:
                self._emit_whole(events, *parsed)

    def _emit_whole(self, events: list, name: str, arguments: str) -> None:
        call = _Call(len(self.calls), new_call_id(), name, arguments)
        self.calls.append(call)
        events.append(("tool_call", ToolCallDelta(index=call.index, id=call.id, type="function",
                                                  function=FunctionCallDelta(name=name, arguments=""))))
        events.append(("tool_call", ToolCallDelta(index=call.index, function=FunctionCallDelta(arguments=arguments))))

    def _step_arguments(self, events: list, final: bool) -> None:
        """Pass the arguments' JSON text on as it comes, up to where the object closes."""
        taken = 0
        for ch in self._buffer:
            taken += 1
            if self._args_in_string:
                if self._args_escape:
                    self._args_escape = False
                elif ch == "\\":
                    self._args_escape = True
                elif ch == '"':
                    self._args_in_string = False
            elif ch == '"':
                self._args_in_string = True
            elif ch in "{[":
                self._args_depth += 1
                self._args_started = True
            elif ch in "}]":
                self._args_depth -= 1
                if self._args_started and self._args_depth == 0:
                    self._mode = "after"
                    break
        piece, self._buffer = self._buffer[:taken], self._buffer[taken:]
        if piece:
            call = self.calls[-1]
            call.arguments += piece
            events.append(("tool_call", ToolCallDelta(index=call.index, function=FunctionCallDelta(arguments=piece))))

    def _step_after(self, events: list, final: bool) -> None:
        """The rest of the call's block: its closing brace and tag."""
        end = self._buffer.find(CLOSE_TAG)
        if end >= 0:
            self._buffer = self._buffer[end + len(CLOSE_TAG):]
            self._mode = "text"
        elif final:
            self._buffer = ""

    def _step_bare(self, events: list, final: bool) -> None:
        if not final:
            return
        text, self._buffer = self._buffer, ""
        self._mode = "text"
        calls = _as_bare_calls(text, self.names)
        if calls is None:
            self._content(events, text)
        else:
            for name, arguments in calls:
                self._emit_whole(events, name, arguments)

    def tool_calls(self) -> list[ToolCall]:
        return [ToolCall(id=c.id, function=ToolCallFunction(name=c.name, arguments=c.arguments)) for c in self.calls]


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def _call_of(value, names: frozenset[str]) -> tuple[str, str] | None:
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict) or set(value) - {"name", "arguments", "parameters"}:
        return None
    return value["name"], json.dumps(arguments, ensure_ascii=False)


def _as_call(block: str, names: frozenset[str]) -> tuple[str, str] | None:
    try:
        return _call_of(json.loads(block), names)
    except ValueError:
        return None


def _as_bare_calls(text: str, names: frozenset[str]) -> list[tuple[str, str]] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    values = value if isinstance(value, list) else [value]
    calls = [_call_of(v, names) for v in values]
    return calls if calls and all(calls) else None


def parse_output(text: str, names: frozenset[str], bare_calls: bool = True) -> ParsedOutput:
    """A whole answer's content and calls (what streaming would have sent, reassembled)."""
    parser = ToolCallParser(names, bare_calls)
    events = parser.feed(text) + parser.finish()
    content = "".join(piece for kind, piece in events if kind == "content")
    calls = parser.tool_calls()
    return ParsedOutput(content or None if calls else content, calls)

"""Structured output and tool calls end to end: the official openai client against the
served app (Ray, router, replica, engine, the tiny random model). The random model writes
valid JSON and calls only because the engine masks its logits by the request's grammar
(serve_app/engine/constraints.py). test_structured_output.py runs the same scenarios
against the frontend alone."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import TINY

USER = [{"role": "user", "content": "What's the weather in Paris?"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "local_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"]}}}


class Weather(BaseModel):
    # Bounded everywhere: the random tiny model finishes well within max_tokens.
    city: Literal["Paris", "Rome", "Oslo"]
    temperature: int = Field(ge=-50, le=60)
    conditions: Literal["sunny", "cloudy", "rain", "snow"]
    warnings: list[Literal["wind", "heat", "ice"]] = Field(default_factory=list, max_length=2)


SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer", "minimum": 0,
                                                                                     "maximum": 99}},
                                            "required": ["b"]}}, "required": ["a"]},
    {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                      "ok": {"type": "boolean"}, "note": {"type": "string", "maxLength": 10}},
     "required": ["code", "ok"]},
]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_parse_with_a_pydantic_model(client):
    for seed in range(4):
        out = client.chat.completions.parse(model=TINY, messages=USER, response_format=Weather, temperature=1.0,
                                            seed=seed, max_tokens=300)
        assert isinstance(out.choices[0].message.parsed, Weather)
    with client.chat.completions.stream(model=TINY, messages=USER, response_format=Weather, max_tokens=300) as s:
        assert isinstance(s.get_final_completion().choices[0].message.parsed, Weather)


@pytest.mark.parametrize("schema", SCHEMAS, ids=["nested", "array", "pattern"])
@pytest.mark.parametrize("stream", [False, True])
def test_every_sampled_output_validates(client, schema, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    out = client.chat.completions.create(model=TINY, messages=USER, response_format=fmt, temperature=1.0, n=4,
                                         max_tokens=300, stream=stream)
    if stream:
        texts: dict[int, str] = {}
        for chunk in out:
            for choice in chunk.choices:
                texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
        answers = list(texts.values())
    else:
        answers = [c.message.content for c in out.choices]
    assert len(answers) == 4
    for text in answers:
        jsonschema.validate(json.loads(text), schema)


def test_guided_fields_on_completions(client):
    out = client.completions.create(model=TINY, prompt="Sentiment:", max_tokens=20,
                                    extra_body={"guided_choice": ["positive", "negative"]}, n=3)
    assert all(c.text in ("positive", "negative") for c in out.choices)


def test_a_tool_call_and_its_result_sent_back(client):
    messages = list(USER)
    first = client.chat.completions.create(model=TINY, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL],
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           max_tokens=100)
    assert first.choices[0].finish_reason == "tool_calls"
    (call,) = first.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])
    messages += [first.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "18 C, sunny"}]
    second = client.chat.completions.create(model=TINY, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL],
                                            tool_choice="none", max_tokens=20)
    assert second.choices[0].message.content is not None


def test_streamed_tool_call_deltas_reassembled(client):
    with client.chat.completions.stream(model=TINY, messages=USER, tools=[WEATHER_TOOL, TIME_TOOL],
                                        tool_choice="required", parallel_tool_calls=False, max_tokens=200) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        tool = WEATHER_TOOL if call.function.name == "get_weather" else TIME_TOOL
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])

"""Each kind of bad input gets its status and an OpenAI error naming the field; nothing gets a 5xx."""

import json

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import TINY

MSG = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
COMP = "/v1/completions"

CASES = [
    # (route, body, status, param, code)
    (CHAT, {"messages": MSG}, 400, "model", "missing_field"),
    (CHAT, {"model": TINY}, 400, "messages", "missing_field"),
    (CHAT, {"model": TINY, "messages": []}, 400, "messages", "invalid_value"),
    (CHAT, {"model": TINY, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", "invalid_value"),
    (CHAT, {"model": TINY, "messages": "hi"}, 400, "messages", "invalid_value"),
    (CHAT, {"model": TINY, "messages": MSG, "max_tokens": "ten"}, 400, "max_tokens", "invalid_value"),
    (CHAT, {"model": TINY, "messages": MSG, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    (CHAT, {"model": TINY, "messages": MSG, "max_tokens": -3}, 400, "max_tokens", "invalid_value"),
    (CHAT, {"model": TINY, "messages": MSG, "max_tokens": 100000}, 400, "max_tokens", "context_length_exceeded"),
    (CHAT, {"model": TINY, "messages": MSG, "temperature": 7}, 400, "temperature", "invalid_value"),
    (CHAT, {"model": TINY, "messages": MSG, "top_p": 0}, 400, "top_p", "invalid_value"),
    (CHAT, {"model": TINY, "messages": MSG, "n": 0}, 400, "n", "invalid_value"),
    (CHAT, {"model": TINY, "messages": MSG, "n": 2, "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    (CHAT, {"model": TINY, "messages": MSG, "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs", "invalid_value"),
    (CHAT, {"model": TINY, "messages": MSG, "presence_penalty": 2.5}, 400, "presence_penalty", "invalid_value"),
    (CHAT, {"model": TINY, "messages": MSG, "logit_bias": {"abc": 1}}, 400, "logit_bias", "invalid_value"),
    (CHAT, {"model": TINY, "messages": MSG, "logit_bias": {"99999999": 1}}, 400, "logit_bias", "invalid_value"),
    (CHAT, {"model": TINY, "messages": MSG, "max_tokens": 3, "min_tokens": 5}, 400, "min_tokens", None),
    (COMP, {"model": TINY, "prompt": "x", "logprobs": 50}, 400, "logprobs", "invalid_value"),
    (CHAT, {"model": TINY, "messages": MSG, "tools": [{"type": "function"}]}, 400, "tools.0.function", "missing_field"),
    (CHAT, {"model": TINY, "messages": MSG, "functions": [{"name": "f"}]}, 400, "functions", "unsupported_parameter"),
    (CHAT, {"model": TINY, "messages": MSG, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strin"}}}}, 400, "response_format", "invalid_schema"),
    (CHAT, {"model": TINY, "messages": MSG, "frobnicate": 1}, 400, "frobnicate", "unsupported_parameter"),
    (CHAT, {"model": TINY, "messages": MSG, "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    (CHAT, {"model": TINY, "messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    (CHAT, {"model": "gpt-4o", "messages": MSG}, 404, "model", "model_not_found"),
    (COMP, {"model": TINY, "prompt": "word " * 3000}, 400, "prompt", "context_length_exceeded"),
    (COMP, {"model": TINY, "prompt": "hi", "max_tokens": 2047}, 400, "max_tokens", "context_length_exceeded"),
    (COMP, {"model": TINY, "prompt": []}, 400, "prompt", "invalid_value"),
    (COMP, {"model": TINY, "prompt": [1, 2, 3]}, 400, "prompt", "invalid_value"),
    (COMP, {"model": TINY, "prompt": "hi", "echo": True}, 400, "echo", "unsupported_parameter"),
    (COMP, [1, 2], 400, None, "invalid_body"),
    ("/generate", {"prompt": "hi", "max_length": 0}, 400, "max_length", "invalid_value"),
    ("/generate", {"max_length": 5}, 400, "prompt", "missing_field"),
]


@pytest.mark.parametrize("route, body, status, param, code", CASES,
                         ids=[f"{c[0].strip('/').replace('/', '.')}-{c[3]}-{c[4]}" for c in CASES])
def test_bad_input_table(server, route, body, status, param, code):
    r = requests.post(f"{server}{route}", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["code"] == code
    assert error["message"]


def test_oversized_body_is_413(server):
    r = requests.post(f"{server}{COMP}", json={"model": TINY, "prompt": "x" * 70_000}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_bad_timeout_header_is_400(server):
    r = requests.post(f"{server}{COMP}", json={"model": TINY, "prompt": "x"}, headers={"X-Request-Timeout": "soon"},
                      timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Timeout"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
fields = st.sampled_from(["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop",
                          "seed", "stream", "stream_options", "n", "ignore_eos", "user", "max_length"])
bodies = st.dictionaries(fields, json_values, max_size=6).map(lambda d: {**d, "max_tokens": 2}
                                                                if "max_tokens" not in d else d)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from([CHAT, COMP, "/generate"]), body=bodies, with_model=st.booleans())
def test_fuzzed_bodies_never_get_a_5xx(server, route, body, with_model):
    if with_model:
        body = {**body, "model": TINY}
    r = requests.post(f"{server}{route}", data=json.dumps(body), headers={"Content-Type": "application/json"},
                      timeout=60)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}

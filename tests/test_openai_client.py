"""The official OpenAI Python client against the server."""

import openai
import pytest

from tests.conftest import TINY


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_completions_create(client):
    out = client.completions.create(model=TINY, prompt="hello world", max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 5


def test_chat_completions_create(client):
    out = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=5, temperature=0, seed=3)
    assert out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens > 0


def test_chat_stream_matches_the_unary_answer(client):
    kwargs = dict(model=TINY, messages=[{"role": "user", "content": "tell me"}], max_tokens=20, temperature=0)
    unary = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == unary
    assert chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_completion_stream(client):
    chunks = list(client.completions.create(model=TINY, prompt="hello", max_tokens=10, temperature=0,
                                            stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks) == \
        client.completions.create(model=TINY, prompt="hello", max_tokens=10, temperature=0).choices[0].text


def test_client_errors_map_to_openai_exceptions(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=TINY, prompt="x", max_tokens=0)
    assert info.value.body["param"] == "max_tokens"


def test_a_repeated_prefix_is_reported_as_cached_tokens_unless_salted_apart(client):
    system = "You answer questions about parcels. " * 12  # several full KV blocks
    ask = dict(model=TINY, max_tokens=4, temperature=0)
    first = client.chat.completions.create(messages=[{"role": "system", "content": system},
                                                     {"role": "user", "content": "where is it?"}], **ask)
    again = client.chat.completions.create(messages=[{"role": "system", "content": system},
                                                     {"role": "user", "content": "and now?"}], **ask)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= 48 and cached < again.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < cached
    chunks = list(client.chat.completions.create(
        messages=[{"role": "system", "content": system}, {"role": "user", "content": "streamed?"}],
        stream=True, stream_options={"include_usage": True}, **ask))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
    salted = client.chat.completions.create(messages=[{"role": "system", "content": system},
                                                      {"role": "user", "content": "and now?"}],
                                            extra_body={"cache_salt": "tenant-b"}, **ask)
    assert salted.usage.prompt_tokens_details.cached_tokens == 0
    assert salted.choices[0].message.content == again.choices[0].message.content

"""Every route over real HTTP, against the tiny model on a local Ray cluster."""

import concurrent.futures as cf

import requests

from tests.conftest import TINY, model_stats


def chat(server, content, **kw):
    body = {"model": TINY, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, **kw}
    return requests.post(f"{server}/v1/chat/completions", json=body, timeout=60)


def test_health_and_models(server):
    assert requests.get(f"{server}/health", timeout=10).json()["status"] == "ok"
    models = requests.get(f"{server}/v1/models", timeout=10).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [TINY]


def test_completion_shape_and_usage(server):
    r = requests.post(f"{server}/v1/completions", timeout=60,
                      json={"model": TINY, "prompt": "hello world", "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 6
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 6


def test_completion_with_several_prompts_returns_one_choice_each(server):
    r = requests.post(f"{server}/v1/completions", timeout=60,
                      json={"model": TINY, "prompt": ["a", "hello world", "fox"], "max_tokens": 4, "temperature": 0})
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert r.json()["usage"]["completion_tokens"] == 12


def test_chat_completion_shape(server):
    r = chat(server, "hi")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] <= 8


def test_generate_route_of_the_original_design(server):
    r = requests.post(f"{server}/generate", json={"prompt": "hello world", "max_length": 5}, timeout=60)
    assert r.status_code == 200
    text = r.json()["generated_text"]
    assert text.startswith("hello world") and len(text) > len("hello world")


def test_greedy_is_deterministic_across_requests(server):
    assert chat(server, "same question").json()["choices"][0]["message"] == \
        chat(server, "same question").json()["choices"][0]["message"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server):
    prompts = [f"prompt number {i}: the quick brown fox" for i in range(12)]
    def complete(p):
        r = requests.post(f"{server}/v1/completions", timeout=120,
                          json={"model": TINY, "prompt": p, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
        return r.json()["choices"][0]["text"]
    expected = [complete(p) for p in prompts]  # one at a time
    before = model_stats(server)["router"]["batch_size_histogram"]
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(complete, prompts))
    after = model_stats(server)["router"]["batch_size_histogram"]
    assert got == expected
    new_batches = {int(k): v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}
    assert max(new_batches) > 1, f"no batch larger than 1 was formed: {new_batches}"


def test_unknown_route_and_wrong_method_get_openai_errors(server):
    r = requests.get(f"{server}/v1/nope", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = requests.get(f"{server}/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and "error" in r.json()


def test_malformed_body_is_a_400_not_a_500(server):
    r = requests.post(f"{server}/v1/chat/completions", data="{not json", timeout=10,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"

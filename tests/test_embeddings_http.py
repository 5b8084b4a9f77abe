"""Several models in one app over real HTTP: a chat model and two embedding models (the same
weights under two names, the second with room for one request), chosen by `model`."""

import base64
import concurrent.futures as cf
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openai
import pytest
import requests
from ray import serve

from serve_app.app import build_app
from serve_app.engine.builtin_models import resolve_model_path
from tests.conftest import MINILM, TINY, model_stats

TIGHT = "minilm-one-slot"
MODELS = [
    {"model": TINY, "num_cpus": 0, "num_gpus": 0, "max_batch_size": 8, "batch_wait_timeout_s": 0.05,
     "max_queue_len": 64},
    {"model": MINILM, "num_cpus": 0, "num_gpus": 0, "max_queue_len": 64},
    {"model": MINILM, "served_model_name": TIGHT, "num_cpus": 0, "num_gpus": 0, "max_batch_size": 1,
     "max_queue_len": 1},
]
DOCS = ["The cat sits on the mat.", "Stock markets fell sharply on Monday.", "A kitten is resting on a rug.",
        "The recipe needs two eggs and flour.", "Interest rates and inflation moved the markets."]
EMBED = "/v1/embeddings"


@pytest.fixture(scope="module")
def multi(ray_cluster):
    serve.run(build_app({"models": MODELS, "retry_after_s": 2}), name="multi", route_prefix="/multi")
    yield f"{ray_cluster}/multi"
    serve.delete("multi")


@pytest.fixture(scope="module")
def reference():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(resolve_model_path(MINILM), device="cpu")


def embed(base, model=MINILM, timeout=60, headers=None, **body):
    return requests.post(f"{base}{EMBED}", json={"model": model, **body}, timeout=timeout, headers=headers)


def vectors(response_json) -> np.ndarray:
    rows = [d["embedding"] for d in sorted(response_json["data"], key=lambda d: d["index"])]
    return np.array([np.frombuffer(base64.b64decode(r), "<f4") if isinstance(r, str) else r for r in rows],
                    dtype=np.float32)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def test_models_health_and_stats_list_every_model(multi):
    cards = {c["id"]: c for c in requests.get(f"{multi}/v1/models", timeout=10).json()["data"]}
    assert list(cards) == [TINY, MINILM, TIGHT]
    assert cards[MINILM]["dimensions"] == 384 and cards[MINILM]["max_model_len"] == 256
    assert cards[TINY]["max_model_len"] == 2048 and "dimensions" not in cards[TINY]
    health = requests.get(f"{multi}/health", timeout=10).json()
    assert health["status"] == "ok" and health["ready_replicas"] == {TINY: 1, MINILM: 1, TIGHT: 1}
    stats = requests.get(f"{multi}/stats?replicas=1", timeout=30).json()["models"]
    assert {n: s["task"] for n, s in stats.items()} == {TINY: "generate", MINILM: "embed", TIGHT: "embed"}
    assert stats[MINILM]["router"]["replica_info"][0]["dimensions"] == 384
    assert stats[TINY]["router"]["replica_info"][0]["kv_cache_blocks"] > 0


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_vectors_over_http_equal_sentence_transformers(multi, reference, encoding_format):
    r = embed(multi, input=DOCS, encoding_format=encoding_format)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == MINILM
    assert [d["index"] for d in body["data"]] == list(range(len(DOCS)))
    assert min_cosine(vectors(body), reference.encode(DOCS)) >= 0.999
    single = embed(multi, input=DOCS[0], encoding_format=encoding_format).json()
    assert min_cosine(vectors(single), reference.encode(DOCS[:1])) >= 0.999
    assert single["usage"]["prompt_tokens"] == single["usage"]["total_tokens"] == 9


def test_openai_client_embeddings_create_and_a_semantic_search(multi, reference):
    client = openai.OpenAI(base_url=f"{multi}/v1", api_key="unused", max_retries=0)
    docs = client.embeddings.create(model=MINILM, input=DOCS)  # the client asks for base64 and decodes it
    query = client.embeddings.create(model=MINILM, input="Where is the cat sleeping?", encoding_format="float")
    doc_vectors = np.array([d.embedding for d in docs.data])
    assert min_cosine(doc_vectors, reference.encode(DOCS)) >= 0.999
    scores = doc_vectors @ np.array(query.data[0].embedding)
    assert [DOCS[i] for i in np.argsort(-scores)[:2]] == [DOCS[0], DOCS[2]]
    assert docs.usage.prompt_tokens > 0 and len(query.data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MINILM, input="x", dimensions=128)
    assert info.value.body["param"] == "dimensions"


def test_the_same_weights_under_another_name_give_the_same_vectors(multi):
    a = vectors(embed(multi, input=DOCS[:2]).json())
    b = embed(multi, model=TIGHT, input=DOCS[:2]).json()
    assert b["model"] == TIGHT and np.allclose(a, vectors(b), atol=1e-5)


@pytest.mark.parametrize("route, body, status, param, code", [
    (EMBED, {"model": "text-embedding-3-small", "input": "x"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model",
     "model_not_found"),
    (EMBED, {"model": TINY, "input": "x"}, 400, "model", "model_not_supported"),
    ("/v1/chat/completions", {"model": MINILM, "messages": [{"role": "user", "content": "x"}]}, 400, "model",
     "model_not_supported"),
    ("/v1/completions", {"model": MINILM, "prompt": "x"}, 400, "model", "model_not_supported"),
    (EMBED, {"input": "x"}, 400, "model", "missing_field"),
    (EMBED, {"model": MINILM, "input": []}, 400, "input", "invalid_value"),
    (EMBED, {"model": MINILM, "input": ["fine", 7]}, 400, "input.1", "invalid_value"),
    (EMBED, {"model": MINILM, "input": [[101, 102], [101, 10**9]]}, 400, "input.1", "invalid_value"),
    (EMBED, {"model": MINILM, "input": "word " * 300}, 400, "input", "context_length_exceeded"),
    (EMBED, {"model": MINILM, "input": "x", "encoding_format": "binary"}, 400, "encoding_format", "invalid_value"),
])
def test_wrong_model_and_bad_inputs_get_openai_errors(multi, route, body, status, param, code):
    r = requests.post(f"{multi}{route}", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and (error["param"], error["code"]) == (param, code)
    if status == 404:
        assert all(name in error["message"] for name in (TINY, MINILM, TIGHT))  # names what is served


def test_chat_and_embeddings_at_once_each_get_their_own_answers(multi, reference):
    """Concurrent load on both models: every answer equals the one given alone."""
    prompts = [f"question {i}: what is the capital of France?" for i in range(6)]

    def chat(prompt):
        r = requests.post(f"{multi}/v1/chat/completions", timeout=120, json={
            "model": TINY, "messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 0,
            "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    def embedding(i):
        texts = DOCS[i % len(DOCS):] or DOCS
        r = embed(multi, input=texts if i % 2 else texts[0], encoding_format="base64" if i % 3 else "float")
        assert r.status_code == 200, r.text
        return texts if i % 2 else texts[:1], vectors(r.json())

    alone = [chat(p) for p in prompts]
    with cf.ThreadPoolExecutor(40) as pool:
        chats = [pool.submit(chat, p) for p in prompts]
        embeddings = [pool.submit(embedding, i) for i in range(32)]
        assert [f.result() for f in chats] == alone
        for f in embeddings:
            texts, got = f.result()
            assert min_cosine(got, reference.encode(texts)) >= 0.999
    info = model_stats(multi, MINILM, replicas=True)["router"]["replica_info"][0]
    assert info["inputs_per_forward_mean"] > 1  # concurrent requests shared forwards


def test_a_full_embedding_queue_answers_429_with_retry_after(multi):
    long_inputs = ["words of a longer document " * 30] * 48  # about 160 tokens each: ~1 s per request here

    def send(_):
        r = embed(multi, model=TIGHT, input=long_inputs, timeout=120)
        return r.status_code, r.headers.get("Retry-After"), r.json()

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, range(8)))
    statuses = sorted(s for s, _, _ in results)
    assert set(statuses) == {200, 429}, statuses  # one runs, one waits, the rest bounce
    for status, retry_after, body in results:
        if status == 429:
            assert retry_after == "2" and body["error"]["code"] == "queue_full"
        else:
            assert len(body["data"]) == 48
    assert model_stats(multi, TIGHT)["router"]["rejected"] >= statuses.count(429)


def test_the_request_deadline_stops_an_embedding_request(multi):
    stats = lambda: model_stats(multi, TIGHT, replicas=True)["router"]  # noqa: E731
    before = stats()["replica_info"][0]["inputs_embedded"]
    big = ["another fairly long document to embed " * 30] * 400  # ~10 s of forwards here
    r = embed(multi, model=TIGHT, input=big, headers={"X-Request-Timeout": "0.5"})
    assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
    deadline = time.monotonic() + 20
    while stats()["in_flight_sequences"] or stats()["replica_info"][0]["in_flight_inputs"]:
        assert time.monotonic() < deadline, stats()
        time.sleep(0.25)
    assert stats()["replica_info"][0]["inputs_embedded"] - before < len(big)  # the rest was skipped
    assert embed(multi, model=TIGHT, input="still serving").status_code == 200


def test_handle_embeddings_from_python(multi, reference):
    handle = serve.get_app_handle("multi")
    out = handle.embeddings.remote({"model": MINILM, "input": DOCS[:2]}).result()
    assert min_cosine(vectors(out), reference.encode(DOCS[:2])) >= 0.999


def test_cli_embed_ranks_and_status_shows_each_model(multi):
    cli = str(Path(sys.executable).with_name("serve-app"))
    run = lambda *a: subprocess.run([cli, "--url", multi, *a], capture_output=True, text=True, timeout=120)  # noqa: E731
    ranked = run("embed", *DOCS, "--query", "a sleeping kitten")
    assert ranked.returncode == 0, ranked.stderr
    scores, texts = zip(*(line.split("  ", 1) for line in ranked.stdout.strip().splitlines()))
    assert sorted(texts) == sorted(DOCS) and texts[0] in (DOCS[2], DOCS[0])  # the cat and kitten documents
    assert list(scores) == sorted(scores, key=float, reverse=True)
    raw = run("embed", "hello", "world")
    assert raw.returncode == 0 and [len(json.loads(line)) for line in raw.stdout.splitlines()] == [384, 384]
    status = run("status")
    assert status.returncode == 0, status.stderr
    for name in (TINY, MINILM, TIGHT):
        assert f"model {name} (" in status.stdout


def test_metrics_carry_the_model_name(multi, metrics_url):
    assert embed(multi, input="count me").status_code == 200
    assert requests.post(f"{multi}/v1/completions", json={"model": TINY, "prompt": "count me", "max_tokens": 2},
                         timeout=60).status_code == 200
    deadline = time.monotonic() + 30
    while True:
        names = set()
        for line in requests.get(metrics_url, timeout=10).text.splitlines():
            match = re.match(r"(ray_\w+)\{([^}]*)\}", line)
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2))) if match else {}
            if labels.get("application") == "multi" and "model_name" in labels:
                names.add((match.group(1), labels["model_name"]))
        wanted = {("ray_vllm_e2e_request_latency_seconds_count", MINILM),
                  ("ray_vllm_e2e_request_latency_seconds_count", TINY),
                  ("ray_serve_app_router_queue_length", MINILM),
                  ("ray_vllm_iteration_tokens_total_count", MINILM),
                  ("ray_vllm_iteration_tokens_total_count", TINY)}
        if wanted <= names or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert wanted <= names, wanted - names

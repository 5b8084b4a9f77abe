"""The contract with a new user: `serve run serve_config.yaml` answers a chat completion
from the default offline chat model (SmolLM2-135M-Instruct) and embeds with the default
offline embedding model (all-MiniLM-L6-v2), side by side in one app."""

import numpy as np
import pytest
import requests
import yaml

from tests.conftest import free_port
from tests.serve_run import ROOT, serve_run


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port  # the only change: a free port
    base = f"http://127.0.0.1:{port}"
    with serve_run(config, tmp_path_factory.mktemp("cfg"), base):
        yield base, [m["model"] for m in config["applications"][0]["args"]["models"]]


def test_default_config_answers_a_chat_completion(default_server):
    base, (chat_model, _) = default_server
    r = requests.post(f"{base}/v1/chat/completions", timeout=120, json={
        "model": chat_model, "temperature": 0, "max_tokens": 40,
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]})
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["message"]["content"]


def test_default_config_embeds_for_semantic_search(default_server):
    base, (_, embedding_model) = default_server
    docs = ["Paris is the capital of France.", "The stock market fell today.", "Berlin is Germany's capital."]
    r = requests.post(f"{base}/v1/embeddings", timeout=120,
                      json={"model": embedding_model, "input": [*docs, "Which city is France's capital?"]})
    assert r.status_code == 200, r.text
    vectors = np.array([d["embedding"] for d in r.json()["data"]])
    assert vectors.shape == (4, 384)
    assert int(np.argmax(vectors[:3] @ vectors[3])) == 0

"""The contract with a new user: `serve run serve_config.yaml` answers a chat
completion from the default offline model (SmolLM2-135M-Instruct)."""

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
        yield base, config["applications"][0]["args"]["model"]


def test_default_config_answers_a_chat_completion(default_server):
    base, model = default_server
    r = requests.post(f"{base}/v1/chat/completions", timeout=120, json={
        "model": model, "temperature": 0, "max_tokens": 40,
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]})
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["message"]["content"]

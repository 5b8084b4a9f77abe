"""The contract with a new user: `serve run serve_config.yaml` answers a chat
completion from the default offline model (SmolLM2-135M-Instruct)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port  # the only change: a free port
    path = tmp_path_factory.mktemp("cfg") / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    serve_bin = Path(sys.executable).with_name("serve")
    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own cluster, like a user's first run
    proc = subprocess.Popen([str(serve_bin), "run", str(path)], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # first start converts the GGUF weights once (~30 s)
    try:
        while True:
            try:
                if requests.get(f"{base}/health", timeout=2).ok:
                    break
            except requests.RequestException:  # proxy not up, or up before the app
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"serve run did not come up:\n{proc.stdout.read()[-4000:]}")
            time.sleep(1)
        yield base, config["applications"][0]["args"]["model"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_default_config_answers_a_chat_completion(default_server):
    base, model = default_server
    r = requests.post(f"{base}/v1/chat/completions", timeout=120, json={
        "model": model, "temperature": 0, "max_tokens": 40,
        "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]})
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["message"]["content"]

"""Calling the app through a DeploymentHandle from another Ray job (no HTTP)."""

import subprocess
import sys
import textwrap

import ray

SCRIPT = textwrap.dedent('''
    import sys, ray
    from ray import serve
    from serve_app.protocol import APIError
    ray.init(address=sys.argv[1], log_to_driver=False)
    handle = serve.get_app_handle("serve_app")
    body = {"model": "builtin:tiny-llama", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 6, "temperature": 0}
    unary = handle.chat.remote(body).result()
    chunks = list(handle.options(stream=True).chat_stream.remote(body))
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == unary["choices"][0]["message"]["content"], (streamed, unary)
    try:
        handle.chat.remote({**body, "model": "other"}).result()
        raise SystemExit("expected an error")
    except APIError as e:
        assert e.status == 404, e.status
    print("OK", unary["usage"]["completion_tokens"], len(chunks))
''')


def test_handle_from_a_separate_ray_job(server):
    address = ray.get_runtime_context().gcs_address
    out = subprocess.run([sys.executable, "-c", SCRIPT, address], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK 6" in out.stdout

"""Shared fixtures: the tiny offline model, and one local Ray cluster per session."""

from __future__ import annotations

import functools
import socket
import time

import pytest

from serve_app.config import ModelServingArgs, deployment_slug

TINY = "builtin:tiny-llama"
MINILM = "builtin:all-minilm-l6-v2"
# The app most integration tests talk to: small batches, a short batching window.
APP_ARGS = dict(model=TINY, num_cpus=0, num_gpus=0, max_batch_size=8, batch_wait_timeout_s=0.05,
                max_queue_len=64, max_body_bytes=64_000)


def deployment(part: str, model: str = TINY) -> str:
    """The Serve deployment name of a model's Router or replicas: deployment("Router") = "Router-builtin-tiny-llama"."""
    return f"{part}-{deployment_slug(model)}"


def model_stats(base: str, model: str = TINY, replicas: bool = False, **kw) -> dict:
    """One model's part of `/stats` (its "router" counters, with "replica_info" when `replicas`)."""
    import requests

    r = requests.get(f"{base}/stats{'?replicas=1' if replicas else ''}", timeout=kw.pop("timeout", 30), **kw)
    return r.json()["models"][model]


def wait_for(predicate, timeout: float, what: str, timeline: list | None = None, sample=None):
    """Poll `predicate` every 0.5 s; fail the test after `timeout` s (with `sample()`'s values
    at each poll when a `timeline` list is given). Returns the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if timeline is not None:
            timeline.append((round(time.monotonic() - start, 1), *sample()))
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}; timeline={timeline}")
        time.sleep(0.5)
    return time.monotonic() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_model():
    from serve_app.engine.loading import load_model

    return load_model(TINY)


def random_llama(tokenizer, initializer_range: float, intermediate_size: int = 128):
    """A 2-layer random Llama over `tokenizer` (4 heads, 2 KV heads); its init scale decides how
    its greedy output behaves (see lively_model and test_speculation's looping model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def reference_decode_attention(q, k_cache, v_cache, tables, lens, scale: float):
    """Softmax attention of each row's query [Hq, D] over the first lens[n] positions of its blocks
    (tables [n, W] into caches [blocks, block_size, Hkv, D]), in float32, keys repeated per query
    head (transformers' repeat_kv): what the paged decode paths must equal. -> [n, Hq, D]."""
    import torch

    groups = q.shape[1] // k_cache.shape[2]
    out = []
    for n in range(q.shape[0]):
        keys = k_cache[tables[n]].float().flatten(0, 1)[:lens[n]].repeat_interleave(groups, 1)
        values = v_cache[tables[n]].float().flatten(0, 1)[:lens[n]].repeat_interleave(groups, 1)
        weights = (torch.einsum("hd,lhd->hl", q[n].float(), keys) * scale).softmax(-1)
        out.append(torch.einsum("hl,lhd->hd", weights, values))
    return torch.stack(out)


def engine_factory(model, tokenizer):
    """make(max_model_len=2048, **ModelServingArgs fields) -> a BatchEngine on this model, configured as the
    app would be with those settings (the engine's defaults are the app's: see factory.engine_config)."""
    from serve_app.engine.batch_engine import BatchEngine
    from serve_app.engine.factory import engine_config
    from serve_app.engine.loading import eos_token_ids

    def make(max_model_len: int = 2048, **app_args) -> BatchEngine:
        config = engine_config(ModelServingArgs(**{"max_batch_size": 8, **app_args}), "cpu", max_model_len)
        return BatchEngine(model, tokenizer, eos_token_ids(model, tokenizer), config)

    return make


def token_texts(tokenizer) -> list[str]:
    return [tokenizer.decode([t]) for t in range(len(tokenizer))]


def closing_bonus(tokenizer):
    """1 for the tokens that close JSON things (quotes, brackets, commas) and EOS, else 0."""
    import torch

    bonus = torch.tensor([1.0 if any(c in text for c in '"}],') else 0.0 for text in token_texts(tokenizer)])
    bonus[tokenizer.eos_token_id] = 1.0
    return bonus


def grammar_walk(state, tokenizer, seed: int, max_steps: int = 400, closers=None) -> list[int]:
    """What a model under a grammar could write: sample at temperature 1 from random logits
    masked by `state` (serve_app.engine.grammar) until EOS. After 20 tokens the `closers`
    (closing_bonus) get a growing bonus, so that walks through unbounded strings and numbers end."""
    import torch

    from serve_app.engine.grammar import apply_masks

    gen = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    for step in range(max_steps):
        logits = torch.randn(1, len(tokenizer), generator=gen)
        if closers is not None and step > 20:
            logits[0] += closers * (step - 20) * 0.5
        assert apply_masks(logits, [0], [state]) == []
        token = int(torch.multinomial(logits[0].softmax(-1), 1, generator=gen))
        assert state.accept(token), (token, tokenizer.decode(tokens))
        tokens.append(token)
        if state.is_finished:
            return tokens
    pytest.fail(f"walk did not finish in {max_steps} tokens: {tokenizer.decode(tokens)!r}")


@pytest.fixture(scope="session")
def lively_model(tiny_model):
    """The tiny model's tokenizer with a random Llama whose greedy output varies from token to
    token (larger init than the built-in one, whose output repeats): equality tests can fail."""
    tokenizer = tiny_model[1]
    return random_llama(tokenizer, 0.3), tokenizer


@pytest.fixture(scope="session", params=["native", "transformers"])
def tiny_engine_factory(lively_model, request):
    """Engines on the lively model, once with each model runner: our own Llama forward and
    transformers' module (the fallback for other architectures) pass the same engine tests."""
    make = engine_factory(*lively_model)
    return functools.partial(make, runner=request.param)


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster for the whole session (startup costs ~10 s). Two logical
    GPUs exist so GPU pinning can be tested on a CPU-only machine."""
    import ray
    from ray import serve

    from serve_app import ray_env

    ray_env.apply()  # the settings `make serve` runs with
    global METRICS_PORT
    METRICS_PORT = free_port()
    # Metrics every second (Ray's default is 10 s), so metric tests wait little.
    ray.init(num_cpus=8, num_gpus=2, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=METRICS_PORT, _system_config={"metrics_report_interval_ms": 1000})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


METRICS_PORT = 0


@pytest.fixture(scope="session")
def metrics_url(ray_cluster) -> str:
    """Ray's Prometheus endpoint on this node (what a Prometheus server would scrape)."""
    return f"http://127.0.0.1:{METRICS_PORT}/metrics"


@pytest.fixture(scope="session")
def server(ray_cluster) -> str:
    """Base URL of the default test app (tiny model, one CPU replica)."""
    from ray import serve

    from serve_app.app import build_app

    serve.run(build_app(APP_ARGS), name="serve_app", route_prefix="/")
    return ray_cluster

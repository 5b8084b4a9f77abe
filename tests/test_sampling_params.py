"""The sampling parameters OpenAI/vLLM clients send: penalties, logit_bias, min_tokens,
logprobs, n. Each applies to its own row of a mixed batch only."""

import json
import math

import pytest
import requests
import torch

from serve_app.engine.sampling import process_logits
from serve_app.engine.types import GenerationRequest, SamplingParams
from tests.conftest import TINY
from tests.test_engine import run


def greedy(rid, ids, n=8, **kw):
    return GenerationRequest(request_id=rid, prompt_token_ids=ids,
                             params=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw))


@pytest.fixture
def encode(lively_model):
    return lambda text: lively_model[1](text)["input_ids"]


def test_penalties_and_bias_change_logits_as_defined():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, -2.0, -2.0], [0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    params = [SamplingParams(presence_penalty=0.3, frequency_penalty=0.5),
              SamplingParams(repetition_penalty=2.0),
              SamplingParams(logit_bias={1: 100.0, 3: -100.0}),
              SamplingParams(min_tokens=2)]
    histories = [([9], [0, 0, 2]), ([1], [3]), ([], []), ([], [0])]
    out = process_logits(logits.clone(), params, histories, eos_token_ids=[2])
    assert torch.allclose(out[0], torch.tensor([1 - 2 * 0.5 - 0.3, 1.0, 1 - 0.5 - 0.3, 1.0]))  # output tokens only
    assert torch.allclose(out[1], torch.tensor([2.0, 1.0, -2.0, -4.0]))  # prompt and output tokens
    assert torch.allclose(out[2], torch.tensor([0.0, 100.0, 0.0, -100.0]))
    assert out[3][2] == -math.inf and out[3][0] == 5.0  # EOS impossible before min_tokens
    untouched = process_logits(logits.clone(), [SamplingParams()] * 4, histories, eos_token_ids=[2])
    assert torch.equal(untouched, logits)


def test_logprobs_are_the_models_log_softmax(tiny_engine_factory, lively_model, encode):
    model = lively_model[0]
    engine = tiny_engine_factory()
    prompt = encode("The quick brown fox")
    result = run(engine, [greedy("a", prompt, n=5, logprobs=3)])["a"]
    tokens = result[1]
    assert tokens
    # Re-run to collect every step's logprobs (run() keeps only the final delta's).
    engine.add(greedy("b", prompt, n=5, logprobs=3))
    steps = []
    while engine.has_work:
        for out in engine.step():
            steps += out.logprobs or []
    assert len(steps) == len(tokens)
    with torch.inference_mode():
        model.set_attn_implementation("sdpa")
        for t, (chosen, top) in enumerate(steps):
            ids = torch.tensor([prompt + tokens[:t]])
            ref = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
            assert chosen == pytest.approx(ref[tokens[t]].item(), abs=1e-4)
            assert [i for i, _ in top] == ref.topk(3).indices.tolist()
            assert top[0][0] == tokens[t]  # greedy: the chosen token is the most likely one


def test_min_tokens_holds_eos_back(tiny_engine_factory, encode):
    engine = tiny_engine_factory()
    eos = next(iter(engine.eos_token_ids))
    prompt = encode("hello")
    force_eos = {eos: 100.0}
    eager = GenerationRequest(request_id="eager", prompt_token_ids=prompt, params=SamplingParams(
        max_tokens=20, temperature=0, logit_bias=force_eos))
    held = GenerationRequest(request_id="held", prompt_token_ids=prompt, params=SamplingParams(
        max_tokens=20, temperature=0, logit_bias=force_eos, min_tokens=5))
    results = run(engine, [eager, held])
    assert results["eager"][2].finish_reason == "stop" and results["eager"][2].completion_tokens == 1
    assert results["held"][2].finish_reason == "stop" and results["held"][2].completion_tokens == 6
    assert eos not in results["held"][1][:5]


def test_processed_rows_leave_their_neighbours_greedy_output_unchanged(tiny_engine_factory, encode):
    engine = tiny_engine_factory()
    plain = [greedy(f"plain{i}", encode(p)) for i, p in enumerate(["a b c", "The cat sat", "1 2 3 4"])]
    alone = {r.request_id: run(engine, [r])[r.request_id][1] for r in plain}
    others = [greedy("pen", encode("a b c"), presence_penalty=1.5, frequency_penalty=1.0, repetition_penalty=1.3),
              greedy("bias", encode("The cat sat"), logit_bias={5: 50.0}),
              greedy("lp", encode("1 2 3 4"), logprobs=5),
              GenerationRequest(request_id="hot", prompt_token_ids=encode("x"),
                                params=SamplingParams(max_tokens=8, temperature=1.5, seed=3, min_tokens=4))]
    together = run(engine, plain + others)
    for r in plain:
        assert together[r.request_id][1] == alone[r.request_id]
    assert set(together["bias"][1]) == {5}  # a +50 bias wins every step
    assert together["pen"][1] != alone["plain0"]  # penalties changed the choice


# ------------------------------------------------------------------ over HTTP


def test_n_choices_are_separate_and_seeded_reproducible(server):
    body = {"model": TINY, "prompt": ["one", "two"], "max_tokens": 6, "n": 3, "temperature": 1.0, "seed": 7,
            "ignore_eos": True}
    first = requests.post(f"{server}/v1/completions", json=body, timeout=60).json()
    again = requests.post(f"{server}/v1/completions", json=body, timeout=60).json()
    assert [c["index"] for c in first["choices"]] == list(range(6))
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in again["choices"]]
    assert len({c["text"] for c in first["choices"][:3]}) > 1  # each choice its own sample
    assert first["usage"]["completion_tokens"] == 6 * 6


def test_chat_logprobs_and_streamed_n(server):
    body = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2, "temperature": 0}
    reply = requests.post(f"{server}/v1/chat/completions", json=body, timeout=60).json()
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"] == 5
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in content)
    assert content[0]["token"] == content[0]["top_logprobs"][0]["token"]  # greedy picks the top token
    r = requests.post(f"{server}/v1/chat/completions", json={**body, "n": 2, "stream": True}, stream=True, timeout=60)
    chunks = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
              if line.startswith("data: {")]
    indices = {c["choices"][0]["index"] for c in chunks if c["choices"]}
    assert indices == {0, 1}
    streamed = [e for c in chunks if c["choices"] and c["choices"][0].get("logprobs")
                for e in c["choices"][0]["logprobs"]["content"]]
    assert len(streamed) == 10


def test_completion_logprobs_streamed(server):
    body = {"model": TINY, "prompt": "hello", "max_tokens": 4, "ignore_eos": True, "logprobs": 1, "stream": True}
    r = requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=60)
    chunks = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True) if line.startswith("data: {")]
    lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert sum(len(lp["token_logprobs"]) for lp in lps) == 4
    assert all(len(top) == 1 for lp in lps for top in lp["top_logprobs"])

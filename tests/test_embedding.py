"""Embeddings without Ray: our pooling and batching against sentence-transformers' own `encode`,
and the request checks of /v1/embeddings (each bad input a 400 naming its field)."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest

from serve_app.config import AppArgs
from serve_app.embeddings import EmbeddingFrontend
from serve_app.engine.builtin_models import resolve_model_path
from serve_app.engine.embedding import EmbeddingEngine, EmbeddingModel, micro_batches, read_spec
from serve_app.protocol import APIError
from tests.conftest import MINILM, TINY

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Semantic search ranks documents by the meaning of a query, not by the words they share with it; "
    "a longer input pads the short ones when they share a forward, which pooling must ignore.",
    "Ray Serve",
]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


class LocalBackend:
    """The engine in this process, where the app has a Router and a replica."""

    def __init__(self, engine: EmbeddingEngine):
        self.engine = engine
        self.calls: list[list[list[int]]] = []

    async def embed(self, inputs):
        self.calls.append(inputs)
        return await self.engine.embed(inputs)


def make_frontend(model: str, token_budget: int = 8192, **args) -> tuple[EmbeddingFrontend, LocalBackend]:
    from transformers import AutoTokenizer

    loaded = EmbeddingModel.load(model)
    backend = LocalBackend(EmbeddingEngine(loaded, token_budget=token_budget))
    (serving,) = AppArgs.model_validate({"model": model, "task": "embed", **args}).serving_args()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
    return EmbeddingFrontend(serving, tokenizer, loaded.spec, backend), backend


def request(frontend: EmbeddingFrontend, **body) -> dict:
    body = {"model": frontend.model_name, **body}
    return asyncio.run(frontend.embeddings(frontend.prepare(body)))


def vectors_of(response: dict) -> np.ndarray:
    rows = []
    for item in sorted(response["data"], key=lambda d: d["index"]):
        value = item["embedding"]
        rows.append(np.frombuffer(base64.b64decode(value), dtype="<f4") if isinstance(value, str) else value)
    return np.array(rows, dtype=np.float32)


@pytest.fixture(scope="module")
def minilm():
    from sentence_transformers import SentenceTransformer

    path = resolve_model_path(MINILM)
    # A small token budget: the six sentences take several forwards of different widths.
    frontend, backend = make_frontend(MINILM, token_budget=48)
    return frontend, backend, SentenceTransformer(path, device="cpu")


# ------------------------------------------------------------------ the built-in model


def test_builtin_minilm_is_the_sentence_transformers_model():
    spec = read_spec(MINILM)
    assert (spec.pooling, spec.normalize, spec.dimensions, spec.max_model_len) == ("mean", True, 384, 256)
    assert spec.matryoshka_dimensions is None


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_vectors_equal_sentence_transformers_single_and_batched(minilm, encoding_format):
    frontend, backend, st = minilm
    expected = st.encode(SENTENCES)
    batched = vectors_of(request(frontend, input=SENTENCES, encoding_format=encoding_format))
    assert batched.shape == (len(SENTENCES), 384)
    assert cosines(batched, expected).min() >= 0.999
    np.testing.assert_allclose(batched, expected, atol=1e-5)
    single = vectors_of(request(frontend, input=SENTENCES[4], encoding_format=encoding_format))
    assert cosines(single, expected[4:5]).min() >= 0.999
    assert backend.engine.stats.forwards > 2  # the budget of 48 tokens cut the batch into micro-batches


def test_semantic_neighbours_rank_first(minilm):
    frontend, _, _ = minilm
    v = vectors_of(request(frontend, input=SENTENCES[:4]))
    scores = v[1:] @ v[0]
    assert int(np.argmax(scores)) == 0  # "eating a piece of bread" is nearest "eating food"


def test_usage_counts_every_token_and_token_ids_give_the_same_vector(minilm):
    frontend, _, _ = minilm
    ids = frontend.tokenizer(SENTENCES[0])["input_ids"]
    by_text = request(frontend, input=SENTENCES[0])
    by_ids = request(frontend, input=ids)
    by_id_lists = request(frontend, input=[ids, ids])
    assert by_text["usage"] == {"prompt_tokens": len(ids), "total_tokens": len(ids)}
    assert by_id_lists["usage"]["prompt_tokens"] == 2 * len(ids)
    np.testing.assert_allclose(vectors_of(by_ids), vectors_of(by_text), atol=1e-6)
    assert len(by_id_lists["data"]) == 2 and by_text["object"] == "list" and by_text["model"] == MINILM


def test_truncation_when_asked(minilm):
    frontend, _, st = minilm
    long_text = " ".join(["word"] * 400)
    with pytest.raises(APIError) as err:
        frontend.prepare({"model": MINILM, "input": long_text})
    assert (err.value.status, err.value.param, err.value.code) == (400, "input", "context_length_exceeded")
    # -1: the model's own limit, which is where sentence-transformers truncates silently.
    got = request(frontend, input=long_text, truncate_prompt_tokens=-1)
    assert got["usage"]["prompt_tokens"] == 256
    assert cosines(vectors_of(got), st.encode([long_text])).min() >= 0.999
    assert request(frontend, input=long_text, truncate_prompt_tokens=10)["usage"]["prompt_tokens"] == 10


# ------------------------------------------------------------------ pooling as declared


def sentence_transformers_folder(tmp_path, kind: str, pooling: str, normalize: bool):
    """A small random model saved with a sentence-transformers layout (modules.json, pooling)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tests.conftest import random_llama

    folder = tmp_path / f"{kind}-{pooling}"
    torch.manual_seed(0)
    if kind == "bert":
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
        model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128))
    else:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(TINY))
        model = random_llama(tokenizer, 0.3)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": model.config.hidden_size, "pooling_mode_cls_token": pooling == "cls",
         "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max",
         "pooling_mode_lasttoken": pooling == "lasttoken"}))
    return str(folder)


@pytest.mark.parametrize("kind, pooling, normalize", [
    ("bert", "cls", False), ("bert", "max", True), ("bert", "mean", False), ("llama", "lasttoken", True),
])
def test_pooling_matches_sentence_transformers(tmp_path, kind, pooling, normalize):
    from sentence_transformers import SentenceTransformer

    folder = sentence_transformers_folder(tmp_path, kind, pooling, normalize)
    texts = ["hello world", "The quick brown fox jumps over the lazy dog.", "Paris", "a b c d e f g h"]
    frontend, _ = make_frontend(folder, token_budget=16)  # inputs of different lengths in different forwards
    spec = frontend.spec
    assert (spec.pooling, spec.normalize) == (pooling, normalize)
    ours = vectors_of(request(frontend, input=texts))
    expected = SentenceTransformer(folder, device="cpu").encode(texts)
    assert cosines(ours, expected).min() >= 0.999
    np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_a_causal_lm_embeds_as_its_last_token_normalized():
    spec = read_spec(TINY)
    assert (spec.pooling, spec.normalize) == ("lasttoken", True)
    frontend, _ = make_frontend(TINY)
    v = vectors_of(request(frontend, input=["hello world", "hello world!"]))
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5) and not np.allclose(v[0], v[1])


def test_matryoshka_models_shorten_and_renormalize(tmp_path):
    folder = sentence_transformers_folder(tmp_path, "bert", "mean", True)
    config = json.loads((tmp_path / "bert-mean" / "config.json").read_text())
    (tmp_path / "bert-mean" / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": [8, 16]}))
    frontend, _ = make_frontend(folder)
    full = vectors_of(request(frontend, input="hello world"))
    short = vectors_of(request(frontend, input="hello world", dimensions=8))
    assert short.shape == (1, 8) and abs(np.linalg.norm(short) - 1) < 1e-5
    np.testing.assert_allclose(short[0], full[0, :8] / np.linalg.norm(full[0, :8]), atol=1e-6)
    with pytest.raises(APIError) as err:
        frontend.prepare({"model": folder, "input": "x", "dimensions": 12})
    assert err.value.param == "dimensions"


# ------------------------------------------------------------------ batching


def test_micro_batches_stay_within_the_token_budget_shortest_first():
    lengths = [5, 100, 7, 30, 6, 300]
    batches = micro_batches(lengths, 64)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 64
    assert batches[0] == [0, 4, 2]  # the three short ones share a forward
    assert [lengths[b[0]] for b in batches] == sorted(lengths[b[0]] for b in batches)


def test_waiting_requests_share_forwards_and_each_gets_its_own_vectors(minilm):
    frontend, backend, st = minilm
    engine = EmbeddingEngine(backend.engine.model, token_budget=4096)
    ids = [frontend.tokenizer(s)["input_ids"] for s in SENTENCES]

    async def together():
        return await asyncio.gather(*(engine.embed([i]) for i in ids))

    results = asyncio.run(together())
    np.testing.assert_allclose(np.concatenate(results), st.encode(SENTENCES), atol=1e-5)
    assert engine.stats.forwards < len(SENTENCES)  # requests that waited together were batched
    assert engine.in_flight == 0
    engine.shutdown()


# ------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("body, param, code", [
    ({"input": []}, "input", "invalid_value"),
    ({"input": ""}, "input", "invalid_value"),
    ({"input": ["ok", ""]}, "input.1", "invalid_value"),
    ({"input": 5}, "input", "invalid_value"),
    ({"input": None}, "input", "invalid_value"),
    ({"input": {"text": "x"}}, "input", "invalid_value"),
    ({"input": ["a", 3]}, "input.1", "invalid_value"),
    ({"input": [1, "a"]}, "input.1", "invalid_value"),
    ({"input": [1, 2.5]}, "input.1", "invalid_value"),
    ({"input": [True, 1]}, "input.0", "invalid_value"),  # a bool is no token id
    ({"input": [[1, 2], []]}, "input.1", "invalid_value"),
    ({"input": [[1, 2], ["x"]]}, "input.1", "invalid_value"),
    ({"input": [[1, 2], 3]}, "input.1", "invalid_value"),
    ({"input": [101, 999999]}, "input", "invalid_value"),
    ({"input": [[101], [-1]]}, "input.1", "invalid_value"),
    ({"input": [7] * 300}, "input", "context_length_exceeded"),
    ({"input": ["short", "word " * 300]}, "input.1", "context_length_exceeded"),
    ({"input": "x" * 20_000}, "input", "context_length_exceeded"),
    ({"input": ["x"] * 3000}, "input", "too_many_inputs"),
    ({}, "input", "missing_field"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
    ({"input": "x", "dimensions": 100}, "dimensions", "invalid_value"),
    ({"input": "x", "dimensions": 0}, "dimensions", "invalid_value"),
    ({"input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "invalid_value"),
    ({"input": "x", "truncate_prompt_tokens": 1000}, "truncate_prompt_tokens", "invalid_value"),
    ({"input": "x", "frobnicate": 1}, "frobnicate", "unsupported_parameter"),
    ({"input": "\ud800"}, "input", "invalid_value"),
])
def test_bad_inputs_are_400s_naming_the_field(minilm, body, param, code):
    frontend, backend, _ = minilm
    calls = len(backend.calls)
    with pytest.raises(APIError) as err:
        frontend.prepare({"model": MINILM, **body})
    assert (err.value.status, err.value.param, err.value.code) == (400, param, code), err.value.message
    assert err.value.message and len(backend.calls) == calls


def test_accepted_extras(minilm):
    frontend, _, _ = minilm
    got = request(frontend, input="x", user="someone", dimensions=384, add_special_tokens=False)
    assert got["usage"]["prompt_tokens"] == 1 and len(got["data"][0]["embedding"]) == 384


# ------------------------------------------------------------------ coalescing at the ingress


class SlowSend:
    """A replica stand-in: each call takes `delay` s and returns row i = [first token of input i]."""

    def __init__(self, delay: float = 0.05, fail: Exception | None = None):
        self.delay, self.fail = delay, fail
        self.calls: list[int] = []
        self.cancelled = 0

    async def __call__(self, inputs):
        self.calls.append(len(inputs))
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail:
            raise self.fail
        return np.array([[ids[0]] for ids in inputs], dtype=np.float32)


def test_requests_waiting_together_go_as_one_group_and_each_gets_its_rows():
    from serve_app.embeddings import CoalescingBackend

    send = SlowSend()
    backend = CoalescingBackend(send, max_inputs=8)

    async def main():
        return await asyncio.gather(*(backend.embed([[i], [100 + i]]) for i in range(10)))

    results = asyncio.run(main())
    assert [r[:, 0].tolist() for r in results] == [[i, 100 + i] for i in range(10)]
    # Two groups go at once (one request each); the next requests wait until 8 inputs do, and a
    # full group goes at once (the Router, not this, queues): 1 + 1 + 4 + 4 requests.
    assert send.calls == [2, 2, 8, 8] and backend.groups_sent == 4


def test_what_waits_here_is_bounded_so_the_router_queues_and_rejects():
    from serve_app.embeddings import CoalescingBackend

    send = SlowSend(delay=0.2)
    backend = CoalescingBackend(send, max_inputs=4, max_groups_in_flight=1)

    async def main():
        tasks = [asyncio.ensure_future(backend.embed([[i]])) for i in range(13)]
        await asyncio.sleep(0.05)
        sent_early = list(send.calls)
        await asyncio.gather(*tasks)
        return sent_early

    # 1 goes; 4 waiting make a full group, which goes too, and so on: only the last 0-3 wait here.
    assert asyncio.run(main()) == [1, 4, 4, 4]


def test_a_request_larger_than_a_group_goes_alone_and_errors_reach_every_member():
    from serve_app.embeddings import CoalescingBackend

    big = CoalescingBackend(send := SlowSend(), max_inputs=4)
    got = asyncio.run(big.embed([[i] for i in range(9)]))
    assert send.calls == [9] and got[:, 0].tolist() == list(range(9))
    failing = CoalescingBackend(SlowSend(fail=APIError(429, "full", code="queue_full")), max_inputs=4)

    async def main():
        return await asyncio.gather(*(failing.embed([[i]]) for i in range(5)), return_exceptions=True)

    assert [e.status for e in asyncio.run(main())] == [429] * 5


def test_callers_that_leave_are_dropped_and_a_group_nobody_waits_for_is_cancelled():
    from serve_app.embeddings import CoalescingBackend

    send = SlowSend(delay=0.2)
    backend = CoalescingBackend(send, max_inputs=8, max_groups_in_flight=1)

    async def main():
        first = asyncio.ensure_future(backend.embed([[1]]))
        waiting = asyncio.ensure_future(backend.embed([[2]]))
        kept = asyncio.ensure_future(backend.embed([[3]]))
        await asyncio.sleep(0.05)
        waiting.cancel()  # still waiting: it must not be sent
        first.cancel()  # its group's only member: the call is cancelled
        return await kept

    assert asyncio.run(main())[:, 0].tolist() == [3]
    assert send.calls == [1, 1] and send.cancelled == 1


# ------------------------------------------------------------------ admission and failures (stand-in handles)


class _Response:
    def __init__(self, result):
        self.result, self.cancelled = result, False

    def __await__(self):
        async def get():
            await asyncio.sleep(0)
            if isinstance(self.result, BaseException):
                raise self.result
            return self.result
        return get().__await__()

    def cancel(self):
        self.cancelled = True


class _Method:
    def __init__(self, results):
        self.results, self.calls = list(results), []

    def remote(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return _Response(self.results.pop(0) if self.results else None)


class _Handle:
    def __init__(self, **methods):
        self.__dict__.update(methods)

    def options(self, **kwargs):
        return self


def routed(replica_results):
    from deployments.routed_backend import RoutedBackend

    router = _Handle(admit=_Method([("router-1", f"lease-{i}", "replica-1") for i in range(3)]), release=_Method([]),
                     renew=_Method([]))
    replicas = _Handle(embed=_Method(replica_results))
    return RoutedBackend(router, replicas, retry_after_s=3), router, replicas


def test_an_embedding_call_is_admitted_pinned_released_and_retried_once_after_a_failure():
    from ray.exceptions import RayError

    vectors = np.ones((2, 4), dtype=np.float32)
    backend, router, replicas = routed([RayError("replica died"), vectors])
    assert asyncio.run(backend.embed([[1], [2]])) is vectors
    assert [args for args, _ in router.admit.calls][0][0] == 2  # two inputs: two sequences
    assert all(kw["pinned_to"] == "replica-1" for _, kw in replicas.embed.calls) and len(replicas.embed.calls) == 2
    assert sorted(args[0] for args, _ in router.release.calls) == ["lease-0", "lease-1"]  # both leases came back


def test_a_second_failure_is_a_503_with_retry_after_and_an_answer_is_not_retried():
    from ray.exceptions import RayError

    backend, router, _ = routed([RayError("died"), RayError("died again")])
    with pytest.raises(APIError) as err:
        asyncio.run(backend.embed([[1]]))
    assert (err.value.status, err.value.code, err.value.retry_after) == (503, "replica_failed", 3)
    assert len(router.release.calls) == 2
    backend, _, replicas = routed([APIError(500, "embedding failed", code="embedding_failed")])
    with pytest.raises(APIError) as err:
        asyncio.run(backend.embed([[1]]))
    assert err.value.status == 500 and len(replicas.embed.calls) == 1

"""Constrained rows inside the engine: masked where they are, unseen by the rows beside them."""

import json

import jsonschema
import pytest

from serve_app.engine.grammar_spec import DEAD_END, GrammarSpec
from serve_app.engine.types import GenerationRequest, SamplingParams

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                    "maxItems": 3},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "tags", "score"]}


def run(engine, requests):
    for r in requests:
        engine.add(r)
    tokens, text, final = {}, {}, {}
    while engine.has_work:
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            text[out.request_id] = text.get(out.request_id, "") + out.text
            if out.finished:
                final[out.request_id] = out
    return tokens, text, final


def constrained(rid, ids, temperature=1.0, seed=None, n=80):
    return GenerationRequest(request_id=rid, prompt_token_ids=ids, params=SamplingParams(
        max_tokens=n, temperature=temperature, seed=seed, grammar=GrammarSpec.json_schema(SCHEMA)))


def plain(rid, ids, n=16):
    return GenerationRequest(request_id=rid, prompt_token_ids=ids,
                             params=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))


@pytest.fixture
def encode(lively_model):
    return lambda text: lively_model[1](text)["input_ids"]


def test_constrained_rows_validate_and_the_rows_beside_them_are_unchanged(tiny_engine_factory, encode):
    engine = tiny_engine_factory(num_speculative_tokens=0)
    free = [plain(f"p{i}", encode(t)) for i, t in enumerate(["hello world", "The quick brown fox"])]
    alone, _, _ = run(engine, free)
    reqs = [constrained(f"c{i}", encode("Describe it as JSON:"), seed=i) for i in range(4)] + free
    tokens, text, final = run(engine, reqs)
    for i in range(4):
        assert final[f"c{i}"].finish_reason == "stop", final[f"c{i}"]
        jsonschema.validate(json.loads(text[f"c{i}"]), SCHEMA)
    assert {k: tokens[k] for k in alone} == alone


def test_speculating_constrained_rows_give_the_tokens_one_step_at_a_time_gives(tiny_engine_factory, encode):
    ids = encode("JSON please: {\"name\": \"aaaa aaaa aaaa\"")
    reqs = [constrained("g", ids, temperature=0)]
    plain_tokens, text, _ = run(tiny_engine_factory(num_speculative_tokens=0), reqs)
    spec = tiny_engine_factory(num_speculative_tokens=4, speculative_max_rows=4)
    spec_tokens, _, _ = run(spec, reqs)
    assert spec_tokens == plain_tokens
    assert spec.draft_tokens > 0  # drafts were checked against the grammar, not skipped
    jsonschema.validate(json.loads(text["g"]), SCHEMA)


def test_a_row_whose_grammar_cannot_go_on_fails_alone_with_a_clear_error(tiny_engine_factory, encode,
                                                                          monkeypatch):
    from serve_app.engine.grammar import GrammarState

    engine = tiny_engine_factory(num_speculative_tokens=0)
    real_fill = GrammarState.fill_mask
    calls = {"n": 0}

    def dies_on_the_third_step(self, bitmask, row):
        calls["n"] += 1
        if calls["n"] == 3:
            bitmask[row].zero_()
            return False
        return real_fill(self, bitmask, row)

    monkeypatch.setattr(GrammarState, "fill_mask", dies_on_the_third_step)
    _, _, final = run(engine, [constrained("dead", encode("x"), temperature=0), plain("ok", encode("hello"))])
    assert final["dead"].finish_reason == "error" and final["dead"].error.startswith(DEAD_END)
    assert final["ok"].finish_reason == "length"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks

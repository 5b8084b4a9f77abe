"""Grammar-constrained decoding without the engine: specs, compiler cache, per-sequence
states, token masks (serve_app/engine/grammar.py)."""

from __future__ import annotations

import json
import pickle
import re
from typing import Literal

import jsonschema
import pytest
import torch
from pydantic import BaseModel, Field

from serve_app.engine.builtin_models import resolve_model_path
from serve_app.engine.grammar import (
    DEAD_END, GrammarCompiler, GrammarError, apply_bitmask, apply_masks, bitmask_words, dead_end_message,
    fill_masks, strict_schema,
)
from serve_app.engine.grammar_spec import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, GrammarSpec
from tests.conftest import closing_bonus, token_texts
from tests.conftest import grammar_walk as walk


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path("builtin:smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def smol_texts(smol_tokenizer):
    return token_texts(smol_tokenizer)


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer):
    compiler = GrammarCompiler(tiny_tokenizer)
    yield compiler
    compiler.close()


@pytest.fixture(scope="module")
def smol(smol_tokenizer):
    compiler = GrammarCompiler(smol_tokenizer)
    yield compiler
    compiler.close()


def allowed_tokens(state, vocab: int) -> set[int]:
    bitmask = torch.zeros(1, bitmask_words(vocab), dtype=torch.int32)
    state.fill_mask(bitmask, 0)
    bits = (bitmask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return set(bits.view(-1)[:vocab].nonzero().squeeze(-1).tolist())


# ---------------------------------------------------------------- masks are exact


@pytest.mark.parametrize("spec, words", [
    (GrammarSpec.choice(["positive", "negative", "neutral"]), ["positive", "negative", "neutral"]),
    (GrammarSpec.json_schema({"enum": ["red", "green", "blue"]}), ['"red"', '"green"', '"blue"']),
    (GrammarSpec.regex("(yes|no)!"), ["yes!", "no!"]),
])
def test_mask_allows_exactly_the_tokens_that_continue_a_valid_output(smol, smol_tokenizer, smol_texts, spec, words):
    """Over the real 49k vocabulary, at every position of every word of a finite language:
    the mask is exactly the tokens whose text extends the prefix towards some word, plus EOS
    where the prefix is a whole word."""
    texts = smol_texts
    specials = set(smol_tokenizer.all_special_ids)
    eos = smol_tokenizer.eos_token_id
    compiled = smol.compile_now(spec)
    for word in words:
        state = compiled.new_state()
        prefix = ""
        for token in smol_tokenizer(word, add_special_tokens=False)["input_ids"]:
            expected = {t for t, text in enumerate(texts) if text and t not in specials
                        and any(w.startswith(prefix + text) for w in words)}
            if prefix in words:
                expected.add(eos)
            assert allowed_tokens(state, len(texts)) == expected, (word, prefix)
            assert state.accept(token)
            prefix += texts[token]
        assert prefix == word
        assert allowed_tokens(state, len(texts)) == {eos}  # a whole word that cannot grow: only EOS
        assert state.accept(eos) and state.is_finished


def test_end_allows_every_eos_token_and_once_finished_only_eos(tiny_tokenizer):
    compiler = GrammarCompiler(tiny_tokenizer, eos_token_ids=[2, 0])
    state = compiler.compile_now(GrammarSpec.json_schema({"type": "integer"})).new_state()
    for t in tiny_tokenizer("12", add_special_tokens=False)["input_ids"]:
        assert state.accept(t)
    allowed = allowed_tokens(state, len(tiny_tokenizer))
    assert {0, 2} <= allowed and len(allowed) > 2  # complete, but more digits may follow
    assert not state.is_finished
    assert state.accept(0) and state.is_finished
    assert allowed_tokens(state, len(tiny_tokenizer)) == {0, 2}
    assert not state.accept(tiny_tokenizer.convert_tokens_to_ids("3"))
    compiler.close()


def test_a_refused_token_leaves_the_state_usable(tiny, tiny_tokenizer):
    state = tiny.compile_now(GrammarSpec.json_object()).new_state()
    ids = tiny_tokenizer('{"a": 1}', add_special_tokens=False)["input_ids"]
    assert not state.accept(tiny_tokenizer.convert_tokens_to_ids("a"))  # JSON cannot start with 'a'
    assert not state.accept(tiny_tokenizer.eos_token_id)  # nor end before it began
    assert all(state.accept(t) for t in ids)
    assert state.accept(tiny_tokenizer.eos_token_id) and state.is_finished


# ---------------------------------------------------------------- random walks stay valid


class Address(BaseModel):
    street: str = Field(max_length=30)
    city: str
    zip: str | None = Field(None, pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=150)
    role: Literal["admin", "user", "guest"]
    score: float = Field(ge=0, le=1)
    address: Address
    tags: list[str] = Field(default_factory=list, max_length=3)
    manager: Person | None = None  # recursive, through $defs / $ref


SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "id": {"type": "integer"},
        "owner": {"type": "object", "properties": {
            "name": {"type": "string"}, "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}},
            "required": ["name"]}},
        "required": ["id", "owner"]},
    "array-bounds": {"type": "object", "properties": {
        "points": {"type": "array", "minItems": 2, "maxItems": 4,
                   "items": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}}},
        "required": ["points"]},
    "enums": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3, None]},
        "flag": {"const": True}}, "required": ["color", "size", "flag"]},
    "number-ranges": {"type": "object", "properties": {
        "pct": {"type": "number", "minimum": 0, "maximum": 100},
        "temp": {"type": "number", "exclusiveMinimum": -40, "exclusiveMaximum": 60},
        "n": {"type": "integer", "minimum": 10, "maximum": 99}}, "required": ["pct", "temp", "n"]},
    "patterns": {"type": "object", "properties": {
        "date": {"type": "string", "pattern": "^\\d{4}-\\d{2}-\\d{2}$"},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2,4}$"}}, "required": ["date", "code"]},
    "optional-fields": {"type": "object", "properties": {
        "a": {"type": "string", "maxLength": 5}, "b": {"type": "integer"}, "c": {"type": "boolean"},
        "d": {"type": ["string", "null"]}}, "required": ["b"]},
    "any-of": {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number", "minimum": 0}},
         "required": ["kind", "r"]},
        {"type": "object", "properties": {"kind": {"const": "rect"}, "w": {"type": "integer"},
                                          "h": {"type": "integer"}}, "required": ["kind", "w", "h"]}]},
    "pydantic": Person.model_json_schema(),
    "top-level-array": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3},
    "json_object": {"type": "object"},
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_walks_through_a_schema_always_give_valid_json(tiny, tiny_tokenizer, name):
    schema = SCHEMAS[name]
    spec = GrammarSpec.json_object() if name == "json_object" else GrammarSpec.json_schema(schema)
    compiled = tiny.compile_now(spec)
    closers = closing_bonus(tiny_tokenizer)
    for seed in range(12):
        tokens = walk(compiled.new_state(), tiny_tokenizer, seed, closers=closers)
        assert tokens[-1] == tiny_tokenizer.eos_token_id
        text = tiny_tokenizer.decode(tokens[:-1])
        value = json.loads(text)
        jsonschema.validate(value, schema)
        assert is_dumps_layout(text), text


def is_dumps_layout(text: str) -> bool:
    """One line with json.dumps's separators: outside strings, whitespace only after ',' and ':'."""
    skeleton = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    return not re.search(r"\s", re.sub(r"[,:] ", "", skeleton))


def test_random_walks_with_the_real_vocabulary(smol, smol_tokenizer):
    schema = SCHEMAS["enums"] | {"properties": SCHEMAS["enums"]["properties"] | SCHEMAS["patterns"]["properties"]}
    compiled = smol.compile_now(GrammarSpec.json_schema(schema))
    closers = closing_bonus(smol_tokenizer)
    for seed in range(3):
        tokens = walk(compiled.new_state(), smol_tokenizer, seed, closers=closers)
        jsonschema.validate(json.loads(smol_tokenizer.decode(tokens[:-1])), schema)


@pytest.mark.parametrize("spec, check", [
    (GrammarSpec.regex(r"\d{3}-[a-z]{2,5}"), lambda text: re.fullmatch(r"\d{3}-[a-z]{2,5}", text)),
    (GrammarSpec.choice(["alpha", "beta", "gamma delta"]), lambda text: text in ("alpha", "beta", "gamma delta")),
    (GrammarSpec.grammar('start: expr\nexpr: term (("+" | "-") term)*\nterm: NUMBER | "(" expr ")"\n'
                         'NUMBER: /[1-9][0-9]{0,2}|0/\n'),
     lambda text: re.fullmatch(r"[0-9()+-]+", text) and compile(text, "<grammar>", "eval")),
    (GrammarSpec.grammar('root ::= "(" [a-c]+ ")" | "none"'),  # GBNF (llama.cpp)
     lambda text: re.fullmatch(r"\([a-c]+\)|none", text)),
])
def test_random_walks_through_regex_choice_and_grammars(tiny, tiny_tokenizer, spec, check):
    compiled = tiny.compile_now(spec)
    closers = closing_bonus(tiny_tokenizer)
    closers[tiny_tokenizer.convert_tokens_to_ids(")")] = 1.0
    for seed in range(10):
        tokens = walk(compiled.new_state(), tiny_tokenizer, seed, closers=closers)
        assert check(tiny_tokenizer.decode(tokens[:-1])), tiny_tokenizer.decode(tokens)


def test_forced_tool_calls_follow_the_format_and_each_tool_schema(tiny, tiny_tokenizer):
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                "unit": {"enum": ["C", "F"]}}, "required": ["city"]}
    spec = GrammarSpec.tool_calls([("get_weather", weather), ("ping", None)], parallel=True)
    compiled = tiny.compile_now(spec)
    closers = closing_bonus(tiny_tokenizer)
    seen = set()
    block = re.compile(re.escape(TOOL_CALL_OPEN) + "(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)
    for seed in range(12):
        text = tiny_tokenizer.decode(walk(compiled.new_state(), tiny_tokenizer, seed, closers=closers)[:-1])
        calls = block.findall(text)
        assert calls and block.sub("", text).strip("\n") == "", text
        for call in calls:
            call = json.loads(call)
            assert list(call) == ["name", "arguments"]
            seen.add(call["name"])
            jsonschema.validate(call["arguments"], weather if call["name"] == "get_weather"
                                else {"type": "object", "maxProperties": 0})
    assert seen == {"get_weather", "ping"}
    single = tiny.compile_now(GrammarSpec.tool_calls([("ping", None)], parallel=False))
    text = tiny_tokenizer.decode(walk(single.new_state(), tiny_tokenizer, 0, closers=closers)[:-1])
    assert text == TOOL_CALL_OPEN + '{"name": "ping", "arguments": {}}' + TOOL_CALL_CLOSE


# ---------------------------------------------------------------- rollback and drafts


def test_rollback_restores_the_state(tiny, tiny_tokenizer):
    compiled = tiny.compile_now(GrammarSpec.json_schema(SCHEMAS["nested"]))
    ids = tiny_tokenizer('{"id": 7, "owner": {"name": "Al"}}', add_special_tokens=False)["input_ids"]
    vocab = len(tiny_tokenizer)
    state = compiled.new_state()
    masks = []
    for t in ids:
        masks.append(allowed_tokens(state, vocab))
        assert state.accept(t)
    assert state.accept(tiny_tokenizer.eos_token_id) and state.is_finished
    state.rollback(1)  # the EOS
    assert not state.is_finished
    for k in (3, 1, 4):
        state.rollback(k)
        assert allowed_tokens(state, vocab) == masks[len(ids) - k]
        assert all(state.accept(t) for t in ids[len(ids) - k:])
    with pytest.raises(ValueError):
        state.rollback(len(ids) + 2)
    # An EOS rolled back and accepted again (llguidance alone would refuse it the second time)
    assert state.accept(tiny_tokenizer.eos_token_id) and state.is_finished
    state.rollback(2)
    assert not state.is_finished and not state.accept(tiny_tokenizer.eos_token_id)
    assert state.accept(ids[-1]) and state.accept(tiny_tokenizer.eos_token_id)
    assert state.check_draft([tiny_tokenizer.eos_token_id]) == 1


def test_drafts_are_checked_and_masked_without_changing_the_state(tiny, tiny_tokenizer):
    compiled = tiny.compile_now(GrammarSpec.json_schema(SCHEMAS["nested"]))
    ids = tiny_tokenizer('{"id": 12, "owner": {"name": "Bo"}}', add_special_tokens=False)["input_ids"]
    vocab = len(tiny_tokenizer)
    state = compiled.new_state()
    for t in ids[:3]:
        state.accept(t)
    before = allowed_tokens(state, vocab)
    bad = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    draft = ids[3:6] + [bad] + ids[6:8]
    assert state.check_draft(ids[3:9]) == 6
    assert state.check_draft(draft) == 3
    eos = tiny_tokenizer.eos_token_id
    assert state.check_draft([*ids[3:], eos, eos]) == len(ids) - 3 + 1  # up to the EOS that completes it
    assert state.check_draft([*ids[3:-1], eos]) == len(ids) - 4  # an EOS before the end: refused
    bitmask = torch.zeros(len(draft) + 2, bitmask_words(vocab), dtype=torch.int32)
    assert state.fill_draft_masks(draft, bitmask, 1) == 3
    assert allowed_tokens(state, vocab) == before
    sequential = compiled.new_state()
    for t in ids[:3]:
        sequential.accept(t)
    for j in range(4):  # positions up to the refused token: the masks of one-at-a-time decoding
        assert torch.equal(bitmask[1 + j], _mask_row(sequential, vocab)), j
        if j < 3:
            sequential.accept(draft[j])
    assert bool((bitmask[5:7] == -1).all())  # past the refused token: anything (never kept)
    assert bool((bitmask[0] == 0).all())  # other rows untouched


def _mask_row(state, vocab):
    bitmask = torch.zeros(1, bitmask_words(vocab), dtype=torch.int32)
    state.fill_mask(bitmask, 0)
    return bitmask[0]


# ---------------------------------------------------------------- applying masks


def test_apply_bitmask_matches_the_bitwise_definition():
    gen = torch.Generator().manual_seed(0)
    vocab = 100  # not a multiple of 32: the last word is partial
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, bitmask_words(vocab)), dtype=torch.int32, generator=gen)
    bitmask[0, 0] = -(2**31)  # only bit 31: token 31
    logits = torch.randn(5, vocab, generator=gen)
    out = logits.clone()
    apply_bitmask(out, [4, 0, 2], bitmask)
    for row, i in ((4, 0), (0, 1), (2, 2)):
        for t in range(vocab):
            allowed = (int(bitmask[i, t // 32]) >> (t % 32)) & 1
            assert out[row, t] == (logits[row, t] if allowed else float("-inf")), (row, t)
    assert torch.equal(out[[1, 3]], logits[[1, 3]])  # unconstrained rows: untouched
    assert bool((out[4, :31] == float("-inf")).all()) and out[4, 31] == logits[4, 31]


def test_apply_masks_touches_only_constrained_rows_and_blocks_padding(tiny, tiny_tokenizer):
    state = tiny.compile_now(GrammarSpec.choice(["yes", "no"])).new_state()
    padded = len(tiny_tokenizer) + 50  # a model whose logits are wider than its tokenizer
    logits = torch.randn(3, padded)
    before = logits.clone()
    assert apply_masks(logits, [], []) == []
    assert torch.equal(logits, before)
    assert apply_masks(logits, [1], [state]) == []
    assert torch.equal(logits[[0, 2]], before[[0, 2]])
    finite = logits[1].isfinite().nonzero().squeeze(-1).tolist()
    assert finite and all(tiny_tokenizer.decode([t]) in ("y", "ye", "yes", "n", "no") for t in finite)
    assert not logits[1, len(tiny_tokenizer):].isfinite().any()
    # Rows in any order, all rows of the batch
    logits = before.clone()
    other = tiny.compile_now(GrammarSpec.regex("[0-9]")).new_state()
    assert apply_masks(logits, [2, 0, 1], [state, other, state]) == []
    assert torch.equal(logits[1].isfinite(), logits[2].isfinite())
    assert all(tiny_tokenizer.decode([t]).isdigit() for t in logits[0].isfinite().nonzero().squeeze(-1).tolist())


def test_a_grammar_that_cannot_advance_is_reported_not_sampled(tiny, tiny_tokenizer):
    compiled = tiny.compile_now(GrammarSpec.json_object())
    ok, stuck = compiled.new_state(), compiled.new_state()
    stuck._matcher.consume_token(tiny_tokenizer.convert_tokens_to_ids("a"))  # what a sampler bug would do
    assert not stuck.can_advance and ok.can_advance
    bitmask = torch.zeros(2, bitmask_words(len(tiny_tokenizer)), dtype=torch.int32)
    assert fill_masks([ok, stuck], bitmask) == [1]
    logits = torch.randn(2, len(tiny_tokenizer))
    assert apply_masks(logits, [0, 1], [ok, stuck]) == [1]
    message = dead_end_message(stuck)
    assert message.startswith(DEAD_END + ": the json_object grammar cannot be continued")


# ---------------------------------------------------------------- compiler: cache, errors, threads


def test_a_cache_hit_does_not_compile_again(tiny_tokenizer):
    compiler = GrammarCompiler(tiny_tokenizer, cache_size=2)
    a = GrammarSpec.json_schema({"type": "object", "properties": {"x": {"type": "integer"}}})
    first = compiler.compile(a)
    first.result()
    assert compiler.compilations == 1
    # An equal spec built separately (another request with the same schema) hits the cache.
    again = compiler.compile(GrammarSpec.json_schema({"type": "object", "properties": {"x": {"type": "integer"}}}))
    assert again is first and again.done()
    assert compiler.compilations == 1
    # The key keeps property order: it steers what the model writes first.
    compiler.compile_now(GrammarSpec.json_schema({"properties": {"x": {"type": "integer"}}, "type": "object"}))
    assert compiler.compilations == 2
    compiler.compile_now(GrammarSpec.regex("a+"))  # evicts `a`, the least recently used
    assert compiler.compilations == 3
    compiler.compile_now(a)
    assert compiler.compilations == 4
    compiler.close()


@pytest.mark.parametrize("spec, words", [
    (GrammarSpec.json_schema({"type": "strin"}), "Invalid type: strin"),
    (GrammarSpec.json_schema({"type": "array", "uniqueItems": True}), "uniqueItems"),
    (GrammarSpec.json_schema({"$ref": "#/$defs/missing"}), "missing"),
    (GrammarSpec(kind="json_schema", value="{not json"), "invalid json_schema"),
    (GrammarSpec.json_schema({"type": "string", "pattern": "(?<=a)b"}), "look-around"),
    (GrammarSpec.regex("a(b"), "unclosed group"),
    (GrammarSpec.regex("[^\\x00-\\x{10FFFF}]"), "allows no output"),
    (GrammarSpec.grammar("start: undefined_rule"), "undefined_rule"),
    (GrammarSpec.tool_calls([("f", {"type": "object", "properties": {"a": {"type": "nope"}}})]), "nope"),
])
def test_an_invalid_grammar_raises_a_clear_error_once(tiny, spec, words):
    before = tiny.compilations
    for _ in range(2):  # the failure is cached too
        with pytest.raises(GrammarError, match=re.escape(words)):
            tiny.compile_now(spec)
    assert tiny.compilations == before


def test_specs_are_hashable_values_that_survive_pickling():
    a = GrammarSpec.tool_calls([("f", {"type": "object"}), ("g", None)], parallel=True)
    b = pickle.loads(pickle.dumps(a))
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    with pytest.raises(ValueError):
        GrammarSpec(kind="regex")
    with pytest.raises(ValueError):
        GrammarSpec(kind="tool_calls")


def test_strict_schema_closes_objects_that_name_their_properties():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}},
                                               "c": {"type": "object"},
                                               "d": {"type": "object", "properties": {}, "additionalProperties": True}},
              "$defs": {"X": {"properties": {"y": {"items": {"properties": {"z": {}}}}}}}}
    out = strict_schema(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in out["properties"]["c"]  # any object stays any object
    assert out["properties"]["d"]["additionalProperties"] is True
    assert out["$defs"]["X"]["properties"]["y"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the caller's schema is not modified


def test_regex_digits_are_ascii_as_in_json_schema_patterns(smol, smol_tokenizer):
    arabic_three = smol_tokenizer("٣", add_special_tokens=False)["input_ids"]
    for spec in (GrammarSpec.regex(r"\d+"), GrammarSpec.regex(r"[\d]+"),
                 GrammarSpec.json_schema({"type": "string", "pattern": "^\\d+$"})):
        state = smol.compile_now(spec).new_state()
        if spec.kind == "json_schema":
            assert state.accept(smol_tokenizer('"', add_special_tokens=False)["input_ids"][0])
        assert state.check_draft(arabic_three) == 0
        assert state.check_draft(smol_tokenizer("42", add_special_tokens=False)["input_ids"]) > 0
    state = smol.compile_now(GrammarSpec.regex(r"\D")).new_state()
    assert state.check_draft(smol_tokenizer("7", add_special_tokens=False)["input_ids"]) == 0

"""BatchEngine on a tiny random Llama: what a caller of the engine sees."""

import pytest

from serve_app.engine.types import GenerationRequest, SamplingParams

PROMPTS = ["hello world", "The quick brown fox jumps", "What is the capital of France?", "a",
           "Streaming tokens arrive one by one; batching"]


@pytest.fixture
def encode(lively_model):
    tokenizer = lively_model[1]
    return lambda text: tokenizer(text)["input_ids"]


def run(engine, requests, cancel_after: dict | None = None):
    """Drive the engine to completion; return {request_id: (text, tokens, final output)}."""
    for r in requests:
        engine.add(r)
    text, tokens, final = {}, {}, {}
    steps = 0
    while engine.has_work:
        for out in engine.step():
            text[out.request_id] = text.get(out.request_id, "") + out.text
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            if out.finished:
                final[out.request_id] = out
        steps += 1
        for rid, at in (cancel_after or {}).items():
            if steps == at:
                engine.cancel(rid)
    return {rid: (text.get(rid, ""), tokens.get(rid, []), final[rid]) for rid in final}


def greedy(rid, ids, n=24, **kw):
    return GenerationRequest(request_id=rid, prompt_token_ids=ids,
                             params=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw))


def test_batched_rows_match_single_runs(tiny_engine_factory, encode):
    engine = tiny_engine_factory()
    reqs = [greedy(str(i), encode(p)) for i, p in enumerate(PROMPTS)]
    alone = {}
    for r in reqs:
        alone.update(run(engine, [r]))
    together = run(engine, reqs)
    assert {k: v[1] for k, v in together.items()} == {k: v[1] for k, v in alone.items()}


def test_sequences_joining_a_running_batch_are_unaffected(tiny_engine_factory, encode):
    engine = tiny_engine_factory()
    reqs = [greedy(str(i), encode(p), n=12 + 3 * i) for i, p in enumerate(PROMPTS)]
    alone = {}
    for r in reqs:
        alone.update(run(engine, [r]))
    # Admit one request every two steps so each joins a batch already decoding.
    pending = list(reqs)
    got: dict[str, list[int]] = {}
    step = 0
    while pending or engine.has_work:
        if pending and step % 2 == 0:
            engine.add(pending.pop(0))
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
        step += 1
    assert got == {k: v[1] for k, v in alone.items()}


def test_length_limit_and_token_counts(tiny_engine_factory, encode):
    ids = encode("hello world")
    (text, tokens, final), = run(tiny_engine_factory(), [greedy("a", ids, n=7)]).values()
    assert final.finish_reason == "length"
    assert final.completion_tokens == len(tokens) == 7
    assert final.prompt_tokens == len(ids)


def test_stop_string_ends_generation_and_is_excluded(tiny_engine_factory, encode):
    engine = tiny_engine_factory()
    ids = encode("hello world")
    full = run(engine, [greedy("a", ids, n=30)])["a"][0]
    stop = full[8:11]
    assert stop and stop in full
    text, _, final = run(engine, [greedy("b", ids, n=30, stop=(stop,))])["b"]
    assert final.finish_reason == "stop"
    assert text == full[: full.index(stop)]


def test_eos_stops_unless_ignored(tiny_engine_factory, encode, lively_model):
    engine = tiny_engine_factory()
    engine.eos_token_ids = frozenset(range(len(lively_model[1])))  # every token ends the sequence
    req = GenerationRequest(request_id="e", prompt_token_ids=encode("hi"),
                            params=SamplingParams(max_tokens=5, temperature=0))
    text, tokens, final = run(engine, [req])["e"]
    assert (final.finish_reason, final.completion_tokens, text) == ("stop", 1, "")  # the EOS is not text
    assert run(engine, [greedy("f", encode("hi"), n=5)])["f"][2].completion_tokens == 5


def test_seeded_sampling_is_reproducible_in_any_batch(tiny_engine_factory, encode):
    engine = tiny_engine_factory()
    def sampled(rid, seed):
        return GenerationRequest(request_id=rid, prompt_token_ids=encode("hello world"),
                                 params=SamplingParams(max_tokens=20, temperature=1.0, seed=seed, ignore_eos=True))
    alone = run(engine, [sampled("x", 42)])["x"][1]
    mixed = run(engine, [sampled("y", 42), sampled("z", 43), greedy("g", encode("a"))])
    assert mixed["y"][1] == alone
    assert mixed["z"][1] != alone


def test_cancel_frees_the_slot_and_spares_the_others(tiny_engine_factory, encode):
    engine = tiny_engine_factory()
    keep = greedy("keep", encode("hello world"), n=20)
    reference = run(engine, [keep])["keep"][1]
    results = run(engine, [greedy("drop", encode("a"), n=1000), keep], cancel_after={"drop": 3})
    assert results["drop"][2].finish_reason == "cancelled"
    assert len(results["drop"][1]) <= 3
    assert results["keep"][1] == reference
    assert not engine.has_work


def test_cancel_while_waiting_never_runs(tiny_engine_factory, encode):
    engine = tiny_engine_factory(max_batch_size=1)
    engine.add(greedy("first", encode("a"), n=5))
    engine.add(greedy("queued", encode("b"), n=5))
    engine.cancel("queued")
    results = run(engine, [])
    assert results["queued"][2].finish_reason == "cancelled"
    assert results["queued"][1] == []


def test_context_limit_ends_with_length(tiny_engine_factory, encode):
    engine = tiny_engine_factory(max_model_len=16)
    ids = encode("hello world")
    _, tokens, final = run(engine, [greedy("c", ids, n=100)])["c"]
    assert final.finish_reason == "length"
    assert len(ids) + len(tokens) == 16
    with pytest.raises(ValueError):
        engine.add(greedy("too-long", list(range(5, 30))))


def test_batch_size_bound_is_respected(tiny_engine_factory, encode):
    engine = tiny_engine_factory(max_batch_size=2)
    for i in range(5):
        engine.add(greedy(str(i), encode("hello"), n=4))
    peak = 0
    while engine.has_work:
        engine.step()
        peak = max(peak, len(engine.running))
    assert peak == 2


def test_a_failed_step_fails_every_sequence_it_holds_and_the_engine_goes_on(tiny_engine_factory, encode):
    """E.g. out of memory in a prefill: no sequence is left in neither list (an orphan nobody
    finishes), the KV blocks come back, and the next request is served normally."""
    engine = tiny_engine_factory(max_batch_size=4, max_num_batched_tokens=16)
    expected = run(engine, [greedy("solo", encode(PROMPTS[1]))])["solo"][1]
    free_blocks = engine.blocks.num_free_blocks
    for i, p in enumerate(PROMPTS):  # 5 sequences: some running (prefilling in chunks), some waiting
        engine.add(greedy(str(i), encode(p * 4)))
    engine.step()
    real_forward = engine.runner.forward

    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    engine.runner.forward = boom
    try:
        outs = engine.step()
    finally:
        engine.runner.forward = real_forward
    assert sorted(o.request_id for o in outs) == [str(i) for i in range(len(PROMPTS))]
    assert all(o.finish_reason == "error" and "out of memory" in o.error for o in outs)
    assert not engine.has_work and engine.blocks.num_free_blocks == free_blocks
    assert run(engine, [greedy("again", encode(PROMPTS[1]))])["again"][1] == expected


def test_an_error_in_one_sequence_fails_only_that_sequence(tiny_engine_factory, encode):
    engine = tiny_engine_factory()
    reqs = [greedy(str(i), encode(p)) for i, p in enumerate(PROMPTS)]
    alone = {r.request_id: run(engine, [r])[r.request_id][1] for r in reqs}
    for r in reqs:
        engine.add(r)
    engine.step()  # every prompt is prefilled: now break one sequence's detokenizer
    bad = next(s for s in engine.running if s.request_id == "2")

    def broken(token):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated")

    bad.detok.add_token = broken
    results = run(engine, [])
    assert results["2"][2].finish_reason == "error" and "UnicodeDecodeError" in results["2"][2].error
    for rid, expected in alone.items():
        if rid != "2":
            assert results[rid][1] == expected[len(expected) - len(results[rid][1]):]
            assert results[rid][2].finish_reason == "length"


def test_a_nan_distribution_fails_its_row_only():
    import torch

    from serve_app.engine.sampling import sample_next_tokens

    logits = torch.tensor([[0.0, 1.0, 2.0], [float("nan")] * 3, [2.0, 1.0, 0.0]])
    params = [SamplingParams(temperature=1.0)] * 3
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    tokens = sample_next_tokens(logits, params, gens)
    assert isinstance(tokens[1], RuntimeError) and all(isinstance(tokens[i], int) for i in (0, 2))

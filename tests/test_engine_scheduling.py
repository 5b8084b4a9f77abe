"""The engine's scheduling: chunked prefill, token budget, KV admission, mixed steps.

Tokens are compared with transformers' own `generate` (greedy, no batching):
an independent reference for the paged cache and the packed forward.
"""

import random

import pytest
import torch

from serve_app.engine.scheduler import MIN_PREFILL
from serve_app.engine.types import GenerationRequest, SamplingParams
from tests.test_engine import run

PROMPTS = ["hello world", "The quick brown fox jumps over the lazy dog while serving models",
           "What is the capital of France?", "a", "Streaming tokens arrive one by one; batching " * 6]


@pytest.fixture(scope="module")
def reference(lively_model):
    """Greedy tokens of each prompt by `model.generate`, one prompt at a time."""
    model, tokenizer = lively_model
    out = {}
    for i, text in enumerate(PROMPTS):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
        out[str(i)] = gen[0, ids.shape[1]:].tolist()
    assert len({tuple(v) for v in out.values()}) == len(PROMPTS)  # the model is not degenerate
    return out


def requests(tokenizer, n=20):
    return [GenerationRequest(request_id=str(i), prompt_token_ids=tokenizer(t)["input_ids"],
                              params=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            for i, t in enumerate(PROMPTS)]


@pytest.mark.parametrize("budget", [8, 13, 4096])
def test_chunked_and_one_shot_prefill_match_transformers_generate(tiny_engine_factory, lively_model,
                                                                 reference, budget):
    engine = tiny_engine_factory(max_num_batched_tokens=budget)
    got = run(engine, requests(lively_model[1]))
    assert {k: v[1] for k, v in got.items()} == reference


def test_mixed_steps_of_decodes_and_prompt_chunks_match_solo_runs(tiny_engine_factory, lively_model, reference):
    """Requests arrive one every step, so most steps mix decoding rows with a prompt chunk."""
    engine = tiny_engine_factory(max_num_batched_tokens=16)
    pending = requests(lively_model[1])
    got: dict[str, list[int]] = {}
    mixed_steps = 0
    while pending or engine.has_work:
        if pending:
            engine.add(pending.pop(0))
        decoding = sum(1 for s in engine.running if s.prefilled)
        outs = engine.step()
        mixed_steps += decoding > 0 and engine.last_step_tokens > decoding
        for out in outs:
            got.setdefault(out.request_id, []).extend(out.token_ids)
    assert got == reference
    assert mixed_steps >= 3


def test_a_long_prompt_never_stops_the_decoding_rows(tiny_engine_factory, lively_model):
    tokenizer = lively_model[1]
    engine = tiny_engine_factory(max_num_batched_tokens=32)
    short = [GenerationRequest(request_id=f"s{i}", prompt_token_ids=tokenizer("hello")["input_ids"],
                               params=SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
             for i in range(3)]
    for r in short:
        engine.add(r)
    engine.step()  # all three prefilled, decoding from now on
    engine.add(GenerationRequest(request_id="long", prompt_token_ids=[5 + i % 400 for i in range(895)],
                                 params=SamplingParams(max_tokens=4, temperature=0)))
    steps_while_prefilling = 0
    while any(s.request_id == "long" and not s.prefilled for s in [*engine.running, *engine.waiting]):
        produced = {o.request_id for o in engine.step() if o.token_ids}
        assert {"s0", "s1", "s2"} <= produced  # every decoding row got its token this step
        assert engine.last_step_tokens <= 32
        steps_while_prefilling += 1
    assert steps_while_prefilling >= 895 // 32  # the prompt went in chunks


def test_admission_waits_for_kv_memory_instead_of_failing(tiny_engine_factory, lively_model):
    tokenizer = lively_model[1]
    # Room for two sequences of 64 tokens at a time.
    engine = tiny_engine_factory(max_batch_size=8, kv_cache_tokens=128, max_model_len=128)
    reqs = [GenerationRequest(request_id=str(i), prompt_token_ids=tokenizer("hello world")["input_ids"],
                              params=SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
            for i in range(5)]
    for r in reqs:
        engine.add(r)
    peak = 0
    while engine.has_work:
        engine.step()
        peak = max(peak, len(engine.running))
        engine.blocks.check_invariants(engine.running)  # no block held twice, none lost
    assert peak == 2
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    with pytest.raises(ValueError, match="KV cache"):  # could never fit: refused at once, not queued forever
        tiny_engine_factory(kv_cache_tokens=64).add(GenerationRequest(
            request_id="big", prompt_token_ids=[5] * 10, params=SamplingParams(max_tokens=100)))


def test_blocks_return_after_a_thousand_mixed_requests_with_cancellations(tiny_engine_factory):
    rng = random.Random(0)
    budget = 24
    engine = tiny_engine_factory(max_batch_size=6, kv_cache_tokens=512, max_num_batched_tokens=budget)
    free_at_start = engine.blocks.num_free_blocks
    finished: dict[str, str] = {}
    live: list[str] = []
    for i in range(1000):
        params = SamplingParams(max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 0.8]),
                                seed=i, ignore_eos=rng.random() < 0.5, stop=("ab",) if i % 7 == 0 else ())
        engine.add(GenerationRequest(request_id=str(i), prompt_token_ids=[rng.randint(5, 400)
                                     for _ in range(rng.randint(1, 60))], params=params))
        live.append(str(i))
        if rng.random() < 0.15:
            engine.cancel(rng.choice(live))
        for _ in range(rng.randint(0, 2)):
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out.finish_reason
            assert engine.last_step_tokens <= budget
    while engine.has_work:
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.finish_reason
    assert len(finished) == 1000
    assert "cancelled" in finished.values() and "length" in finished.values()
    assert engine.blocks.num_free_blocks == free_at_start
    engine.blocks.check_invariants([])  # every block free or cached, none held


def test_fragmented_cache_reads_through_block_gathers_with_the_same_tokens(tiny_engine_factory, lively_model,
                                                                          reference):
    """Sequences whose blocks are scattered (no consecutive run) take the gather path everywhere."""
    engine = tiny_engine_factory(max_num_batched_tokens=8, kv_cache_tokens=4096)
    blocks = engine.blocks
    blocks._free.sort(key=lambda b: (b % 2, b))  # handed out every other block, descending: no run
    got = run(engine, requests(lively_model[1]))
    assert {k: v[1] for k, v in got.items()} == reference
    reqs = requests(lively_model[1])
    for r in reqs:
        engine.add(r)
    engine.step()
    assert all(s.first_slot is None for s in engine.running)  # really scattered
    run(engine, [])


def test_an_overrunning_step_shrinks_the_next_budget_and_it_grows_back(tiny_engine_factory):
    engine = tiny_engine_factory(max_batch_size=4, max_num_batched_tokens=256, step_time_target_s=0.5)
    sched = engine.scheduler
    engine._adapt_budget(1.0, 256)  # twice the target: half the tokens
    assert sched.token_budget == 128
    engine._adapt_budget(10.0, 128)  # far over: never below MIN_PREFILL
    assert sched.token_budget == 16
    engine._adapt_budget(0.1, 16)
    assert sched.token_budget == 21  # back up by a quarter per step within the target
    for _ in range(30):
        engine._adapt_budget(0.1, 16)
    assert sched.token_budget == 256  # capped at max_num_batched_tokens
    sched.token_budget = 20
    engine.add(GenerationRequest(request_id="long", prompt_token_ids=list(range(5, 205)),
                                 params=SamplingParams(max_tokens=2, temperature=0)))
    plan = sched.schedule()
    assert [n for _, n in plan.prefills] == [20]  # the step takes what the budget allows


def test_while_rows_decode_a_chunk_deep_into_a_long_prompt_is_charged_for_its_attention(tiny_engine_factory):
    """A prompt token after p cached positions costs 1 + p / horizon of the budget while other
    sequences decode (their streams wait for the step); alone, a prompt takes the full budget."""
    def long_prompt():
        return GenerationRequest(request_id="long", prompt_token_ids=[5 + i % 400 for i in range(700)],
                                 params=SamplingParams(max_tokens=2, temperature=0))

    def chunks(engine, decoding_rows: int) -> list[int]:
        sizes = []
        while any(s.request_id == "long" and not s.prefilled for s in [*engine.running, *engine.waiting]):
            engine.step()
            sizes.append(engine.last_step_tokens - decoding_rows)
        return sizes

    alone = tiny_engine_factory(max_num_batched_tokens=64)
    horizon = alone.scheduler.attention_horizon
    assert 0 < horizon < 700  # the tiny model's layers are narrow: attention weighs early
    alone.add(long_prompt())
    assert chunks(alone, 0) == [64] * 10 + [700 - 640]

    busy = tiny_engine_factory(max_num_batched_tokens=64)
    busy.add(GenerationRequest(request_id="row", prompt_token_ids=[7, 8, 9], params=SamplingParams(
        max_tokens=500, temperature=0, ignore_eos=True)))
    busy.step()  # "row" decodes from now on, one token a step
    busy.add(long_prompt())
    sizes, past = chunks(busy, 1), 0
    for n in sizes[:-1]:
        assert n == max(MIN_PREFILL, int(63 / (1 + past / horizon)))
        past += n
    assert past + sizes[-1] == 700 and sizes[-1] <= max(MIN_PREFILL, int(63 / (1 + past / horizon)))
    assert sizes[0] == 63 and sizes[-2] < 63 / 2  # deep into the prompt, less than half the start's


def test_a_prompt_arriving_behind_a_charged_chunk_waits_instead_of_trickling_in(tiny_engine_factory):
    """What rounding leaves of a budget a deep chunk was charged for admits nobody."""
    engine = tiny_engine_factory(max_num_batched_tokens=64)
    engine.add(GenerationRequest(request_id="row", prompt_token_ids=[7, 8, 9], params=SamplingParams(
        max_tokens=500, temperature=0, ignore_eos=True)))
    engine.step()
    engine.add(GenerationRequest(request_id="long", prompt_token_ids=[5 + i % 400 for i in range(700)],
                                 params=SamplingParams(max_tokens=2, temperature=0)))
    engine.step()
    engine.add(GenerationRequest(request_id="short", prompt_token_ids=list(range(10, 40)),
                                 params=SamplingParams(max_tokens=2, temperature=0)))
    while any(s.request_id == "long" and not s.prefilled for s in engine.running):
        assert [s.request_id for s in engine.waiting] == ["short"]  # not admitted to a token a step
        engine.step()

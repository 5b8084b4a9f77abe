"""Prompt-lookup speculative decoding: the drafts, and that checking them changes no token."""

import random

import pytest
import torch

from serve_app.engine.speculation import NgramIndex, check_drafts
from serve_app.engine.types import GenerationRequest, SamplingParams
from tests.conftest import engine_factory, random_llama
from tests.test_engine import run

# Prompts that repeat themselves (drafts get proposed and kept) and one that does not.
PROMPTS = ["one two three four one two three four one two three four one two",
           "a b a b a b a b a b a b a b",
           "The quick brown fox jumps over the lazy dog while serving models"]


def index(tokens):
    ngrams = NgramIndex()
    ngrams.extend(tokens)
    return ngrams


def test_a_draft_is_what_followed_the_latest_earlier_occurrence_of_the_suffix():
    assert index([1, 2, 3, 9, 1, 2]).propose(3) == [3, 9, 1]
    assert index([1, 2, 3, 1, 2, 4, 1, 2]).propose(1) == [4]  # the latest occurrence wins
    assert index([7, 1, 2, 3, 8, 1, 2, 3]).propose(2) == [8, 1]  # the longest n-gram (3) is tried first


def test_a_loop_gives_full_drafts_and_no_match_gives_none():
    assert index([5, 7, 8, 7, 8]).propose(5) == [7, 8, 7, 8, 7]  # continues past the present, same period
    assert index([1, 2, 3, 4]).propose(4) == []
    assert index([3, 3]).propose(2) == []  # shorter than the shortest n-gram with a continuation


def test_the_index_grows_with_the_sequence():
    ngrams = index([1, 2, 3])
    assert ngrams.propose(2) == []
    ngrams.extend([4, 1, 2])
    assert ngrams.propose(2) == [3, 4]


def greedy(rid, ids, n=40, **kw):
    return GenerationRequest(request_id=rid, prompt_token_ids=ids,
                             params=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw))


def tokens_of(result):
    return {rid: v[1] for rid, v in result.items()}


@pytest.fixture
def encode(lively_model):
    return lambda text: lively_model[1](text)["input_ids"]


@pytest.fixture(scope="module")
def looping_engine_factory(lively_model):
    """Engines on a random Llama (smaller init than lively_model's) whose greedy output falls
    into loops of varied period and breaks out of them: drafts get kept and rejected."""
    tokenizer = lively_model[1]
    return engine_factory(random_llama(tokenizer, 0.1), tokenizer)


@pytest.mark.parametrize("model", ["looping", "lively"])
def test_speculation_gives_the_same_tokens(looping_engine_factory, tiny_engine_factory, encode, model):
    factory = looping_engine_factory if model == "looping" else tiny_engine_factory
    plain = factory(num_speculative_tokens=0)
    spec = factory(num_speculative_tokens=4, speculative_max_rows=1)
    for i, text in enumerate(PROMPTS):
        req = greedy(str(i), encode(text))
        assert tokens_of(run(spec, [req])) == tokens_of(run(plain, [req])), text
    assert spec.draft_tokens > spec.accepted_draft_tokens  # some drafts were rejected
    if model == "looping":
        assert spec.accepted_draft_tokens > 0


def test_a_looping_sequence_finishes_in_fewer_steps(looping_engine_factory, encode):
    engine = looping_engine_factory(num_speculative_tokens=4, speculative_max_rows=1)
    engine.add(greedy("r", encode(PROMPTS[1]), n=60))
    steps = 0
    while engine.has_work:
        engine.step()
        steps += 1
    assert steps < 40


def test_speculating_batches_match_plain_ones_with_rows_joining_and_finishing(looping_engine_factory, encode):
    reqs = [greedy(str(i), encode(t), n=8 + 11 * i) for i, t in enumerate(PROMPTS * 2)]
    plain = tokens_of(run(looping_engine_factory(num_speculative_tokens=0), reqs))
    spec = looping_engine_factory(num_speculative_tokens=4, speculative_max_rows=8)
    assert tokens_of(run(spec, reqs)) == plain
    assert spec.accepted_draft_tokens > 0


def test_drafts_end_at_max_tokens_stop_strings_and_eos(looping_engine_factory, encode, lively_model):
    plain = looping_engine_factory(num_speculative_tokens=0)
    spec = looping_engine_factory(num_speculative_tokens=8, speculative_max_rows=1)
    ids = encode(PROMPTS[1])
    for n in (1, 2, 3, 5, 9):  # a draft never overshoots max_tokens
        a, b = run(plain, [greedy("n", ids, n=n)]), run(spec, [greedy("n", ids, n=n)])
        assert a["n"][1] == b["n"][1] and len(b["n"][1]) == n and b["n"][2].finish_reason == "length"
    text = run(plain, [greedy("t", ids, n=30)])["t"][0]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    a, b = run(plain, [greedy("s", ids, n=30, stop=[stop])]), run(spec, [greedy("s", ids, n=30, stop=[stop])])
    assert (a["s"][0], a["s"][2].finish_reason) == (b["s"][0], b["s"][2].finish_reason) == (a["s"][0], "stop")
    # EOS inside a kept draft ends the sequence there: the draft's tokens after it are dropped.
    eos = lively_model[1].eos_token_id
    spec.add(GenerationRequest(request_id="e", prompt_token_ids=ids, params=SamplingParams(max_tokens=30,
                                                                                         temperature=0)))
    spec.step()  # prefilled, one token sampled
    seq = spec.running[0]
    before = list(seq.output_ids)
    out = spec._emit(seq, [11, eos, 12, 13])  # what check_drafts returns for a fully kept draft [11, eos, 12]
    assert (out.token_ids, out.finish_reason) == ([11, eos], "stop")
    assert seq.output_ids == before + [11, eos] and not spec.has_work


def test_seeded_logprob_and_penalty_rows_decode_one_token_per_step(looping_engine_factory, encode):
    engine = looping_engine_factory(num_speculative_tokens=4, speculative_max_rows=8)
    ids = encode(PROMPTS[1])
    run(engine, [GenerationRequest(request_id="s", prompt_token_ids=ids,
                                   params=SamplingParams(max_tokens=30, temperature=0.8, seed=1, ignore_eos=True)),
                 greedy("l", ids, n=30, logprobs=2), greedy("p", ids, n=30, repetition_penalty=1.2)])
    assert engine.draft_tokens == 0
    # Seeded sampling is unaffected by a greedy neighbour that speculates.
    sampled = GenerationRequest(request_id="s", prompt_token_ids=ids,
                                params=SamplingParams(max_tokens=30, temperature=0.8, seed=1, ignore_eos=True))
    alone = run(engine, [sampled])["s"][1]
    assert run(engine, [sampled, greedy("g", ids)])["s"][1] == alone
    assert engine.draft_tokens > 0


def test_no_drafts_while_a_prompt_waits_or_above_the_row_limit(looping_engine_factory, encode):
    engine = looping_engine_factory(num_speculative_tokens=4, speculative_max_rows=2)
    ids = encode(PROMPTS[1])
    for i in range(3):
        engine.add(greedy(str(i), ids))
    while engine.has_work:
        engine.step()
    assert engine.draft_tokens == 0  # three rows decoding together, the limit is two
    engine.add(greedy("a", ids, n=60))
    for _ in range(30):  # alone: it drafts once its output starts looping
        engine.step()
        if engine.draft_tokens:
            break
    before = engine.draft_tokens
    assert before > 0
    engine.add(greedy("b", encode(PROMPTS[2] * 8)))  # its prompt is prefilled over several steps
    engine.scheduler.token_budget = engine.scheduler.max_num_batched_tokens = 16
    engine.step()
    assert engine.draft_tokens == before  # the prompt's step carries no drafts


def test_budget_holds_and_blocks_return_with_drafts_and_cancellations(looping_engine_factory):
    engine = looping_engine_factory(max_batch_size=4, num_speculative_tokens=6, speculative_max_rows=4,
                                 max_num_batched_tokens=16, kv_cache_tokens=1024)
    free = engine.blocks.num_free_blocks
    rng = random.Random(0)
    loop = [rng.randrange(5, 200) for _ in range(4)]
    for i in range(150):
        ids = loop * rng.randint(1, 6) if i % 2 else [rng.randrange(5, 200) for _ in range(rng.randint(1, 30))]
        engine.add(greedy(str(i), ids, n=rng.randint(1, 24)))
        if rng.random() < 0.2:
            engine.cancel(str(rng.randrange(i + 1)))
        for _ in range(rng.randint(0, 3)):
            engine.step()
            assert engine.last_step_tokens <= 16
    while engine.has_work:
        engine.step()
        assert engine.last_step_tokens <= 16
    assert engine.blocks.num_free_blocks == free
    assert engine.accepted_draft_tokens > 0


def test_kept_drafts_leave_the_same_cache_a_plain_run_does(looping_engine_factory, encode):
    """A later token attends to kept drafts' keys: they must equal one-token-per-step keys."""
    ids = encode(PROMPTS[1])
    engines = [looping_engine_factory(num_speculative_tokens=k, speculative_max_rows=1) for k in (0, 4)]
    for engine in engines:
        engine.add(greedy("c", ids, n=60))
        while not engine.running or len(engine.running[0].output_ids) < 20:
            engine.step()
    assert engines[1].accepted_draft_tokens > 0
    a, b = (e.running[0] for e in engines)
    n = min(a.num_cached, b.num_cached)
    slots = [e.running[0].slot_map[:n] for e in engines]
    for layer in range(len(engines[0].kv.keys)):
        ka, kb = (e.kv.flat(e.kv.keys[layer])[s] for e, s in zip(engines, slots))
        torch.testing.assert_close(ka, kb, atol=1e-4, rtol=1e-4)


def test_sampled_rows_speculate(looping_engine_factory, encode):
    ids = encode(PROMPTS[1])
    engine = looping_engine_factory(num_speculative_tokens=4, speculative_max_rows=8)
    run(engine, [GenerationRequest(request_id=str(i), prompt_token_ids=ids,
                                   params=SamplingParams(max_tokens=16, temperature=0.1, ignore_eos=True))
                 for i in range(8)])
    assert 0 < engine.accepted_draft_tokens < engine.draft_tokens


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_checking_a_draft_keeps_the_sampling_distribution(top_p):
    """20,000 rows with the draft [1]: the first token must follow position 0's (filtered)
    distribution, and the token after a kept draft position 1's, as one draw per step would."""
    p0, p1 = torch.tensor([0.5, 0.3, 0.15, 0.05]), torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 20_000
    logits = torch.stack([p0.log(), p1.log()] * n)
    params = [SamplingParams(temperature=1.0, top_p=top_p)] * n
    generators = [torch.Generator().manual_seed(i) for i in range(n)]
    emitted = check_drafts(logits, [[1]] * n, params, generators)

    def filtered(p):  # top-p as the sampler applies it: drop a token once the mass before it reaches top_p
        sorted_p, order = p.sort(descending=True)
        keep = torch.zeros_like(p)
        keep[order] = ((sorted_p.cumsum(0) - sorted_p) < top_p).float()
        return p * keep / (p * keep).sum()

    first = torch.bincount(torch.tensor([e[0] for e in emitted]), minlength=4) / n
    torch.testing.assert_close(first, filtered(p0), atol=0.02, rtol=0)
    kept = [e for e in emitted if e[0] == 1]
    assert all(len(e) == 2 for e in kept) and all(len(e) == 1 for e in emitted if e[0] != 1)
    second = torch.bincount(torch.tensor([e[1] for e in kept]), minlength=4) / len(kept)
    torch.testing.assert_close(second, filtered(p1), atol=0.03, rtol=0)


def test_checking_a_greedy_draft_keeps_the_argmax_prefix():
    logits = torch.eye(5)[[2, 3, 0, 4]].float()  # the argmax at the four positions: 2, 3, 0, 4
    greedy = SamplingParams(temperature=0)
    assert check_drafts(logits, [[2, 3, 0]], [greedy], [None]) == [[2, 3, 0, 4]]  # all kept + the bonus
    assert check_drafts(logits, [[2, 1, 0]], [greedy], [None]) == [[2, 3]]  # kept up to the mismatch
    assert check_drafts(logits[:2], [[4]], [greedy], [None]) == [[2]]

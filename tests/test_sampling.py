import torch

import pytest

from serve_app.engine import sampling
from serve_app.engine.sampling import make_generator, nucleus, sample_next_tokens
from serve_app.engine.types import SamplingParams


def test_greedy_picks_argmax_for_every_row():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    params = [SamplingParams(temperature=0)] * 2
    assert sample_next_tokens(logits, params, [None, None]) == [1, 0]


def test_seeded_sampling_replays_and_seeds_differ():
    logits = torch.randn(1, 1000)
    def draw(seed):
        p = SamplingParams(temperature=1.0, seed=seed)
        gen = make_generator(p, torch.device("cpu"))
        return [sample_next_tokens(logits, [p], [gen])[0] for _ in range(20)]
    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_each_row_uses_its_own_params():
    logits = torch.randn(3, 500)
    greedy = SamplingParams(temperature=0)
    topk1 = SamplingParams(temperature=1.5, top_k=1)
    hot = SamplingParams(temperature=2.0, seed=1)
    gens = [None, make_generator(topk1, torch.device("cpu")), make_generator(hot, torch.device("cpu"))]
    tokens = sample_next_tokens(logits, [greedy, topk1, hot], gens)
    argmax = logits.argmax(-1).tolist()
    assert tokens[0] == argmax[0]
    assert tokens[1] == argmax[1]  # top_k=1 is greedy whatever the temperature
    # The hot row samples: over many draws it does not always pick the argmax.
    draws = {sample_next_tokens(logits[2:], [hot], [gens[2]])[0] for _ in range(50)}
    assert len(draws) > 1


PROBS = [0.5, 0.3, 0.15, 0.05]


def test_nucleus_keeps_top_k_then_nucleus_per_row():
    probs = torch.tensor([PROBS, PROBS, PROBS, PROBS])
    kept, ids, exact = nucleus(probs, top_k=torch.tensor([2, 0, 0, 3]), top_p=torch.tensor([1.0, 0.7, 0.9, 0.8]))
    on = [set(ids[r][kept[r] > 0].tolist()) for r in range(4)]
    assert on[0] == {0, 1}  # top-2
    assert on[1] == {0, 1}  # 0.5 + 0.3 >= 0.7
    assert on[2] == {0, 1, 2}  # 0.5 + 0.3 < 0.9 <= 0.95
    assert on[3] == {0, 1}  # top-3 leaves 0.95; 0.8 of that is reached after 0.5 + 0.3 (0.84)
    assert exact.all()


def test_a_nucleus_wider_than_the_candidates_is_marked_inexact(monkeypatch):
    monkeypatch.setattr(sampling, "CANDIDATES", 2)
    _, _, exact = nucleus(torch.tensor([PROBS, PROBS]), top_k=torch.tensor([0, 0]), top_p=torch.tensor([0.7, 0.9]))
    assert exact.tolist() == [True, False]


def frequencies(params: SamplingParams, draws: int = 4000) -> list[float]:
    logits = torch.log(torch.tensor([PROBS] * draws))
    gen = make_generator(params, torch.device("cpu"))
    tokens = sample_next_tokens(logits, [params] * draws, [gen] * draws)
    return [tokens.count(t) / draws for t in range(len(PROBS))]


@pytest.mark.parametrize("candidates", [2, 256])  # 2: the 0.9 nucleus is sampled by rejection
def test_draws_follow_the_filtered_distribution(monkeypatch, candidates):
    monkeypatch.setattr(sampling, "CANDIDATES", candidates)
    for got, want in zip(frequencies(SamplingParams(temperature=1.0, seed=3)), PROBS):
        assert abs(got - want) < 0.03
    for top_p, want in ((0.7, [0.5 / 0.8, 0.3 / 0.8, 0, 0]), (0.9, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])):
        got = frequencies(SamplingParams(temperature=1.0, top_p=top_p, seed=4))
        assert all(abs(g - w) < 0.03 for g, w in zip(got, want)), (top_p, got)
    got = frequencies(SamplingParams(temperature=1.0, top_k=3, top_p=0.8, seed=5))
    assert all(abs(g - w) < 0.03 for g, w in zip(got, [0.5 / 0.8, 0.3 / 0.8, 0, 0])), got


def test_a_seeded_row_draws_the_same_alone_or_in_any_batch():
    logits = torch.randn(5, 2000)
    params = [SamplingParams(temperature=0.8, top_p=0.9, seed=11), SamplingParams(temperature=0),
              SamplingParams(temperature=1.3, seed=5), SamplingParams(temperature=0.7, top_k=40, seed=9),
              SamplingParams(temperature=1.0, seed=2)]
    def gens():
        return [make_generator(p, torch.device("cpu")) for p in params]
    together = sample_next_tokens(logits, params, gens())
    alone = [sample_next_tokens(logits[i:i + 1], [params[i]], [gens()[i]])[0] for i in range(5)]
    assert together == alone


def test_inverse_cdf_picks_the_crossing_column_and_never_a_zero_one():
    """The searched column, except where rounding puts the target at the row's total mass:
    then the last nonzero column (a row of zeros gives column 0, as before)."""
    probs = torch.tensor([[0.2, 0.0, 0.3, 0.5, 0.0, 0.0],
                          [0.2, 0.0, 0.3, 0.5, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                          [0.0, 0.0, 0.7, 0.0, 0.3, 0.0]])
    largest_below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
    uniform = torch.tensor([0.3, 1.0, 0.5, largest_below_one])
    assert sampling.inverse_cdf(probs, uniform).tolist() == [2, 3, 0, 4]


def test_inverse_cdf_equals_the_full_vocabulary_rule_on_random_rows():
    def reference(probs, uniform):  # every row clamped to its last nonzero column
        cdf = probs.cumsum(dim=-1)
        found = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        return torch.minimum(found, (probs > 0).cumsum(dim=-1).argmax(dim=-1))

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        vocab = int(torch.randint(2, 40, (1,), generator=g))
        probs = torch.rand(8, vocab, generator=g)
        probs[torch.rand(8, vocab, generator=g) < 0.5] = 0
        uniform = torch.rand(8, generator=g)
        uniform[0], uniform[1] = 0.0, 1.0
        assert torch.equal(sampling.inverse_cdf(probs, uniform), reference(probs, uniform))

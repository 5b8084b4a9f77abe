import torch

from serve_app.engine.sampling import filter_logits, make_generator, sample_next_tokens
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


def test_filter_logits_keeps_top_k_and_nucleus_per_row():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]]))
    out = filter_logits(logits, top_k=torch.tensor([2, 0]), top_p=torch.tensor([1.0, 0.7]))
    kept = torch.isfinite(out)
    assert kept[0].tolist() == [True, True, False, False]  # top-2
    assert kept[1].tolist() == [True, True, False, False]  # 0.5 + 0.3 >= 0.7

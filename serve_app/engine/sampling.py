"""Next-token selection where each row of the batch has its own parameters."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from serve_app.engine.types import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-sequence RNG: seeded requests replay exactly, whatever batch they land in."""
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    return gen


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k / nucleus (rows: k=0 and p=1 mean off)."""
    vocab = logits.shape[-1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, vocab).unsqueeze(-1)
    remove = ranks >= k
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
    # Drop a token once the mass before it already reaches top_p (the top token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= top_p.unsqueeze(-1)
    remove[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


def sample_next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> list[int | Exception]:
    """Pick one token per row (or the error that row met). `logits` is [batch, vocab] for the
    last position."""
    logits = logits.float()
    greedy_tokens = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return greedy_tokens.tolist()

    rows = torch.tensor(sampled_rows, device=logits.device)
    sub = logits.index_select(0, rows)
    temps = torch.tensor([params[i].temperature for i in sampled_rows], device=logits.device)
    sub = sub / temps.unsqueeze(-1)
    if any(params[i].top_k > 0 or params[i].top_p < 1.0 for i in sampled_rows):
        top_k = torch.tensor([params[i].top_k for i in sampled_rows], device=logits.device)
        top_p = torch.tensor([params[i].top_p for i in sampled_rows], device=logits.device)
        sub = filter_logits(sub, top_k, top_p)
    probs = sub.softmax(dim=-1)

    tokens: list[int | Exception] = greedy_tokens.tolist()
    for j, i in enumerate(sampled_rows):
        try:
            tokens[i] = int(torch.multinomial(probs[j], 1, generator=generators[i]).item())
        except RuntimeError as e:  # NaN/inf in this row's distribution: this row fails, not the batch
            tokens[i] = e
    return tokens


def process_logits(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[tuple[list[int], list[int]]],
    eos_token_ids: Sequence[int],
) -> torch.Tensor:
    """Apply each row's penalties, logit bias and min_tokens (in place; rows that ask for
    none are untouched). `histories[i]` = (prompt ids, output ids) of row i."""
    device = logits.device
    for i, p in enumerate(params):
        if not p.processes_logits:
            continue
        row = logits[i]
        prompt_ids, output_ids = histories[i]
        if p.repetition_penalty != 1.0:  # HF/vLLM: divide positive logits, multiply negative ones
            ids = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), device=device, dtype=torch.long)
            seen = row[ids]
            row[ids] = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        if output_ids and (p.presence_penalty or p.frequency_penalty):  # OpenAI: output tokens only
            ids, counts = torch.tensor(output_ids, device=device).unique(return_counts=True)
            row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=device, dtype=torch.long)
            row[ids] += torch.tensor(list(p.logit_bias.values()), device=device, dtype=row.dtype)
        if len(output_ids) < p.min_tokens and eos_token_ids:
            row[list(eos_token_ids)] = float("-inf")
    return logits


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: Sequence[int]
                   ) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row: the log-probability of its chosen token and its `top[i]` most likely tokens,
    under the model's own distribution (before penalties and temperature, as vLLM reports)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logits.device).unsqueeze(1)).squeeze(1).tolist()
    k = max(top, default=0)
    top_values, top_ids = logp.topk(k, dim=-1) if k else (None, None)
    out = []
    for i, n in enumerate(top):
        alternatives = list(zip(top_ids[i, :n].tolist(), top_values[i, :n].tolist())) if n else []
        out.append((chosen[i], alternatives))
    return out

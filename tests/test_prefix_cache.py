"""Prefix caching: the block manager's bookkeeping, and an engine that reuses cached prompts
while producing exactly what it produces without them."""

import random

import pytest
import torch

from serve_app.engine.block_manager import BlockManager
from serve_app.engine.prefix_hash import block_hashes
from serve_app.engine.sequence import Sequence
from serve_app.engine.types import GenerationRequest, SamplingParams

BS = 16


class _NoTokenizer:
    def decode(self, ids, **kw):
        return ""


def seq(rid: str, prompt: list[int], max_tokens: int = 8, salt: str = "m") -> Sequence:
    request = GenerationRequest(request_id=rid, prompt_token_ids=prompt,
                                params=SamplingParams(max_tokens=max_tokens, temperature=0))
    return Sequence(request, _NoTokenizer(), torch.device("cpu"), 4096, BS, salt)


def computed(manager: BlockManager, s: Sequence, upto: int) -> None:
    """Pretend a step computed the sequence's tokens up to `upto`."""
    s.num_cached = upto
    manager.mark_computed(s)


# ------------------------------------------------------------------ block manager


def test_a_repeated_prompt_shares_its_full_blocks_but_computes_its_last_token():
    m = BlockManager(64, BS)
    prompt = list(range(100, 148))  # 48 tokens: 3 full blocks
    a = seq("a", prompt)
    assert m.allocate(a) and a.num_cached == 0
    computed(m, a, 48)
    b = seq("b", prompt)
    assert m.allocate(b)
    # The block holding the last prompt token is computed again: its logits start the output.
    assert b.num_cached == b.num_cached_prompt == 32
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [m.blocks[i].ref_count for i in a.block_table[:3]] == [2, 2, 1]
    assert m.hits == 32 and m.queries == 96
    m.check_invariants([a, b])


def test_different_salts_never_share():
    m = BlockManager(64, BS)
    prompt = list(range(64))
    a = seq("a", prompt, salt="m|tenant-1")
    m.allocate(a)
    computed(m, a, 64)
    b = seq("b", prompt, salt="m|tenant-2")
    m.allocate(b)
    assert b.num_cached_prompt == 0 and not set(a.block_table) & set(b.block_table)


def test_finished_blocks_stay_cached_until_a_new_block_is_needed_least_recent_first():
    m = BlockManager(8, BS)
    a = seq("a", list(range(33)), max_tokens=15)  # 48 tokens: 3 blocks, 2 full prompt blocks
    m.allocate(a)
    computed(m, a, 33)
    m.free(a)
    assert m.num_free_blocks == 8 and m.num_cached_blocks == 2
    # A request an empty cache would admit is admitted: it takes every block, evicting the cached ones.
    big = seq("big", list(range(1000, 1100)), max_tokens=28)  # 128 tokens = all 8 blocks
    assert m.allocate(big)
    assert m.num_free_blocks == 0 and not set(a.block_hashes) & set(m._by_hash)
    m.free(big)
    again = seq("again", list(range(33)))
    m.allocate(again)
    assert again.num_cached_prompt == 0  # evicted
    m.check_invariants([again])


def test_eviction_takes_the_least_recently_used_prefix_first():
    m = BlockManager(6, BS)
    for name, base in (("old", 0), ("new", 500)):
        s = seq(name, list(range(base, base + 33)), max_tokens=15)
        m.allocate(s)
        computed(m, s, 33)
        m.free(s)
    s = seq("x", list(range(900, 917)), max_tokens=15)  # 2 blocks: both free ones + ... evicts
    m.allocate(s)
    t = seq("y", list(range(800, 817)), max_tokens=15)  # needs 2 more: evicts the oldest cached blocks
    m.allocate(t)
    new = seq("new2", list(range(500, 533)))
    old = seq("old2", list(range(0, 33)))
    m.free(s), m.free(t)
    m.allocate(new)
    assert new.num_cached_prompt == 32  # the recently used prefix survived
    m.allocate(old)
    assert old.num_cached_prompt == 0


def test_a_prefix_being_computed_is_shared_and_waited_for_not_computed_twice():
    m = BlockManager(64, BS)
    prompt = list(range(70))  # 4 full blocks + 6 tokens
    a, b = seq("a", prompt), seq("b", prompt)
    assert m.allocate(a) and m.allocate(b)
    assert b.block_table[:4] == a.block_table[:4]
    assert m.writable_end(a, 100) == 70  # the writer goes on
    assert m.writable_end(b, 100) == 0  # the follower waits for the shared blocks
    computed(m, a, 40)
    m.skip_computed(b)
    assert b.num_cached == 32 and m.writable_end(b, 100) == 32  # two blocks done, the third in progress
    computed(m, a, 70)
    m.skip_computed(b)
    assert b.num_cached == 64 and m.writable_end(b, 100) == 70  # the rest is its own


def test_when_the_writer_of_a_shared_block_leaves_a_follower_writes_it():
    m = BlockManager(64, BS)
    prompt = list(range(70))
    a, b = seq("a", prompt), seq("b", prompt)
    m.allocate(a), m.allocate(b)
    computed(m, a, 20)  # one block written
    m.free(a)  # cancelled
    m.skip_computed(b)
    assert b.num_cached == 16
    assert m.writable_end(b, 100) == 70  # it now writes the blocks a left unwritten
    computed(m, b, 70)
    m.free(b)
    m.check_invariants([])
    c = seq("c", prompt)
    m.allocate(c)
    assert c.num_cached_prompt == 64


def test_the_ingress_and_the_engine_hash_a_prompt_alike():
    prompt = list(range(50))
    assert seq("a", prompt, salt="m|").block_hashes == block_hashes(prompt, BS, "m|")


# ------------------------------------------------------------------ engine


@pytest.fixture
def encode(lively_model):
    tokenizer = lively_model[1]
    return lambda text: tokenizer(text)["input_ids"]


def drive(engine, requests):
    """Run to completion; {request_id: final output with all its tokens and logprobs}."""
    for r in requests:
        engine.add(r)
    final = {}
    while engine.has_work:
        for out in engine.step():
            if out.request_id in final:
                final[out.request_id].absorb(out)
            else:
                final[out.request_id] = out
        engine.blocks.check_invariants(engine.running)
    return final


SYSTEM = ("You are a support agent for a parcel company. Be brief and polite. Refunds take five days. "
          "Never share a customer's address. Escalate damaged parcels to a human. ") * 3


def greedy(rid, ids, n=12, **kw):
    return GenerationRequest(request_id=rid, prompt_token_ids=ids,
                             params=SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw))


@pytest.mark.parametrize("budget", [8, 256])
def test_multi_turn_outputs_equal_the_uncached_engines_and_later_turns_hit(tiny_engine_factory, encode, budget):
    cached = tiny_engine_factory(max_num_batched_tokens=budget)
    plain = tiny_engine_factory(max_num_batched_tokens=budget, enable_prefix_caching=False)
    histories = {u: encode(SYSTEM + f" User {u} asks: where is my parcel?") for u in range(3)}
    for turn in range(3):
        reqs = [greedy(f"{u}-{turn}", ids, logprobs=2) for u, ids in histories.items()]
        got, want = drive(cached, reqs), drive(plain, reqs)
        for r in reqs:
            assert got[r.request_id].token_ids == want[r.request_id].token_ids
            for (lp, top), (lp2, top2) in zip(got[r.request_id].logprobs, want[r.request_id].logprobs):
                assert lp == pytest.approx(lp2, abs=1e-4)
                assert [t for t, _ in top] == [t for t, _ in top2]
            assert want[r.request_id].cached_tokens == 0
            if turn:
                # Everything but the new user message (and the block holding the last token) was cached.
                assert got[r.request_id].cached_tokens >= len(histories[0]) - 40
        for u in histories:
            histories[u] = histories[u] + got[f"{u}-{turn}"].token_ids + encode(f" and turn {turn}?")
    assert cached.blocks.hits > 0 and plain.blocks.hits == 0


def test_n_choices_and_simultaneous_users_share_one_prefill(tiny_engine_factory, encode):
    engine = tiny_engine_factory(max_num_batched_tokens=64)
    ids = encode(SYSTEM)
    reqs = [greedy(f"c{j}", ids, n=6) for j in range(4)]
    computed_tokens = 0
    for r in reqs:
        engine.add(r)
    final = {}
    while engine.has_work:
        for out in engine.step():
            final.setdefault(out.request_id, []).extend(out.token_ids)
        computed_tokens += engine.last_step_tokens
        engine.blocks.check_invariants(engine.running)
    assert len({tuple(v) for v in final.values()}) == 1  # greedy choices of one prompt agree
    prompt_blocks = (len(ids) - 1) // 16
    # The shared blocks were computed once, not four times.
    assert computed_tokens <= len(ids) + 3 * (len(ids) - 16 * prompt_blocks) + 4 * 6


def test_speculation_and_prefix_caching_together_give_the_plain_tokens(tiny_engine_factory, encode):
    plain = tiny_engine_factory(num_speculative_tokens=0, enable_prefix_caching=False)
    both = tiny_engine_factory(num_speculative_tokens=4, speculative_max_rows=8)
    prompt = encode(SYSTEM + " repeat repeat repeat repeat")
    for turn in range(2):
        reqs = [greedy(f"s{turn}", prompt, n=30)]
        got, want = drive(both, reqs), drive(plain, reqs)
        assert got[f"s{turn}"].token_ids == want[f"s{turn}"].token_ids
        prompt = prompt + got[f"s{turn}"].token_ids + encode(" again")
    assert both.blocks.hits > 0


def test_no_step_writes_into_a_block_another_sequence_already_reads(tiny_engine_factory, encode, monkeypatch):
    """Every write goes to a block that its writer owns and that is not yet computed."""
    import serve_app.engine.batch_engine as batch_engine

    engine = tiny_engine_factory(max_num_batched_tokens=32, num_speculative_tokens=4)
    real_pack = batch_engine.pack_step
    writes = []

    def checked_pack(plan, *args):
        step = real_pack(plan, *args)
        owners = {}
        for s in [*plan.decodes, *(s for s, _ in plan.prefills), *(s for s, _ in plan.drafts)]:
            for b in s.block_table:
                owners.setdefault(b, []).append(s.request_id)
        for slot in step.layout.write_slots.tolist():
            block = engine.blocks.blocks[slot // 16]
            assert not block.computed, f"write into computed block {block}"
            assert block.owner is not None and block.owner in owners[block.id], block
            writes.append(slot)
        return step

    monkeypatch.setattr(batch_engine, "pack_step", checked_pack)
    rng = random.Random(1)
    base = encode(SYSTEM)
    for i in range(24):
        prompt = base[:rng.randint(20, len(base))] + encode(f" question {i % 5}")
        engine.add(greedy(str(i), prompt, n=rng.randint(1, 20)))
        if rng.random() < 0.2:
            engine.cancel(str(rng.randint(0, i)))
        for _ in range(rng.randint(0, 3)):
            engine.step()
            engine.blocks.check_invariants(engine.running)
    while engine.has_work:
        engine.step()
    engine.blocks.check_invariants([])
    assert writes and engine.blocks.hits > 0
    assert all(b.ref_count == 0 for b in engine.blocks.blocks)


def test_under_memory_pressure_cached_blocks_are_evicted_and_outputs_stay_right(tiny_engine_factory, encode):
    small = tiny_engine_factory(max_batch_size=4, kv_cache_tokens=256)
    roomy = tiny_engine_factory(max_batch_size=4, enable_prefix_caching=False)
    reqs = [greedy(f"p{i}", encode(f"prompt number {i} " * (3 + i % 4)), n=10) for i in range(12)]
    reqs += [greedy("p0-again", reqs[0].prompt_token_ids, n=10)]
    got, want = drive(small, reqs), drive(roomy, reqs)
    assert {k: v.token_ids for k, v in got.items()} == {k: v.token_ids for k, v in want.items()}
    assert small.blocks.num_free_blocks == small.blocks.num_blocks
    assert small.blocks.num_cached_blocks < sum(len(r.prompt_token_ids) // 16 for r in reqs)  # some were evicted


@pytest.mark.parametrize("dtype,kv_dtype", [(torch.float32, torch.float32), (torch.float32, torch.float16),
                                            (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
def test_the_compiled_decode_kernel_equals_gathered_sdpa(dtype, kv_dtype):
    """The paged decode kernel (built with the machine's C compiler) against torch's gather + SDPA."""
    from serve_app.engine import cpu_kernels

    if cpu_kernels.library() is None:
        pytest.fail("the CPU kernels did not build on this machine (gcc is part of its toolchain)")
    hkv, group, d, bs, rows = 3, 3, 64, 16, 5
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(40, bs, hkv, d, generator=gen).to(kv_dtype)
    values = torch.randn(40, bs, hkv, d, generator=gen).to(kv_dtype)
    tables = torch.randperm(40, generator=gen)[:rows * 6].view(rows, 6)
    lens = torch.tensor([1, 17, 50, 96, 33])
    q = torch.randn(rows, hkv * group, d, generator=gen).to(dtype)
    out = torch.empty_like(q)
    cpu_kernels.paged_decode_attention(q, keys, values, tables, lens, out, d ** -0.5)
    k = keys.index_select(0, tables.flatten()).view(rows, -1, hkv, d).transpose(1, 2).float()
    v = values.index_select(0, tables.flatten()).view(rows, -1, hkv, d).transpose(1, 2).float()
    mask = (torch.arange(6 * bs) < lens.unsqueeze(1)).view(rows, 1, 1, -1)
    want = torch.nn.functional.scaled_dot_product_attention(q.float().view(rows, hkv, group, d), k, v,
                                                            attn_mask=mask).view(rows, -1, d)
    torch.testing.assert_close(out.float(), want, atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)
    assert out.dtype == dtype

"""Decode steps through static buffers (decode_graphs.py), the path a GPU replays as CUDA graphs.

No GPU here, so what is checked is everything but the capture: `Rerun` runs the captured function
(LlamaRunner.decode_forward) over the same static buffers a CUDA graph would read. Greedy tokens
must equal those of the eager engine (the CPU kernels) while the batch shrinks across row buckets
(steps where it grows carry prompt chunks and run eagerly) and the sequences' block tables grow
across width buckets; padding rows must write only the scratch block and leave the padding
block zero; a failed capture and an oversized gather fall back to eager steps; `paged_decode`
(the graph's attention, and the eager one on a GPU or without the CPU kernels) must equal
attention over the gathered keys, grouped by length or not.
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.gpu_check import staggered
from serve_app.config import ModelServingArgs
from serve_app.engine import attention, cpu_kernels, decode_graphs
from serve_app.engine.attention import DecodeRows, group_by_length, paged_decode, paged_decode_by_length
from serve_app.engine.decode_graphs import ROW_BUCKETS, DecodeGraphs, StaticDecode, bucket
from serve_app.engine.kv_cache import KVCache
from tests.conftest import engine_factory, random_llama, reference_decode_attention


def staggered_greedy(engine, prompts: list[list[int]]) -> dict[str, list[int]]:
    """Requests join one per step and end at different lengths: the decode batch grows through
    1, 2, 3 ... rows, the last requests wait for a slot and take the blocks of finished ones, the
    batch shrinks again, and the longest sequence reaches 70+ positions (5+ blocks of 16)."""
    return staggered(engine, prompts, lambda i: 12 + 12 * (i % 6))


@pytest.mark.parametrize("weights,kv", [(torch.float32, "float32"), (torch.bfloat16, "float16")])
def test_decode_steps_through_static_buffers_decode_as_the_eager_engine(lively_model, weights, kv):
    _, tokenizer = lively_model
    model = random_llama(tokenizer, 0.3).to(weights)
    make = functools.partial(engine_factory(model, tokenizer), max_batch_size=8)
    eager = make(runner="native", num_speculative_tokens=0, kv_cache_dtype=kv, enable_prefix_caching=False)
    graphed = make(runner="native", num_speculative_tokens=0, kv_cache_dtype=kv, enable_prefix_caching=False)
    runner = graphed.runner
    assert runner.graphs is None  # no GPU: off unless installed, as here
    runner.graphs = runner.decode_graphs(graphed.max_batch_size, capture=False)

    prompts = [tokenizer(text)["input_ids"] for text in
               ("The quick brown fox", "Ray Serve routes requests", "0123456789 +-*/", "Hello, world! How are",
                "a", "Streaming tokens arrive one by one", "Paged attention", "One more", "The last of them",
                "tokens")]
    outputs = staggered_greedy(graphed, prompts)
    assert outputs == staggered_greedy(eager, prompts)
    assert len(set(map(tuple, outputs.values()))) == len(prompts)

    shapes = set(runner.graphs.graphs)
    assert {rows for rows, _ in shapes} >= {1, 2, 4, 8}  # 3, 5, 6 rows ran padded to 4 and 8
    assert {blocks for _, blocks in shapes} >= {1, 2, 4, 8}  # tables grew past 1, 2 and 4 blocks
    # The padding rows wrote nowhere but the scratch block: every other block (the padding block
    # included, which stays zero) holds what the eager engine's holds.
    cache = graphed.kv
    assert not cache.keys[0][cache.pad_block].any()
    for mine, theirs in ((cache.keys, eager.kv.keys), (cache.values, eager.kv.values)):
        for layer in range(len(mine)):
            torch.testing.assert_close(mine[layer][:cache.scratch_block], theirs[layer][:cache.scratch_block],
                                       atol=2e-3, rtol=2e-3)


def test_rows_beyond_a_step_are_padding_whatever_ran_before():
    """A graph's static buffers keep the last step's rows; the rows a smaller step does not use must
    decode padding (token 0 at position 0, into and from the scratch block), never a stale row that
    would write into blocks a finished sequence gave back. A row's columns past its own table may
    keep stale blocks: its length masks them."""
    seen = []

    def forward(cache, *buffers):
        seen.append([b.clone() for b in buffers])
        return torch.zeros(len(buffers[0]), 5)

    cache = KVCache(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=10, block_size=4, dtype=torch.float32,
                    device=torch.device("cpu"))
    graph = StaticDecode(forward, cache, torch.empty(4, 5), blocks=4, capture=False, pool=None)

    def step(ids, positions, slots, tables, lens):
        return graph(torch.tensor(ids), torch.tensor(positions), torch.tensor(slots),
                     DecodeRows(0, len(ids), torch.tensor(tables), torch.tensor(lens), lens))

    assert step([5, 6, 7], [9, 2, 4], [13, 18, 24], [[1, 2, 3], [4, 0, 0], [6, 7, 0]], [10, 3, 5]).shape == (3, 5)
    assert step([8], [2], [9], [[2]], [3]).shape == (1, 5)
    ids, positions, slots, tables, lens = seen[-1]
    scratch, pad = cache.scratch_block, cache.pad_block
    assert ids.tolist() == [8, 0, 0, 0] and positions.tolist() == [2, 0, 0, 0] and lens.tolist() == [3, 1, 1, 1]
    assert slots.tolist() == [9] + [scratch * 4] * 3
    assert tables[0, 0] == 2 and tables[1:].tolist() == [[scratch, pad, pad, pad]] * 3


def test_an_engine_without_the_cpu_kernels_decodes_through_paged_decode(lively_model, monkeypatch):
    """Where the kernels cannot be built (no compiler), decode rows go through paged_decode grouped
    by length, as on a GPU outside a graph: the tokens must be the kernels'."""
    _, tokenizer = lively_model
    make = functools.partial(engine_factory(random_llama(tokenizer, 0.3), tokenizer), runner="native",
                             num_speculative_tokens=0, enable_prefix_caching=False, max_batch_size=8)
    prompts = [tokenizer(text)["input_ids"] for text in
               ("The quick brown fox", "Ray Serve routes requests", "0123456789 +-*/", "a", "Hello there")]
    with_kernels = staggered_greedy(make(), prompts)
    grouped = []
    real = attention.paged_decode_by_length

    def counting(q, k, v, seg, scale):
        grouped.append(len(seg.length_groups(k.shape[1])))
        return real(q, k, v, seg, scale)

    monkeypatch.setattr(attention, "paged_decode_by_length", counting)
    monkeypatch.setattr(cpu_kernels, "supports", lambda *args: False)
    assert staggered_greedy(make(), prompts) == with_kernels
    assert max(grouped) > 1  # rows of different lengths were attended in groups


def test_the_graphs_are_keyed_by_row_and_block_buckets():
    graphs = DecodeGraphs(lambda *a: None, max_rows=40, max_model_len=100, vocab=5, capture=False)
    assert graphs.row_buckets == ROW_BUCKETS[:ROW_BUCKETS.index(48) + 1]  # 40 rows run as 48
    assert [bucket(n, graphs.row_buckets) for n in (1, 3, 5, 9, 17, 25, 33, 40)] == [1, 4, 8, 16, 24, 32, 48, 48]
    assert DecodeGraphs(lambda *a: None, max_rows=1000, max_model_len=100, vocab=5,
                        capture=False).row_buckets == ROW_BUCKETS


def random_rows(cache_dtype: torch.dtype, lengths: list[int], heads=6, kv_heads=2, head_dim=16, block_size=4,
                blocks=40):
    """A random cache and decode rows over it: (query, k_cache, v_cache, DecodeRows)."""
    torch.manual_seed(0)
    k_cache = torch.randn(blocks, block_size, kv_heads, head_dim).to(cache_dtype)
    v_cache = torch.randn(blocks, block_size, kv_heads, head_dim).to(cache_dtype)
    width = -(-max(lengths) // block_size)
    tables = torch.stack([torch.randperm(blocks)[:width] for _ in lengths])
    rows = DecodeRows(0, len(lengths), tables, torch.tensor(lengths), lengths)
    return torch.randn(len(lengths), heads, head_dim), k_cache, v_cache, rows


@pytest.mark.parametrize("cache_dtype,compute,tolerance", [
    (torch.float32, None, 1e-5), (torch.float16, None, 1e-5),
    (torch.float16, torch.float16, 2e-3), (torch.bfloat16, torch.bfloat16, 2e-2)])  # computed in the cache's dtype
def test_paged_decode_equals_attention_over_the_gathered_keys(cache_dtype, compute, tolerance):
    q, k_cache, v_cache, rows = random_rows(cache_dtype, [10, 1, 16, 37])
    head_dim = q.shape[-1]
    out = paged_decode(q, k_cache, v_cache, rows.block_tables, rows.lens, head_dim ** -0.5, compute)
    assert out.dtype == q.dtype
    expected = reference_decode_attention(q, k_cache, v_cache, rows.block_tables, rows.lengths, head_dim ** -0.5)
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)


def test_rows_grouped_by_length_attend_as_one_padded_call():
    """The eager GPU path groups decode rows by length (each group gathers only its longest row's
    blocks); the result must be the one padded call's."""
    q, k_cache, v_cache, rows = random_rows(torch.float16, [150, 3, 70, 9, 148, 1])
    assert len(group_by_length(rows.lengths)) > 2
    torch.testing.assert_close(paged_decode_by_length(q, k_cache, v_cache, rows, 0.25),
                               paged_decode(q, k_cache, v_cache, rows.block_tables, rows.lens, 0.25))


def test_a_failed_capture_leaves_the_engine_decoding_eagerly(lively_model, caplog):
    _, tokenizer = lively_model
    make = functools.partial(engine_factory(random_llama(tokenizer, 0.3), tokenizer), runner="native",
                             num_speculative_tokens=0, enable_prefix_caching=False)
    eager, graphed = make(), make()

    def failing_forward(*buffers):
        raise RuntimeError("CUDA error: out of memory (while capturing)")

    graphed.runner.graphs = DecodeGraphs(failing_forward, 8, graphed.max_model_len, graphed.runner.vocab,
                                         capture=False)
    prompts = [tokenizer(text)["input_ids"] for text in ("The quick brown fox", "Ray Serve routes requests")]
    with caplog.at_level("ERROR"):
        assert staggered_greedy(graphed, prompts) == staggered_greedy(eager, prompts)
    assert graphed.runner.graphs.failed and not graphed.runner.graphs.graphs
    assert "decode steps run eagerly" in caplog.text


def test_decode_steps_whose_padded_gather_is_too_large_run_eagerly(lively_model, monkeypatch):
    _, tokenizer = lively_model
    engine = engine_factory(random_llama(tokenizer, 0.3), tokenizer)(runner="native", num_speculative_tokens=0)
    runner = engine.runner
    runner.graphs = runner.decode_graphs(8, capture=False)
    # this model's cache: 2 KV heads x 16 dims x 4 bytes x 16 positions = 2 KiB per block, keys and values
    monkeypatch.setattr(decode_graphs, "GRAPH_MAX_GATHER_BYTES", 2 * 2 * 2048)  # rows x blocks <= 2
    outputs = staggered_greedy(engine, [tokenizer("The quick brown fox jumps over")["input_ids"]] * 2)
    assert [len(tokens) for tokens in outputs.values()] == [12, 24]
    assert set(runner.graphs.graphs) == {(2, 1), (1, 2)}  # 2 rows over 2 blocks ran eagerly


def test_cuda_graphs_are_on_by_default_and_reach_the_engine():
    from serve_app.engine.factory import engine_config

    assert ModelServingArgs().cuda_graphs
    assert engine_config(ModelServingArgs(), "cuda", 2048).cuda_graphs
    assert not engine_config(ModelServingArgs(cuda_graphs=False), "cuda", 2048).cuda_graphs

"""The compiled CPU kernels of the native runner (serve_app/engine/kernels/*.c) against torch.

- linear_bf16w.c: bfloat16 weights multiplied in float32 must equal a float32 product over the
  same (bf16-rounded) weights, for every tile height, ragged column blocks and bias;
- layer_ops.c: residual + RMSNorm, SiLU x up and rotary equal the torch ops the runner uses
  where the kernels do not exist;
- paged_attention.c (common.h's attend_run_*): decode attention over scattered blocks equals
  softmax attention over the gathered keys and values (float32 or float16 cache), for a few rows
  (a task per row and KV head) and many (a task per row); runs of a draft's or a prompt's tokens
  (one read of each row for all of them) through the engines below, blocks of 16 and 5;
- end to end: an engine on bf16 weights (the kernel) gives the same greedy tokens as an engine
  on the same weights widened to float32 (oneDNN/MKL), on the lively model whose greedy output
  changes from token to token;
- the same kernels built for an AVX2 CPU (-march=haswell), whose plain-C paths this AVX-512
  machine would otherwise never run.
"""

from __future__ import annotations

import copy
import platform

import pytest
import torch
import torch.nn.functional as F

from serve_app.engine import cpu_kernels, llama
from serve_app.engine.precision import choose_kv_dtype
from serve_app.engine.types import GenerationRequest, SamplingParams
from tests.conftest import engine_factory, random_llama, reference_decode_attention


@pytest.fixture(scope="module", autouse=True)
def kernels():
    if cpu_kernels.library() is None:
        pytest.fail("the CPU kernels did not build on this machine (gcc is part of its toolchain)")


@pytest.mark.parametrize("rows", [1, 2, 5, 11, 12, 13, 40])
@pytest.mark.parametrize("out_features,in_features,bias", [(96, 64, False), (70, 37, True), (1, 576, True)])
def test_bf16_weight_linear_equals_a_float32_product(rows, out_features, in_features, bias):
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=gen).bfloat16()
    b = torch.randn(out_features, generator=gen) if bias else None
    x = torch.randn(rows, in_features, generator=gen)
    got = cpu_kernels.BF16WeightLinear(weight, b)(x)
    want = F.linear(x.double(), weight.double(), None if b is None else b.double()).float()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    # packing float32 weights rounds them to bf16 as torch does
    torch.testing.assert_close(cpu_kernels.BF16WeightLinear(weight.float(), b)(x), got, atol=0, rtol=0)


def test_fused_layer_ops_equal_the_torch_ops():
    ops = cpu_kernels.layer_ops(torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for rows in (1, 7, 300):  # 300 x 576 runs the row loop on several threads
        x = torch.randn(rows, 576, generator=gen)
        delta = torch.randn(rows, 576, generator=gen)
        weight = torch.rand(576, generator=gen) + 0.5
        want_x = x + delta
        want = torch.rms_norm(want_x, (576,), weight, 1e-5)
        got = ops.add_rms_norm(x, delta, weight, 1e-5)
        torch.testing.assert_close(x, want_x)  # the residual is updated in place
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ops.add_rms_norm(x, None, weight, 1e-5), want, atol=1e-5, rtol=1e-5)

        gate_up = torch.randn(rows, 2 * 96, generator=gen) * 8  # large |gate| on both sides
        gate, up = gate_up.chunk(2, dim=-1)
        torch.testing.assert_close(ops.silu_mul(gate_up), F.silu(gate) * up, atol=1e-5, rtol=1e-5)

    heads, kv_heads, d, length = 6, 2, 64, 100
    cos = torch.randn(length, 1, d, generator=gen)
    sin = torch.randn(length, 1, d, generator=gen)
    qkv = torch.randn(9, heads + 2 * kv_heads, d, generator=gen)
    positions = torch.tensor([0, 5, 99, 3, 3, 50, 1, 2, 7])
    qk, v = qkv[:, :heads + kv_heads], qkv[:, heads + kv_heads:]
    c, s = cos.index_select(0, positions), sin.index_select(0, positions)
    want = qk * c + torch.cat((-qk[..., d // 2:], qk[..., :d // 2]), dim=-1) * s
    want_v = v.clone()
    ops.rope(qkv, heads + kv_heads, positions, cos, sin)
    torch.testing.assert_close(qkv[:, :heads + kv_heads], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(qkv[:, heads + kv_heads:], want_v)  # values untouched


@pytest.mark.parametrize("rows", [3, 12])
@pytest.mark.parametrize("head_dim", [64, 24])  # 24: not a multiple of 16, the plain loops
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bs", [16, 5])  # the kernel walks block by block: a last block partly filled
def test_paged_decode_attention_equals_attention_over_gathered_blocks(rows, head_dim, cache_dtype, bs):
    gen = torch.Generator().manual_seed(rows)
    heads, kv_heads, blocks = 6, 2, 64
    k_cache = torch.randn(blocks, bs, kv_heads, head_dim, generator=gen).to(cache_dtype)
    v_cache = torch.randn(blocks, bs, kv_heads, head_dim, generator=gen).to(cache_dtype)
    lens = torch.randint(1, 6 * bs, (rows,), generator=gen)
    tables = torch.stack([torch.randperm(blocks, generator=gen)[:6] for _ in range(rows)])  # scattered blocks
    q = torch.randn(rows, heads, head_dim, generator=gen)
    out = torch.empty_like(q)
    cpu_kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, out, head_dim ** -0.5)
    torch.testing.assert_close(out, reference_decode_attention(q, k_cache, v_cache, tables, lens, head_dim ** -0.5),
                               atol=1e-5, rtol=1e-5)


def test_auto_kv_cache_is_float16_for_16_bit_weights_on_cpu_and_float32_for_float32_weights():
    cpu = torch.device("cpu")
    assert choose_kv_dtype("auto", torch.float32, cpu, torch.bfloat16)[0] == torch.float16
    assert choose_kv_dtype("auto", torch.float32, cpu, torch.float32)[0] == torch.float32
    assert choose_kv_dtype("bfloat16", torch.float32, cpu, torch.bfloat16) == (torch.bfloat16, "configured")
    assert choose_kv_dtype("auto", torch.bfloat16, torch.device("cuda"), torch.bfloat16)[0] == torch.bfloat16
    assert choose_kv_dtype("auto", torch.float32, torch.device("cuda"), torch.bfloat16)[0] == torch.float16
    assert choose_kv_dtype("auto", torch.float32, torch.device("cuda"), torch.float32)[0] == torch.float32


def greedy_outputs(engine, prompts: list[list[int]], max_tokens: int = 24) -> dict[str, list[int]]:
    for i, prompt in enumerate(prompts):  # one batch: tiles of several heights, prompts beside decodes
        engine.add(GenerationRequest(request_id=str(i), prompt_token_ids=prompt,
                                     params=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)))
    done: dict[str, list[int]] = {}
    while engine.has_work:
        for out in engine.step():
            done.setdefault(out.request_id, []).extend(out.token_ids)
    return done


@pytest.mark.parametrize("init,speculative,prefix_cache,intermediate,kv", [
    (0.3, 0, False, 128, "float32"), (0.1, 4, False, 128, "float32"), (0.3, 0, True, 128, "float32"),
    (0.3, 0, False, 80, "float32"), (0.3, 0, False, 128, "float16"), (0.1, 4, True, 128, "float16")])
def test_an_engine_on_bf16_weights_decodes_as_float32_over_the_same_weights(lively_model, monkeypatch, init,
                                                                            speculative, prefix_cache, intermediate,
                                                                            kv):
    """The bf16 engine runs the fused forward (llama_forward.c) for its decode steps, drafts and
    short prompts, and our product kernel elsewhere; the float32 one runs torch's products and
    SDPA, without a prefix cache. init 0.3: greedy output that changes from token to token; 0.1:
    output that loops, so prompt-lookup drafts are checked (causal chunks inside the fused
    forward); prefix_cache: prompts sharing their first blocks read them from the cache;
    intermediate 80 (not a multiple of the 32-column block): the MLP's product and activation
    as two passes instead of one; kv: both engines' cache (float16: the fused forward's
    conversions and attention against torch's and the float16 decode kernel's). On a CPU with bf16
    instructions, oneDNN's bf16 products (activations rounded to bf16) would take over in larger
    steps and the tokens could differ: that path's accuracy is test_precision's; here our kernels
    do every product."""
    monkeypatch.setattr(llama, "native_bf16_min_tokens", lambda: None)
    _, tokenizer = lively_model
    model = random_llama(tokenizer, init, intermediate)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    widened = copy.deepcopy(bf16).float()
    engines = {name: engine_factory(m, tokenizer)(runner="native", enable_prefix_caching=cache,
                                                  num_speculative_tokens=speculative, kv_cache_dtype=kv)
               for name, m, cache in (("bf16", bf16, prefix_cache), ("float32", widened, False))}
    assert isinstance(engines["bf16"].runner.layers[0].qkv.bf16w, cpu_kernels.BF16WeightLinear)
    assert engines["float32"].runner.layers[0].qkv.bf16w is None
    prompts = [tokenizer(text)["input_ids"] for text in
               ("The quick brown fox", "Ray Serve routes requests", "0123456789 +-*/", "Hello, world! How are")]
    prompts.append(tokenizer("a long prompt " * 120)["input_ids"])  # a chunk too long to fuse: SDPA
    if prefix_cache:  # the same 48-token start, then different ends
        shared = tokenizer("Ray Serve routes requests to replicas that run a language model. " * 4)["input_ids"][:48]
        prompts += [shared + p for p in prompts[:3]]
    outputs = {name: greedy_outputs(engine, prompts) for name, engine in engines.items()}
    if prefix_cache:  # and once more, now that the shared blocks are computed and cached
        outputs = {name: {**outputs[name], **{f"again-{k}": v for k, v in greedy_outputs(engine, prompts[-3:]).items()}}
                   for name, engine in engines.items()}
        assert engines["bf16"].blocks.num_cached_blocks > 0
    assert outputs["bf16"] == outputs["float32"]
    assert engines["bf16"].runner._fused is not None  # the fused forward ran
    assert engines["bf16"].kv.keys[0].dtype == engines["float32"].kv.keys[0].dtype == getattr(torch, kv)
    if speculative:
        assert engines["bf16"].accepted_draft_tokens > 0
    else:
        assert len(set(map(tuple, outputs["bf16"].values()))) == len(prompts)


@pytest.mark.parametrize("kv", ["float32", "float16"])
def test_drafts_and_prompt_chunks_attend_in_runs_across_block_edges(lively_model, kv):
    """The fused forward attends a draft's tokens, and a short prompt's, as runs that read each key
    and value row once (common.h attend_runs, at most ATTEND_RUN_MAX tokens each). With blocks of
    5 positions, runs start and end inside blocks and cross their edges; the greedy tokens must
    still be the float32 engine's (torch's products and SDPA)."""
    import dataclasses

    from serve_app.config import ModelServingArgs
    from serve_app.engine.batch_engine import BatchEngine
    from serve_app.engine.factory import engine_config
    from serve_app.engine.loading import eos_token_ids

    _, tokenizer = lively_model
    bf16 = random_llama(tokenizer, 0.1, 128).to(torch.bfloat16)
    widened = copy.deepcopy(bf16).float()

    def engine(model):
        args = ModelServingArgs(max_batch_size=8, runner="native", num_speculative_tokens=4, kv_cache_dtype=kv,
                                enable_prefix_caching=False)
        config = dataclasses.replace(engine_config(args, "cpu", 2048), block_size=5)
        return BatchEngine(model, tokenizer, eos_token_ids(model, tokenizer), config)

    engines = {"bf16": engine(bf16), "float32": engine(widened)}
    prompts = [tokenizer(text)["input_ids"] for text in ("The quick brown fox", "Ray Serve routes requests to",
                                                         "0123456789 +-*/ 0123456789")]
    outputs = {name: greedy_outputs(e, prompts, max_tokens=40) for name, e in engines.items()}
    assert outputs["bf16"] == outputs["float32"]
    assert engines["bf16"].runner._fused is not None
    assert engines["bf16"].kv.block_size == 5
    assert engines["bf16"].accepted_draft_tokens > 0


@pytest.fixture
def built_without_avx512(monkeypatch):
    """The kernels as gcc builds them for an AVX2 CPU (-march=haswell: AVX2, FMA, F16C; no AVX-512):
    the plain-C paths that laptops and AMD CPUs before Zen 4 run, which this machine would not."""
    if platform.machine() != "x86_64":
        pytest.skip("-march=haswell is an x86 target")
    monkeypatch.setattr(cpu_kernels, "FLAGS", [f if f != "-march=native" else "-march=haswell"
                                               for f in cpu_kernels.FLAGS])
    cpu_kernels.library.cache_clear()
    if cpu_kernels.library() is None:
        pytest.fail("the kernels did not build for -march=haswell")
    yield
    cpu_kernels.library.cache_clear()


def test_the_kernels_built_without_avx512_attend_and_decode_alike(built_without_avx512, lively_model):
    """The plain product tile (3 rows at a time) and attention (float16 rows widened with F16C, not
    one element at a time) against their references, and an engine with drafts and short prompts
    on bf16 weights against float32."""
    for rows in (1, 2, 3, 4, 7, 40):
        test_bf16_weight_linear_equals_a_float32_product(rows, 70, 37, True)
    for rows, head_dim, cache_dtype, bs in ((3, 64, torch.float16, 5), (40, 64, torch.float16, 16),
                                            (12, 48, torch.float32, 16)):
        test_paged_decode_attention_equals_attention_over_gathered_blocks(rows, head_dim, cache_dtype, bs)
    test_drafts_and_prompt_chunks_attend_in_runs_across_block_edges(lively_model, "float16")

"""The load generator and report writers against the running test server (fields and counts, not speed)."""

import asyncio

from bench.cpu import CpuMeter
from bench.loadgen import Workload, run_load
from bench.report import chart, cpu_table, markdown_table
from tests.conftest import TINY


def test_loadgen_fixed_concurrency_report(server, tmp_path):
    meter = CpuMeter()
    meter.start()
    report = asyncio.run(run_load(server, TINY, Workload(input_tokens=16, output_tokens=8), num_requests=6,
                                  concurrency=3))
    report["cpu"] = meter.stop(report["duration_s"], report["output_tokens"])
    assert report["completed"] == 6 and report["failed_by_status"] == {}
    assert report["output_tokens"] == 48
    assert report["output_tokens_per_s"] > 0 and report["request_throughput"] > 0
    assert 0 < report["steady_output_tokens_per_s"] and report["steady_window_s"] <= report["duration_s"]
    # The serving processes are found by their Ray names and did work.
    assert report["cpu"]["replica"]["cores"] > 0 and report["cpu"]["ingress"]["cpu_ms_per_token"] > 0
    for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        assert set(report[metric]) == {"p50", "p90", "p99", "mean"}
    assert report["ttft_s"]["p50"] <= report["e2e_s"]["p50"]
    report["system"] = "serve_app"
    table = markdown_table([report])
    assert "serve_app" in table and "6/6" in table
    assert "replica" in cpu_table([report])
    chart([report], offline_tps=100.0, path=tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 1000


def test_loadgen_poisson_and_mixed_lengths(server):
    workload = Workload(input_tokens=16, mixed_output=(2, 12), seed=3)
    report = asyncio.run(run_load(server, TINY, workload, num_requests=5, request_rate=20.0))
    assert report["completed"] == 5 and report["mode"] == "rate=20.0/s"
    lengths = [n for _, n in workload.requests(5)]
    assert len(set(lengths)) > 1 and lengths == [n for _, n in workload.requests(5)]  # seeded


def test_loadgen_counts_failures_by_status(server):
    report = asyncio.run(run_load(server, "not-a-model", Workload(8, 2), num_requests=3, concurrency=3))
    assert report["completed"] == 0 and report["failed_by_status"] == {404: 3}


def test_loadgen_chat_with_natural_stops_and_long_prompts(server):
    chat = asyncio.run(run_load(server, TINY, Workload(chat=True, output_tokens=6, natural_stops=True), 3,
                                concurrency=3))
    assert chat["completed"] == 3 and chat["output_tokens"] > 0
    long = Workload(16, 4, long_prompts=(0.5, 300, 400), seed=1)
    sizes = [len(p.split()) for p, _ in long.requests(8)]
    assert min(sizes) == 16 and max(sizes) >= 300
    report = asyncio.run(run_load(server, TINY, long, 4, concurrency=2))
    assert report["completed"] == 4 and report["itl_max_s"] is not None


def test_speculation_bench_runs_both_engines_to_the_same_tokens(tiny_engine_factory, lively_model):
    from bench.speculation import run

    prompts = [lively_model[1](p)["input_ids"] for p in ("a b a b a b a b", "hello world")]
    results = [run(tiny_engine_factory(num_speculative_tokens=k), prompts, 12, True) for k in (0, 4)]
    assert all(rate > 0 for rate, _ in results)
    assert results[0][1] == results[1][1] and all(len(t) == 12 for t in results[0][1])


def test_cached_tokens_read_from_openai_usage_or_llama_cpp_timings():
    from bench.loadgen import cached_tokens

    assert cached_tokens({"usage": {"prompt_tokens": 90, "prompt_tokens_details": {"cached_tokens": 64}}}) == 64
    # llama-server's own field, where usage has no details
    assert cached_tokens({"usage": {"prompt_tokens": 90}, "timings": {"cache_n": 80, "prompt_n": 10}}) == 80
    assert cached_tokens({"usage": {"prompt_tokens": 90, "prompt_tokens_details": None}}) == 0
    assert cached_tokens({"choices": []}) == 0


def test_multiturn_chat_carries_history_and_reports_turns(server, tiny_model):
    from bench.multiturn import CUSTOMERS, MultiTurnChat, run_multiturn
    from bench.report import multiturn_table

    system = "You are the store's assistant. Returns are accepted within 30 days."
    chat = MultiTurnChat(users=3, turns=3, max_tokens=4, ignore_eos=True, system_prompt=system)
    report = asyncio.run(run_multiturn(server, TINY, chat, fresh_connections=True))
    assert report["completed"] == 9 and report["failed_by_status"] == {}
    assert report["output_tokens"] == 9 * 4
    turns = report["turns"]
    assert [(t["user"], t["turn"]) for t in turns] == [(u, k) for u in range(3) for k in range(3)]
    tokenizer = tiny_model[1]
    for user in range(3):
        mine = [t for t in turns if t["user"] == user]
        assert all(t["reply"] for t in mine)
        # Each turn sent the system prompt, this user's questions so far and the replies actually given.
        conversation = [{"role": "system", "content": system}]
        for t in mine:
            conversation.append({"role": "user", "content": CUSTOMERS[user][t["turn"]]})
            expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]
            assert t["prompt_tokens"] == len(expected), (user, t["turn"])
            conversation.append({"role": "assistant", "content": t["reply"]})
    assert report["prompt_tokens"] == sum(t["prompt_tokens"] for t in turns)
    assert report["cached_prompt_tokens"] == sum(t["cached_tokens"] for t in turns)
    assert 0 <= report["cached_fraction"] <= 1
    assert report["first_turn_ttft_s"]["p50"] > 0 and report["later_turn_ttft_s"]["p50"] > 0
    report["system"] = "serve_app"
    assert "| serve_app |" in multiturn_table([report])


def test_run_reports_a_ratio_for_every_target_row(tmp_path, monkeypatch):
    import bench.run
    from bench.run import MULTITURN, PREFILL, SCENARIOS, llama_cpp_fits, ratios, targets, write_reports

    def run(system, label, tok_s, itl, ttft, later=None):
        r = {"system": system, "scenario": label, "completed": 1, "steady_output_tokens_per_s": tok_s,
             "output_tokens_per_s": tok_s, "itl_s": {"p50": itl}, "ttft_s": {"p50": ttft},
             "cpu": {"proxy + ingress + router": {"cores": 0.1}}}
        if later is not None:
            r |= {"later_turn_ttft_s": {"p50": later}, "first_turn_ttft_s": {"p50": 2 * later},
                  "cached_fraction": 0.5 if system == "serve_app" else 0.75}
        return r

    runs = []
    for system, speed in (("serve_app", 1.0), ("llama.cpp BF16", 2.0), ("llama.cpp F32", 4.0)):
        runs += [run(system, SCENARIOS[0][0], 100 * speed, 0.1 / speed, 1.0),
                 run(system, "concurrency 1", 10 * speed, 0.2 / speed, 1.0),
                 run(system, PREFILL, 1, None, 3.0 / speed),
                 run(system, MULTITURN, 20 * speed, 0.1, 1.0, later=0.6 / speed)]
    runs.append(run("serve_app ×2", MULTITURN, 20, 0.1, 1.0, later=0.5) | {"cached_fraction": 0.45})
    runs.append(run("serve_app ×2, least loaded", MULTITURN, 20, 0.1, 1.0, later=0.5) | {"cached_fraction": 0.25})
    runs.append(run(bench.run.VARIANTS["cache-off"][0], SCENARIOS[0][0], 80, 0.1, 1.0))
    runs.append(run(bench.run.VARIANTS["with-embedder"][0], SCENARIOS[0][0], 99, 0.1, 1.0))
    offline = {"output_tokens_per_s": 200.0, "duration_s": 10.0, "output_tokens": 640, "batch_size": 32,
               "prefill_s": 0.5}
    found = ratios(runs, offline, ["bf16", "f32"], replicas=2)
    for key, *_ in targets(["bf16", "f32"], replicas=2):
        assert key in found, key
    assert found["closed_loop_vs_llama_cpp_bf16"] == 0.5 and found["closed_loop_vs_llama_cpp_f32"] == 0.25
    assert found["c1_itl_p50_vs_llama_cpp_bf16"] == 2.0
    assert found["prefill_2k_ttft_vs_llama_cpp_f32"] == 4.0
    assert found["multiturn_later_ttft_vs_llama_cpp_bf16"] == 2.0
    assert found["multiturn_cached_fraction"] == 0.5
    assert abs(found["multiturn_cached_fraction_replicas_vs_1"] - 0.9) < 1e-9
    assert found["multiturn_cached_fraction_least_loaded_vs_1"] == 0.5
    assert found["closed_loop_cache_on_vs_off"] == 1.25 and found["closed_loop_with_embedder_vs_alone"] == 0.99
    # Without serve_app and the offline limit, the peers' rows are simply absent.
    alone = [r for r in runs if r["system"] != "serve_app"]
    assert ratios(alone, None, ["bf16"])["closed_loop_vs_llama_cpp_bf16"] is None
    monkeypatch.setattr(bench.run, "RESULTS", tmp_path)
    write_reports("peers", {"model": "m", "machine": "x", "server_args": {}, "offline": None, "replicas": 1,
                            "llama_cpp_types": ["bf16"], "ratios": ratios(alone, None, ["bf16"]), "runs": []})
    assert "| closed loop c=32 mixed, steady tok/s ÷ llama.cpp BF16 | not run | ≥ 1.0 | |" in \
        (tmp_path / "peers.md").read_text()
    # llama-server's 2,048-token slots hold every scenario but the 2-3k-token prompts.
    fits = {label: llama_cpp_fits(kw, 65536 // 32) for label, kw in SCENARIOS}
    assert [label for label, ok in fits.items() if not ok] == ["closed loop c=16, 10% long prompts"]

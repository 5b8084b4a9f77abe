"""Benchmark results as a Markdown table and a PNG chart."""

from __future__ import annotations

from pathlib import Path


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def markdown_table(runs: list[dict]) -> str:
    head = ("| system | load | workload | done | failed | req/s | out tok/s | TTFT p50 / p99 ms "
            "| TPOT p50 ms | ITL p99 ms | E2E p50 / p99 ms |")
    rows = [head, "|" + "---|" * 11]
    for r in runs:
        w = r["workload"]
        workload = f"{w['input_tokens']}→{w['mixed_output'] or w['output_tokens']}"
        failed = ", ".join(f"{k}: {v}" for k, v in r["failed_by_status"].items()) or "0"
        rows.append(
            f"| {r['system']} | {r['mode']} | {workload} | {r['completed']}/{r['num_requests']} | {failed} "
            f"| {r['request_throughput']:.2f} | {r['output_tokens_per_s']:.1f} "
            f"| {_ms(r['ttft_s']['p50'])} / {_ms(r['ttft_s']['p99'])} | {_ms(r['tpot_s']['p50'])} "
            f"| {_ms(r['itl_s']['p99'])} | {_ms(r['e2e_s']['p50'])} / {_ms(r['e2e_s']['p99'])} |")
    return "\n".join(rows)


def chart(runs: list[dict], offline_tps: float | None, path: Path) -> None:
    """Throughput and p99 TTFT against concurrency, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    systems = sorted({r["system"] for r in runs if r["concurrency"]})
    for system in systems:
        points = sorted((r["concurrency"], r) for r in runs
                        if r["system"] == system and r["concurrency"] and not r["workload"]["mixed_output"])
        xs = [c for c, _ in points]
        left.plot(xs, [r["output_tokens_per_s"] for _, r in points], marker="o", label=system)
        right.plot(xs, [r["ttft_s"]["p99"] * 1000 for _, r in points], marker="o", label=system)
    if offline_tps:
        left.axhline(offline_tps, linestyle="--", color="gray", label="offline limit (static batch)")
    right.set_yscale("log")
    for ax, title in ((left, "output tokens/s"), (right, "p99 TTFT (ms, log)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

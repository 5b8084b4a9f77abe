"""Benchmark results as Markdown tables and a PNG chart."""

from __future__ import annotations

from pathlib import Path


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _label(r: dict) -> str:
    return r.get("scenario") or r["mode"]


def markdown_table(runs: list[dict]) -> str:
    head = ("| system | scenario | load | workload | done | failed | out tok/s | steady tok/s | TTFT p50 / p90 ms "
            "| ITL p50 / p99 / max ms | TPOT p50 ms | E2E p50 / p99 ms |")
    rows = [head, "|" + "---|" * 12]
    for r in runs:
        failed = ", ".join(f"{k}: {v}" for k, v in r["failed_by_status"].items()) or "0"
        steady = r.get("steady_output_tokens_per_s")
        rows.append(
            f"| {r['system']} | {_label(r)} | {r['mode']} | {r.get('workload_label', '')} "
            f"| {r['completed']}/{r['num_requests']} | {failed} | {r['output_tokens_per_s']:.1f} "
            f"| {'-' if steady is None else f'{steady:.1f}'} "
            f"| {_ms(r['ttft_s']['p50'])} / {_ms(r['ttft_s']['p90'])} "
            f"| {_ms(r['itl_s']['p50'])} / {_ms(r['itl_s']['p99'])} / {_ms(r.get('itl_max_s'))} "
            f"| {_ms(r['tpot_s']['p50'])} | {_ms(r['e2e_s']['p50'])} / {_ms(r['e2e_s']['p99'])} |")
    return "\n".join(rows)


CPU_ROLES = ("proxy", "ingress", "router", "proxy + ingress + router", "replica", "ray system", "llama-server",
             "load generator")


def cpu_table(runs: list[dict]) -> str:
    """Cores busy per process role, and CPU ms per output token, for each run that measured it."""
    rows = ["| system | scenario | " + " | ".join(CPU_ROLES) + " |", "|" + "---|" * (len(CPU_ROLES) + 2)]
    for r in runs:
        cpu = r.get("cpu")
        if not cpu:
            continue
        cells = []
        for role in CPU_ROLES:
            c = cpu.get(role)
            per_token = c and c["cpu_ms_per_token"]
            cells.append("-" if not c else f"{c['cores']:.2f} ({'-' if per_token is None else f'{per_token:.1f}'})")
        rows.append(f"| {r['system']} | {_label(r)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def chart(runs: list[dict], offline_tps: float | None, path: Path) -> None:
    """Output tokens/s (steady state where measured) and TTFT p90 per scenario, one bar per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(_label(r) for r in runs))
    systems = list(dict.fromkeys(r["system"] for r in runs))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        by_label = {_label(r): r for r in runs if r["system"] == system}
        xs = [j + i * width for j, label in enumerate(labels) if label in by_label]
        picked = [by_label[label] for label in labels if label in by_label]
        left.bar(xs, [r.get("steady_output_tokens_per_s") or r["output_tokens_per_s"] for r in picked],
                 width, label=system)
        right.bar(xs, [(r["ttft_s"]["p90"] or 0) * 1000 for r in picked], width, label=system)
    if offline_tps:
        left.axhline(offline_tps, linestyle="--", color="gray", label="offline limit (static batch 32)")
    right.set_yscale("log")
    for ax, title in ((left, "output tokens/s (steady state)"), (right, "TTFT p90 (ms, log)")):
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def multiturn_table(runs: list[dict]) -> str:
    """The multi-turn chat figures (bench/multiturn.py), one row per system."""
    rows = ["| system | later turns TTFT p50 ms | first turns TTFT p50 ms | out tok/s | prompt tokens served from cache |",
            "|---|---|---|---|---|"]
    for r in runs:
        if "cached_fraction" not in r:
            continue
        fraction = r["cached_fraction"]
        rows.append(f"| {r['system']} | {_ms(r['later_turn_ttft_s']['p50'])} | {_ms(r['first_turn_ttft_s']['p50'])} "
                    f"| {r['output_tokens_per_s']:.1f} | {r['cached_prompt_tokens']:,} of {r['prompt_tokens']:,}"
                    f"{'' if fraction is None else f' ({fraction:.0%})'} |")
    return "\n".join(rows)

"""Figures of the policy grid (PNG, matplotlib Agg): traffic per case for SGLang's
default, the best peer and ours; and modelled MoE-layer time against rank load
imbalance for every combination of the real held-out ESFT cases."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.policy_grid_summary import OURS, best_peer, combos, sglang_default


def _short(dataset: str) -> str:
    return {"esft-heldout": "esft", "deepseek-v3-synthetic": "v3*", "synthetic-100k": "100k*"}.get(
        dataset, dataset
    )


def plot_all(result: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    stats = combos(result["records"])
    paths = []

    metric = "node_copies_per_token_layer"
    cases = [c for c in stats if OURS in stats[c]]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(cases) + 2), 4))
    width = 0.27
    picks: tuple[tuple[str, Callable[[Any], tuple[str, str] | None]], ...] = (
        ("SGLang default", lambda c: sglang_default(c)),
        ("best peer", lambda c: best_peer(stats[c], metric)),
        ("ours", lambda c: OURS),
    )
    for k, (label, pick) in enumerate(picks):
        xs, ys, lo, hi = [], [], [], []
        for i, case in enumerate(cases):
            combo = pick(case)
            if combo is None or combo not in stats[case]:
                continue
            mean, mn, mx = stats[case][combo][metric]
            xs.append(i + (k - 1) * width)
            ys.append(mean)
            lo.append(mean - mn)
            hi.append(mx - mean)
        ax.bar(xs, ys, width, yerr=[lo, hi], label=label, capsize=2)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(
        [f"{_short(c[0])}\n{c[1]}x{c[2]} R{c[3]}" for c in cases],
        fontsize=6,
    )
    ax.set_ylabel("inter-node copies / token-layer")
    ax.set_title(
        "Inter-node traffic (lower is better; * = synthetic; bars: seed range)", fontsize=9
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "policy_grid_traffic.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    for case in cases:
        if case[0] != "esft-heldout":
            continue
        for combo, s in stats[case].items():
            if "moe_layer_time_us_mean" not in s:
                continue
            ours = combo == OURS
            ax.scatter(
                s["rank_token_imbalance"][0],
                s["moe_layer_time_us_mean"][0],
                s=30 if ours else 8,
                c="tab:red" if ours else "tab:gray",
                marker="*" if ours else "o",
                alpha=1.0 if ours else 0.5,
            )
    ax.set_xlabel("rank token imbalance (max / mean tokens per DP rank)")
    ax.set_ylabel("modelled MoE-layer time (us)")
    ax.set_title("ESFT held-out (real): every placement x policy; red stars = ours", fontsize=9)
    fig.tight_layout()
    path = out_dir / "policy_grid_time_vs_imbalance.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
    return paths

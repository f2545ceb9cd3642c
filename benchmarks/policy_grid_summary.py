"""Aggregation of policy_grid records shared by the renderer and the plots: means and
spreads over seeds, SGLang's default, the best peer and ours per case."""

from __future__ import annotations

from typing import Any

import numpy as np

OURS = ("ours", "locality_window")
METRICS = (
    "remote_hits_per_token_layer",
    "node_copies_per_token_layer",
    "max_rank_inter_node_bytes_mean",
    "moe_layer_time_us_mean",
    "gpu_load_imbalance_mean",
    "rank_load_imbalance_mean",
    "rank_token_imbalance",
    "latency_s_p99",
    "placement_solve_s",
    "policy_ms_total",
    "decision_ms_p99",
)


def case_key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["dataset"], r["nodes"], r["gpus_per_node"], r["redundant_experts"])


def combos(
    records: list[dict[str, Any]],
) -> dict[tuple[Any, ...], dict[tuple[str, str], dict[str, Any]]]:
    """case -> (method, policy) -> {metric: (mean, min, max) over seeds, "seeds": n}."""
    grouped: dict[tuple[Any, ...], dict[tuple[str, str], list[dict[str, Any]]]] = {}
    for r in records:
        if r.get("status") != "ok":
            continue
        grouped.setdefault(case_key(r), {}).setdefault((r["method"], r["policy"]), []).append(r)
    out: dict[tuple[Any, ...], dict[tuple[str, str], dict[str, Any]]] = {}
    for case, by_combo in grouped.items():
        out[case] = {}
        for combo, runs in by_combo.items():
            stats: dict[str, Any] = {"seeds": len(runs)}
            for m in METRICS:
                values = np.array([float(r[m]) for r in runs if r.get(m) is not None])
                if values.size:
                    stats[m] = (float(values.mean()), float(values.min()), float(values.max()))
            out[case][combo] = stats
    return out


def sglang_default(case: tuple[Any, ...]) -> tuple[str, str]:
    """What SGLang would run: trivial placement without redundant experts, EPLB with them;
    round-robin DP ranks either way."""
    return ("trivial" if case[3] == 0 else "eplb", "round_robin")


def best_peer(stats: dict[tuple[str, str], dict[str, Any]], metric: str) -> tuple[str, str] | None:
    """The combination with neither our placement nor our policy that has the lowest mean
    ``metric``."""
    peers = [c for c in stats if c[0] != OURS[0] and c[1] != OURS[1] and metric in stats[c]]
    return min(peers, key=lambda c: stats[c][metric][0]) if peers else None


def reduction(ours: float, other: float) -> float:
    """Relative cut (positive = ours is lower)."""
    return 1.0 - ours / other if other else float("nan")


def headline(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per case: ours vs SGLang default vs best peer on traffic and time."""
    rows = []
    for case, stats in combos(records).items():
        if OURS not in stats:
            continue
        ours = stats[OURS]
        base = stats.get(sglang_default(case))
        row: dict[str, Any] = {"case": case, "ours": ours, "default": base}
        for metric in (
            "node_copies_per_token_layer",
            "max_rank_inter_node_bytes_mean",
            "moe_layer_time_us_mean",
            "remote_hits_per_token_layer",
        ):
            peer = best_peer(stats, metric)
            row[f"peer_{metric}"] = peer
            row[f"cut_vs_default_{metric}"] = (
                reduction(ours[metric][0], base[metric][0]) if base and metric in base else None
            )
            row[f"cut_vs_peer_{metric}"] = (
                reduction(ours[metric][0], stats[peer][metric][0]) if peer else None
            )
        rows.append(row)
    return rows

"""RESULTS.md section for the ``policy_grid`` benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.policy_grid_summary import OURS, combos, headline, sglang_default
from benchmarks.renderers.common import _command, _fmt, _machine_line, _table


def _cut(value: float | None) -> str:
    """A reduction as a signed change: a 12% cut prints as -12.0%."""
    if value is None:
        return "-"
    return f"{-value * 100:+.1f}%"


def _spread(stat: tuple[float, float, float] | None, digits: int = 3, scale: float = 1.0) -> str:
    if stat is None:
        return "-"
    mean, lo, hi = (v * scale for v in stat)
    if abs(hi - lo) < 10 ** (-digits):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _combo(c: tuple[str, str] | None) -> str:
    return "-" if c is None else f"`{c[0]}` + `{c[1]}`"


def _case(case: tuple[Any, ...]) -> str:
    return f"{case[0]} {case[1]}x{case[2]} R={case[3]}"


def render_policy_grid(data: dict[str, Any], source: Path) -> list[str]:
    records = data.get("records", [])
    datasets = {d["name"]: d for d in data.get("datasets", [])}
    lines = [
        "## Placement x routing policy grid, simulated (`policy_grid`)",
        "",
    ]
    if data.get("quick"):
        lines += ["**QUICK RUN (smoke test): tiny grid, not numbers to quote.**", ""]
    lines += [
        "Every placement method x every routing policy replays the same held-out requests "
        "in the same run (`scheduler/simulation`, per-layer padded all-to-all time, SGLang "
        "static dispatch). Placements are fitted on the *fit* part of each dataset; the "
        "policies see only *predictions* made from each replayed request's prefill part by "
        "predictors fitted on the fit part (`scheduler/simulation/predictions.py`):",
        "",
        "- `round_robin`, `total_requests`: nothing but rank loads;",
        "- `class_affinity`: the predicted class (nearest class centroid of the prefill's "
        "activation vector) and the placement's class-to-node shares;",
        "- `locality_band`, `locality_window` (ours): the predicted decode expert histogram "
        "(ridge prefill->decode per layer; for `synthetic-100k` the predicted class's mean "
        "profile) and the placement.",
        "",
        "Only decode is replayed (PD-disaggregated decode cluster: the rank is chosen after "
        "prefill). Arrivals are Poisson at "
        f"{data.get('utilisation', 0.7):.0%} of the saturated throughput of SGLang's default "
        "on the same workload; every policy decides at the same window boundaries (one "
        "modelled decode step). Ours = placement `ours` + policy `locality_window`; SGLang "
        "default = `trivial` (no redundant experts) or `eplb` (with them) + `round_robin`; "
        "best peer = the combination with neither our placement nor our policy that has "
        "the lowest mean of the metric in question. Values are means over seeds "
        f"({', '.join(str(s) for s in data.get('seeds', []))}) with [min, max] where "
        "they differ.",
        "",
        "Datasets:",
        "",
    ]
    for d in datasets.values():
        facts = {k: v for k, v in d.items() if k not in ("name", "synthetic", "note")}
        fact_text = ", ".join(f"{k} {_fmt(v, 3)}" for k, v in facts.items())
        label = "**SYNTHETIC**" if d.get("synthetic") else "**REAL**"
        lines.append(f"- `{d['name']}` ({label}): {d['note']}. {fact_text}.")
    lines.append("")

    heads = headline(records)
    real = [h for h in heads if h["case"][0] == "esft-heldout"]
    if real:
        lines += ["### Answer (real held-out ESFT traces)", ""]
        lines += _answer(real)
        lines.append("")
    lines += [
        "### Ours vs SGLang default vs best peer, per case",
        "",
        "Inter-node copies per token-layer (DeepEP normal kernels' cross-node traffic; "
        "bytes = copies x 3 x hidden) and modelled MoE-layer time (us); changes are ours "
        "relative to the other (negative = ours lower). Imbalance: max/mean tokens per "
        "DP rank over the run.",
        "",
    ]
    rows = []
    for h in heads:
        ours, base = h["ours"], h["default"] or {}
        peer_c = h["peer_node_copies_per_token_layer"]
        peer_t = h["peer_moe_layer_time_us_mean"]
        stats = combos(records)[h["case"]]
        rows.append(
            [
                _case(h["case"]) + (" (synthetic)" if h["case"][0] != "esft-heldout" else ""),
                _spread(base.get("node_copies_per_token_layer")),
                f"{_spread(stats[peer_c]['node_copies_per_token_layer'])} {_combo(peer_c)}"
                if peer_c
                else "-",
                _spread(ours.get("node_copies_per_token_layer")),
                _cut(h["cut_vs_default_node_copies_per_token_layer"]),
                _cut(h["cut_vs_peer_node_copies_per_token_layer"]),
                _cut(h["cut_vs_default_max_rank_inter_node_bytes_mean"]),
                _spread(base.get("moe_layer_time_us_mean"), 1),
                _spread(ours.get("moe_layer_time_us_mean"), 1),
                _cut(h["cut_vs_default_moe_layer_time_us_mean"]),
                _cut(h["cut_vs_peer_moe_layer_time_us_mean"]) + f" {_combo(peer_t)}",
                f"{_spread(base.get('rank_token_imbalance'), 2)} / "
                f"{_spread(ours.get('rank_token_imbalance'), 2)}",
                f"{_spread(base.get('gpu_load_imbalance_mean'), 2)} / "
                f"{_spread(ours.get('gpu_load_imbalance_mean'), 2)}",
            ]
        )
    lines += _table(
        [
            "case",
            "copies: default",
            "copies: best peer",
            "copies: ours",
            "vs default",
            "vs peer",
            "max-rank bytes vs default",
            "layer us: default",
            "layer us: ours",
            "vs default",
            "vs best peer (time)",
            "rank imbalance default / ours",
            "GPU-load imbalance default / ours",
        ],
        rows,
    )
    lines.append("")
    lines += [
        "![inter-node traffic](figures/policy_grid_traffic.png)",
        "",
        "![time vs imbalance](figures/policy_grid_time_vs_imbalance.png)",
        "",
    ]
    solve = data.get("window_solve", [])
    if solve:
        lines += [
            "### `locality_window` decision time, 1,000 queued requests",
            "",
            "Random placements and histograms (a timing, not a workload). Cold: every "
            "histogram scored once against the placement (done once per request on "
            "arrival); warm: the assignment itself (the greedy rank assignment). "
            "Target 10 ms.",
            "",
        ]
        lines += _table(
            ["shape", "distinct histograms", "cold ms", "warm ms (median)", "warm ms (p99)"],
            [
                [
                    s["shape"],
                    _fmt(s["distinct_histograms"]),
                    _fmt(s["cold_ms"], 2),
                    _fmt(s["warm_ms_median"], 2),
                    _fmt(s["warm_ms_p99"], 2),
                ]
                for s in solve
            ],
        )
        lines.append("")
    lines += ["### Every combination, per case", ""]
    for case, stats in combos(records).items():
        lines += [f"<details><summary>{_case(case)}</summary>", ""]
        table_rows = []
        for (method, policy), s in sorted(stats.items()):
            mark = " **(ours)**" if (method, policy) == OURS else ""
            mark += " (SGLang default)" if (method, policy) == sglang_default(case) else ""
            table_rows.append(
                [
                    f"`{method}` + `{policy}`{mark}",
                    _spread(s.get("remote_hits_per_token_layer")),
                    _spread(s.get("node_copies_per_token_layer")),
                    _spread(s.get("max_rank_inter_node_bytes_mean"), 3, 1e-6),
                    _spread(s.get("moe_layer_time_us_mean"), 1),
                    _spread(s.get("gpu_load_imbalance_mean"), 2),
                    _spread(s.get("rank_load_imbalance_mean"), 2),
                    _spread(s.get("rank_token_imbalance"), 2),
                    _spread(s.get("latency_s_p99"), 3),
                    _spread(s.get("placement_solve_s"), 2),
                    _spread(s.get("policy_ms_total"), 1),
                ]
            )
        lines += _table(
            [
                "placement + policy",
                "remote hits / tok-layer",
                "node copies / tok-layer",
                "max-rank inter-node MB / step",
                "MoE-layer us",
                "GPU-load imb.",
                "rank-load imb. (running)",
                "rank token imb.",
                "latency p99 s",
                "placement solve s",
                "policy ms (total)",
            ],
            table_rows,
        )
        lines += ["", "</details>", ""]
    skipped = [r for r in records if r.get("status") != "ok"]
    if skipped:
        lines += [
            f"Not run or failed: {len(skipped)} records, e.g. "
            + "; ".join(
                sorted(
                    {
                        f"{r['dataset']} {r['nodes']}x{r['gpus_per_node']} "
                        f"R={r['redundant_experts']}: {r.get('message', r.get('status'))}"
                        for r in skipped
                    }
                )[:5]
            ),
            "",
        ]
    lines += [
        _machine_line(data.get("machine", {})),
        "",
        f"Command: `{_command(data)}` (also run by `make bench`; `--quick` is the CI "
        f"smoke test); took {_fmt(data.get('wall_s'), 0)} s. Raw records: "
        "[`results/policy_grid.json`](results/policy_grid.json). "
        f"Run at {data.get('generated_at')}.",
        "",
    ]
    return lines


def _answer(real: list[dict[str, Any]]) -> list[str]:
    """Plain-language answer from the real held-out cases."""
    lines = []

    def span(key: str) -> str:
        values = [h[key] for h in real if h.get(key) is not None]
        if not values:
            return "-"
        lo, hi = min(values), max(values)
        return f"{lo * 100:.1f}% to {hi * 100:.1f}%" if lo != hi else f"{lo * 100:.1f}%"

    lines.append(
        f"Over {len(real)} real held-out ESFT cases (topologies x redundancy), reductions "
        "achieved by ours (`ours` + `locality_window`), as ranges over the cases "
        "(negative = ours is higher): inter-node copies per token-layer (proportional to "
        f"inter-node bytes) {span('cut_vs_default_node_copies_per_token_layer')} vs SGLang's "
        f"default and {span('cut_vs_peer_node_copies_per_token_layer')} vs the best peer; "
        "the busiest rank's inter-node bytes per step "
        f"{span('cut_vs_default_max_rank_inter_node_bytes_mean')} vs default and "
        f"{span('cut_vs_peer_max_rank_inter_node_bytes_mean')} vs the best peer; modelled "
        f"MoE-layer time {span('cut_vs_default_moe_layer_time_us_mean')} vs default and "
        f"{span('cut_vs_peer_moe_layer_time_us_mean')} vs the best peer."
    )
    imb = [
        (h["ours"]["rank_token_imbalance"][0], (h["default"] or {}).get("rank_token_imbalance"))
        for h in real
    ]
    ours_imb = [a for a, _ in imb]
    base_imb = [b[0] for _, b in imb if b]
    if ours_imb and base_imb:
        lines.append(
            f"At a rank token imbalance (max/mean tokens per DP rank) of "
            f"{min(ours_imb):.2f}-{max(ours_imb):.2f} for ours against "
            f"{min(base_imb):.2f}-{max(base_imb):.2f} for SGLang's default."
        )
    losses = [
        _case(h["case"]) + f" ({_cut(h['cut_vs_peer_node_copies_per_token_layer'])} copies vs "
        f"{_combo(h['peer_node_copies_per_token_layer'])})"
        for h in real
        if (h.get("cut_vs_peer_node_copies_per_token_layer") or 0) < 0
    ]
    slow = [
        _case(h["case"]) + f" ({_cut(h['cut_vs_peer_moe_layer_time_us_mean'])} time vs "
        f"{_combo(h['peer_moe_layer_time_us_mean'])})"
        for h in real
        if (h.get("cut_vs_peer_moe_layer_time_us_mean") or 0) < 0
    ]
    lines.append("")
    lines.append(
        "Where ours does not win on traffic against the best peer: "
        + ("; ".join(losses) if losses else "none of the real cases")
        + ". On modelled time: "
        + ("; ".join(slow) if slow else "none of the real cases")
        + "."
    )
    return [" ".join(lines[:2]), "", *lines[2:]]

"""RESULTS.md section for the ``policy_grid_production`` benchmark: one headline table
(ours, SGLang's default, EPLB, the best peer and the bound per case), the latency /
bytes / expert split, then every combination."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.renderers.common import _command, _fmt, _machine_line, _table

OURS = ("ours", "locality_window")
ORACLE = ("oracle", "locality_window")
#: locality_window's knob at the settings the benchmark runs besides the default (0.5)
BALANCE_VARIANTS = (
    (OURS[0], "locality_window[balance=0]"),
    (OURS[0], "locality_window[balance=1]"),
)
SGLANG_DEFAULT = ("trivial", "round_robin")
EPLB = ("eplb", "round_robin")
HEADLINE_DECODE = "decode_128"

Case = tuple[str, int, int, int]
#: case -> (method, policy) -> point -> record
Index = dict[Case, dict[tuple[str, str], dict[str, dict[str, Any]]]]


def _key(r: dict[str, Any]) -> Case:
    return (r["dataset"], r["nodes"], r["gpus_per_node"], r["redundant_experts"])


def _index(records: list[dict[str, Any]]) -> Index:
    out: Index = {}
    for r in records:
        if r.get("status") == "ok":
            out.setdefault(_key(r), {}).setdefault((r["method"], r["policy"]), {})[r["point"]] = r
    return out


def _points(by_combo: dict[tuple[str, str], dict[str, dict[str, Any]]]) -> list[str]:
    """The case's operating points: decode by running requests, then prefill."""
    names = {p for recs in by_combo.values() for p in recs}

    def order(p: str) -> tuple[int, int]:
        phase, size = p.split("_")
        return (phase != "decode", int(size))

    return sorted(names, key=order)


def _label(case: Case, synthetic: bool, extra: str = "") -> str:
    kind = "SYNTHETIC, resampled" if synthetic else "real, resampled"
    return f"{case[0]} {case[1]}x{case[2]} R={case[3]} ({kind}{extra})"


def _point_label(point: str) -> str:
    phase, size = point.split("_")
    if phase == "decode":
        return f"decode {size}/rank"
    return f"prefill {int(size):,} tok/rank"


def _time(r: dict[str, Any] | None) -> float | None:
    return None if r is None else r.get("moe_layer_time_us_mean")


def _t(r: dict[str, Any]) -> float:
    return float(r["moe_layer_time_us_mean"])


def _get(r: dict[str, Any] | None, key: str) -> float | None:
    return None if r is None or r.get(key) is None else float(r[key])


def _change(value: float | None, ref: float | None) -> str:
    if value is None or not ref:
        return "-"
    return f"{(value / ref - 1) * 100:+.1f}%"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:,.1f}"


def _combo(c: tuple[str, str] | None) -> str:
    return "-" if c is None else f"`{c[0]}` + `{c[1]}`"


def best_peer(
    by_combo: dict[tuple[str, str], dict[str, dict[str, Any]]], point: str
) -> tuple[str, str] | None:
    """The combination with neither our placement nor our policy that has the lowest
    modelled MoE-layer time at ``point`` (as in the small-batch grid)."""
    peers = [
        c
        for c, recs in by_combo.items()
        if not c[0].startswith(OURS[0])
        and c[0] != ORACLE[0]
        and not c[1].startswith(OURS[1])
        and _time(recs.get(point)) is not None
    ]
    return min(peers, key=lambda c: _t(by_combo[c][point])) if peers else None


def headline(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per case and headline point (decode 128, prefill): ours, default, EPLB, the best
    peer and ours' placement's bound."""
    synthetic = {d["name"]: d.get("synthetic", False) for d in data.get("datasets", [])}
    bounds = {
        (c["dataset"], c["nodes"], c["gpus_per_node"], c["redundant_experts"]): c.get("bounds", {})
        for c in data.get("cases", [])
    }
    rows = []
    for case, by_combo in _index(data.get("records", [])).items():
        points = _points(by_combo)
        decode = HEADLINE_DECODE if HEADLINE_DECODE in points else points[0]
        prefill = next((p for p in points if p.startswith("prefill")), None)
        row: dict[str, Any] = {"case": case, "synthetic": synthetic.get(case[0], False)}
        for name, point in (("decode", decode), ("prefill", prefill)):
            if point is None:
                continue
            peer = best_peer(by_combo, point)
            row[name] = {
                "point": point,
                "ours": by_combo.get(OURS, {}).get(point),
                "default": by_combo.get(SGLANG_DEFAULT, {}).get(point),
                "eplb": by_combo.get(EPLB, {}).get(point),
                "peer_combo": peer,
                "peer": by_combo[peer][point] if peer else None,
                "bound": bounds.get(case, {}).get(OURS[0], {}).get(point),
                "oracle": by_combo.get(ORACLE, {}).get(point),
                **{v[1]: by_combo.get(v, {}).get(point) for v in BALANCE_VARIANTS},
            }
        rows.append(row)
    return rows


def _headline_table(heads: list[dict[str, Any]]) -> list[str]:
    rows = []
    for h in heads:
        d, p = h.get("decode", {}), h.get("prefill", {})
        ref_d, ref_p = _time(d.get("default")), _time(p.get("default"))
        peer_name = _combo(d.get("peer_combo"))
        if p.get("peer_combo") != d.get("peer_combo"):
            peer_name = (
                f"decode {_combo(d.get('peer_combo'))}; prefill {_combo(p.get('peer_combo'))}"
            )
        entries = [
            ("**ours** (`ours` + `locality_window`)", "ours"),
            ("SGLang default (`trivial` + `round_robin`)", "default"),
            ("EPLB (`eplb` + `round_robin`)", "eplb"),
            (f"best peer: {peer_name}", "peer"),
            *((f"ours, knob: `{v[1]}`", v[1]) for v in BALANCE_VARIANTS),
            (
                "oracle: `ours` placed on the replayed requests' own routing + `locality_window`",
                "oracle",
            ),
        ]
        chunk = f"; prefill {_point_label(p['point']).split(' ', 1)[1]}" if p else ""
        first = True
        for label, key in entries:
            rd, rp = d.get(key), p.get(key)
            rows.append(
                [
                    _label(h["case"], h["synthetic"], chunk) if first else "",
                    label,
                    _fmt(_time(rd)),
                    _change(_time(rd), ref_d) if key != "default" else "",
                    _mb(rd.get("max_rank_inter_node_bytes_mean") if rd else None),
                    _mb(rd.get("mean_rank_inter_node_bytes_mean") if rd else None),
                    _fmt(_time(rp)),
                    _change(_time(rp), ref_p) if key != "default" else "",
                    _mb(rp.get("max_rank_inter_node_bytes_mean") if rp else None),
                    _mb(rp.get("mean_rank_inter_node_bytes_mean") if rp else None),
                ]
            )
            first = False
        rows.append(
            [
                "",
                "bound: any scheduler, on ours' placement",
                _fmt(d.get("bound")),
                _change(d.get("bound"), ref_d),
                "",
                "",
                _fmt(p.get("bound")),
                _change(p.get("bound"), ref_p),
                "",
                "",
            ]
        )
    return _table(
        [
            "case (figures)",
            "scheduler",
            "decode 128/rank: MoE-layer us",
            "vs default",
            "busiest-rank MB/step",
            "mean-rank MB/step",
            "prefill: MoE-layer us",
            "vs default",
            "busiest-rank MB/step",
            "mean-rank MB/step",
        ],
        rows,
    )


def _span(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    if round(lo, digits) == round(hi, digits):
        return f"{lo:+.{digits}f}%"
    return f"{lo:+.{digits}f}% to {hi:+.{digits}f}%"


def _range(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.0f}%" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f}%"


def _answer(heads: list[dict[str, Any]]) -> list[str]:
    """Plain-language reading of the headline, per kind of figures and phase."""
    lines = []
    for synthetic in (False, True):
        group = [h for h in heads if h["synthetic"] == synthetic]
        if not group:
            continue
        kind = "resampled synthetic (V3 shape)" if synthetic else "resampled real (ESFT)"
        parts = []
        for phase in ("decode", "prefill"):
            cells = [h[phase] for h in group if phase in h and h[phase].get("ours")]
            if not cells:
                continue

            def rel(key: str, cells: list[dict[str, Any]] = cells) -> list[float]:
                return [(_t(c["ours"]) / _t(c[key]) - 1) * 100 for c in cells if c.get(key)]

            above = [(_t(c["ours"]) / c["bound"] - 1) * 100 for c in cells if c.get("bound")]
            closed = [
                (_t(c["default"]) - _t(c["ours"])) / (_t(c["default"]) - c["bound"]) * 100
                for c in cells
                if c.get("bound") and c.get("default") and _t(c["default"]) > c["bound"]
            ]
            wins = sum(int(_t(c["ours"]) < _t(c["peer"])) for c in cells if c.get("peer"))
            to_oracle = rel("oracle")
            parts.append(
                f"**{_point_label(cells[0]['point']).split(' ')[0]}** "
                f"({len(cells)} case{'s' if len(cells) > 1 else ''}): "
                f"ours {_span(rel('default'))} vs SGLang default, {_span(rel('eplb'))} vs "
                f"EPLB, {_span(rel('peer'))} vs the best peer (ours lower in {wins} of "
                f"{len(cells)}); ours is {_span(above)} above the bound on its placement"
                + (f", closing {_range(closed)} of SGLang default's gap to it" if closed else "")
                + (f"; {_span(to_oracle)} vs the oracle placement" if to_oracle else "")
            )
        lines.append(f"- {kind}: " + "; ".join(parts) + ".")
    return lines


def _split_table(data: dict[str, Any]) -> tuple[list[str], list[str]]:
    """SGLang default's latency / bytes / expert split per case and point, and a summary."""
    rows = []
    shares: dict[str, dict[str, list[float]]] = {}
    for c in data.get("cases", []):
        sb = c.get("small_batch") or {}
        if sb.get("status") != "ok":
            continue
        case = (c["dataset"], c["nodes"], c["gpus_per_node"], c["redundant_experts"])
        points = sb["points"]
        keep = [sb["small_batch_point"], HEADLINE_DECODE] + [
            p for p in points if p.startswith("prefill")
        ]
        first = True
        for point in dict.fromkeys(keep):
            s = points.get(point)
            if s is None:
                continue
            total = s["moe_layer_time_us_mean"]
            kind = "small batch" if point == sb["small_batch_point"] else point.split("_")[0]
            for part in ("latency", "bytes", "expert"):
                shares.setdefault(kind, {}).setdefault(part, []).append(
                    s[f"{part}_us_mean"] / total * 100
                )
            rows.append(
                [
                    _label(case, bool(c.get("synthetic"))) if first else "",
                    _point_label(point),
                    _fmt(total),
                    f"{_fmt(s['latency_us_mean'])} ({s['latency_us_mean'] / total:.0%})",
                    f"{_fmt(s['bytes_us_mean'])} ({s['bytes_us_mean'] / total:.0%})",
                    f"{_fmt(s['expert_us_mean'])} ({s['expert_us_mean'] / total:.0%})",
                    f"{_fmt(s['weight_read_us_mean'])} / {_fmt(s['flop_us_mean'])}",
                    _fmt(s["distinct_experts_per_gpu_step_mean"]),
                    _mb(s["max_rank_inter_node_bytes_mean"]),
                ]
            )
            first = False
    table = _table(
        [
            "case (figures)",
            "operating point",
            "MoE-layer us",
            "latency us (share)",
            "bytes us (share)",
            "experts us (share)",
            "experts: weight reads / FLOPs us",
            "distinct experts per GPU",
            "busiest-rank MB/step",
        ],
        rows,
    )

    def rng(kind: str, part: str) -> str:
        v = shares.get(kind, {}).get(part, [])
        return "-" if not v else _range(v)

    summary = []
    for kind, text in (
        ("small batch", "At the old grid's small batch (decode, 8 running per rank)"),
        ("decode", "at decode 128 per rank"),
        ("prefill", "at prefill"),
    ):
        if kind in shares:
            summary.append(
                f"{text}: fixed latency {rng(kind, 'latency')}, bytes {rng(kind, 'bytes')}, "
                f"experts {rng(kind, 'expert')} of the layer time"
            )
    return table, summary


def _grid(data: dict[str, Any], index: Index) -> list[str]:
    lines = []
    cases = {
        (c["dataset"], c["nodes"], c["gpus_per_node"], c["redundant_experts"]): c
        for c in data.get("cases", [])
    }
    for case, by_combo in index.items():
        info = cases.get(case, {})
        points = _points(by_combo)
        decode = [p for p in points if p.startswith("decode")]
        prefill = next((p for p in points if p.startswith("prefill")), None)
        head = HEADLINE_DECODE if HEADLINE_DECODE in decode else (decode[0] if decode else None)
        lines += [
            f"<details><summary>{_label(case, bool(info.get('synthetic')))}: every "
            "combination</summary>",
            "",
        ]
        bounds = info.get("bounds", {})
        placements = info.get("placements", {})
        lines += _table(
            ["placement", "status", "solve s"] + [f"bound {_point_label(p)} us" for p in points],
            [
                [
                    f"`{m}`",
                    str(placements.get(m, {}).get("status", "-")),
                    _fmt(placements.get(m, {}).get("solve_s"), 2),
                ]
                + [_fmt(b.get(p)) for p in points]
                for m, b in bounds.items()
            ],
        )
        lines.append("")
        rows = []
        for combo, recs in sorted(by_combo.items()):
            mark = " **(ours)**" if combo == OURS else ""
            mark += " (SGLang default)" if combo == SGLANG_DEFAULT else ""
            mark += " (EPLB)" if combo == EPLB else ""
            hd = recs.get(head) if head else None
            pf = recs.get(prefill) if prefill else None
            rows.append(
                [f"{_combo(combo)}{mark}"]
                + [_fmt(_time(recs.get(p))) for p in points]
                + [
                    f"{_mb(_get(hd, 'max_rank_inter_node_bytes_mean'))} / "
                    f"{_mb(_get(hd, 'mean_rank_inter_node_bytes_mean'))}",
                    f"{_mb(_get(pf, 'max_rank_inter_node_bytes_mean'))} / "
                    f"{_mb(_get(pf, 'mean_rank_inter_node_bytes_mean'))}",
                    _fmt(_get(hd, "node_copies_per_token_layer"), 3),
                    _fmt(_get(hd, "gpu_load_imbalance_mean"), 2),
                    _fmt(_get(pf, "gpu_load_imbalance_mean"), 2),
                    _fmt(sum(int(r.get("fallback_assignments", 0)) for r in recs.values())),
                ]
            )
        lines += _table(
            ["placement + policy"]
            + [f"{_point_label(p)}: MoE-layer us" for p in points]
            + [
                f"{_point_label(head or '-_0')}: busiest / mean MB",
                f"{_point_label(prefill or '-_0')}: busiest / mean MB",
                "decode node copies / tok-layer",
                "decode GPU-load imb.",
                "prefill GPU-load imb.",
                "fallbacks",
            ],
            rows,
        )
        lines += ["", "</details>", ""]
    return lines


def render_policy_grid_production(data: dict[str, Any], source: Path) -> list[str]:
    settings = data.get("settings", {})
    index = _index(data.get("records", []))
    heads = headline(data)
    lines = [
        "## Placement x routing policy at production sizes, with the limit "
        "(`policy_grid_production`)",
        "",
    ]
    if data.get("quick"):
        lines += ["**QUICK RUN (smoke test): tiny grid, not numbers to quote.**", ""]
    chunks = {name: s.get("prefill_tokens") for name, s in settings.get("datasets", {}).items()}
    cost = settings.get("cost_model", {})
    lines += [
        "Modelled MoE-layer time per layer (us; dispatch + experts + combine, each padded "
        "to the layer's busiest rank / GPU; "
        f"{cost.get('gpu', '?')}, {cost.get('expert_weights', '?')} expert weights, "
        f"{_fmt(cost.get('inter_node_gbps'), 0)} GB/s NIC per GPU) and inter-node bytes per "
        "step over all MoE layers. **Every figure is resampled**: requests drawn with "
        "replacement from the held-out requests keep every DP rank at the operating point; "
        "`real, resampled` = real ESFT routing, `SYNTHETIC, resampled` = the calibrated "
        "DeepSeek-V3-shaped workload. Decode runs 128 requests per rank here (64 and 256 "
        "in the full grid); prefill is chunked at "
        + ", ".join(f"{_fmt(v)} tokens per rank for `{k}`" for k, v in chunks.items())
        + ". Vs default: change relative to SGLang's default (negative = lower). Best "
        "peer: the lowest time among the combinations with neither our placement nor our "
        "policy. Bound: a proven lower bound on the modelled time of **any** assignment "
        "of the same steps' tokens to ranks, on ours' placement (decode: the same steps "
        "for every policy; prefill: the steps of round_robin's run). Knob rows: ours with "
        "`locality_window`'s `[policy] balance` at 0 (mean locality only) and 1 (busiest "
        "rank only) instead of the default 0.5. Oracle: `ours` placed on the replayed "
        "requests' own decode routing (what no deployment can know in advance), served by "
        "`locality_window` with the same predictions: the best placement found for the "
        "true workload.",
        "",
    ]
    lines += _headline_table(heads)
    lines += ["", *_answer(heads), ""]
    lines += [
        "Caveats: ESFT records one teacher-forced phase per sequence, split here into a "
        "prompt (first half) and decode steps (second half), a proxy. The policies see "
        "held-out predictions (class and decode histogram from each prompt's routing, "
        "fitted on other requests) in both phases; a prefill router would need a probe or "
        "a text predictor for them, so prefill is optimistic for the histogram-aware "
        "policies. One draw seed; every policy of a case replays the same draws.",
        "",
    ]
    split, summary = _split_table(data)
    if summary:
        lines += [
            "### Where the time goes: latency vs bytes vs expert weights (SGLang default)",
            "",
            "`trivial` + `round_robin` at the old grid's small-batch point against the "
            "production points. Experts: the busiest GPU's roofline, the slower of its "
            "weight reads (distinct experts x 3 matrices) and its FLOPs. "
            + "; ".join(summary)
            + ".",
            "",
            *split,
            "",
        ]
    lines += [
        "### Every combination, per case",
        "",
        "Per case: each placement's bound per operating point, then every placement x "
        "policy (same draws for all). Busiest / mean MB: the busiest and the mean rank's "
        "inter-node MB per step; GPU-load imbalance: max / mean (token, expert) pairs per "
        "GPU per layer over the run; fallbacks: replacements a policy left unassigned, "
        "placed on the least-loaded free rank.",
        "",
    ]
    lines += _grid(data, index)
    failed = [r for r in data.get("records", []) if r.get("status") != "ok"]
    skipped = [c for c in data.get("cases", []) if c.get("status") != "ok"]
    if failed or skipped:
        lines += [
            f"Not run or failed: {len(failed)} records, {len(skipped)} cases, e.g. "
            + "; ".join(
                sorted(
                    {
                        f"{r['dataset']} {r['nodes']}x{r['gpus_per_node']} "
                        f"R={r['redundant_experts']}: {r.get('message', r.get('status'))}"
                        for r in failed + skipped
                    }
                )[:5]
            ),
            "",
        ]
    steps = "; ".join(
        f"`{name}`: {s.get('decode_steps')} decode steps, {s.get('prefill_steps')} prefill "
        f"steps of {_fmt(s.get('prefill_tokens'))} tokens per rank"
        for name, s in settings.get("datasets", {}).items()
    )
    lines += [
        f"Settings: {steps}; seed {settings.get('seed')}; placement time limit "
        f"{_fmt(settings.get('time_limit_s'))} s.",
        "",
        "Datasets:",
        "",
    ]
    for d in data.get("datasets", []):
        facts = {
            k: v
            for k, v in d.items()
            if k not in ("name", "synthetic", "note", "figures") and not isinstance(v, dict)
        }
        fact_text = ", ".join(f"{k} {_fmt(v, 3)}" for k, v in facts.items())
        lines.append(f"- `{d['name']}` ({d.get('figures')}): {d['note']}. {fact_text}.")
    lines += [
        "",
        _machine_line(data.get("machine", {})),
        "",
        f"Command: `{_command(data)}` (also run by `make bench`; `--quick` is the CI "
        f"smoke test); took {_fmt(data.get('wall_s'), 0)} s. Raw records: "
        "[`results/policy_grid_production.json`](results/policy_grid_production.json). "
        f"Run at {data.get('generated_at')}.",
        "",
    ]
    return lines

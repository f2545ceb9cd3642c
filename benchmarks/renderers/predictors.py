"""RESULTS.md section for the ``predictors`` benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.renderers.common import _command, _fmt, _machine_line, _table


def _mean_std(values: list[Any], digits: int = 3) -> str:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _labels_note(d: dict[str, Any]) -> str:
    relabelled = d.get("relabelled_sources") or {}
    if not relabelled:
        return (
            "Labels: the prompt files' own domains (published labels), which four AlpacaEval "
            'parts contradict (docs/predictors.md, "Labels that disagree with their text"); '
            "the held-out rows are also scored without those sources."
        )
    names = ", ".join(f"`{s}` -> {c}" for s, c in relabelled.items())
    return (
        "Labels: the prompt files' own domains, except the AlpacaEval parts that are "
        f"chat-assistant conversations, relabelled by source ({names}; rule and evidence "
        'in docs/predictors.md, "Labels that disagree with their text"). Every held-out '
        "row is scored under both label sets and once without those sources."
    )


def _domain_scores(d: dict[str, Any], f1_target: Any) -> list[list[str]]:
    rows = []
    variants = [
        ("labels used (relabelled)" if d.get("relabelled_sources") else "published labels", d),
        ("published labels", d.get("published_labels") if d.get("relabelled_sources") else None),
        ("without the disagreeing sources", d.get("without_disagreeing_sources")),
    ]
    for i, (name, v) in enumerate(variants):
        if not v:
            continue
        # the target is judged on the first row only: the others change the yardstick
        judged = f1_target and i == 0
        met = f"**{_fmt(v['macro_f1'] >= f1_target)}**" if judged else "-"
        rows.append(
            [
                f"macro-F1, {name}",
                _fmt(v["macro_f1"], 3),
                _fmt(v["accuracy"], 3),
                _fmt(v["n"]),
                f">= {f1_target}" if judged else "-",
                met,
            ]
        )
    return rows


def _source_table(d: dict[str, Any]) -> list[str]:
    sources = d.get("sources") or {}
    labels = d["confusion"]["labels"]
    rows = []
    for name, v in sorted(sources.items(), key=lambda kv: (kv[1]["label"], kv[0])):
        label = v["label"]
        if v.get("published_label"):
            label = f"{v['published_label']} -> **{label}**"
        pred = v.get("predicted", {})
        rows.append(
            [
                f"`{name}`",
                label,
                _fmt(v["n"]),
                *[
                    f"**{_fmt(pred.get(c, 0))}**" if c == v["label"] else _fmt(pred.get(c, 0))
                    for c in labels
                ],
                _fmt(v["accuracy"], 3),
            ]
        )
    return _table(["source", "label", "held-out prompts", *labels, "accuracy"], rows)


def _settings_table(settings: dict[str, Any]) -> list[str]:
    if settings.get("status") != "ok":
        return [f"Validation comparison: not measured ({settings.get('message')}).", ""]
    lines = [
        f"Settings on the **validation split** ({_fmt(settings['validation_rows'])} prompts "
        f"carved from the training rows, grouped and stratified as the held-out split; fitted "
        f"on the other {_fmt(settings['fit_rows'])}; the held-out rows were not used to choose "
        "anything). *previous* = the earlier settings (C = 10, lower-cased char "
        "2-5-grams, no shape tokens); *current* = this build's defaults.",
        "",
    ]
    rows = []
    for r in settings["runs"]:
        st = r["settings"]
        desc = (
            f"C={_fmt(st['C'], 0)}, char {st['char_ngrams'][0]}-{st['char_ngrams'][1]}"
            f"{', case kept' if st.get('keep_char_case') else ''}"
            f"{', shape' if st.get('shape_tokens') else ''}"
        )
        if (st.get("word_bits"), st.get("char_bits")) != (18, 20):
            desc += f", 2^{st.get('word_bits')} / 2^{st.get('char_bits')} buckets"
        if st.get("max_chars") != 1000:
            desc += f", first {_fmt(st.get('max_chars'))} chars"
        rows.append(
            [
                r["name"],
                desc,
                r["trained_on"],
                _fmt(r["published"]["macro_f1"], 4),
                _fmt(r["published"]["per_class"]["general"]["f1"], 3),
                _fmt(r["relabelled"]["macro_f1"], 4),
                _fmt(r["without_disagreeing_sources"]["macro_f1"], 4),
                _fmt(r["fit_seconds"], 0),
            ]
        )
    lines += _table(
        [
            "settings",
            "C, features",
            "trained on labels",
            "macro-F1 vs published",
            "general F1 (published)",
            "vs relabelled",
            "without disagreeing sources",
            "fit s",
        ],
        rows,
    )
    return [*lines, ""]


def _predictor_domain(steps: dict[str, Any], targets: dict[str, Any]) -> list[str]:
    fit, dom = steps.get("fit", {}), steps.get("domain", {})
    d = (fit.get("report") or {}).get("domain")
    if not d:
        return [f"Domain classifier: not measured ({fit.get('message', 'fit failed')}).", ""]
    lat = dom.get("latency") or {}
    robust = lat.get("median_of_repeats") or {}
    f1_target, p99_target = targets.get("macro_f1"), targets.get("p99_ms")
    feats = d.get("features") or {}
    lo, hi = feats.get("char_ngrams", ("?", "?"))
    lines = [
        "### Domain classifier (real prompts)",
        "",
        f"Hashed TF-IDF word 1-2-grams + char {lo}-{hi}-grams"
        + (" (case kept)" if feats.get("keep_char_case") else "")
        + (" + prompt-shape tokens" if feats.get("shape_tokens") else "")
        + f" (first {_fmt(dom.get('max_chars_used'))} characters) and multinomial logistic "
        f"regression (C = {_fmt(d.get('C'), 0)}), fitted on {_fmt(d['train'])} prompts and "
        f"scored on {_fmt(d['test'])} held-out ones ({d.get('split')}). "
        + _labels_note(d)
        + " Latency: `predict_one` on every held-out prompt, one at a time, "
        f"{_fmt(lat.get('repeats'))} rounds after a warm-up, in one process on a machine "
        "shared with other work (load average "
        + " / ".join(_fmt(v, 2) for v in dom.get("loadavg_before") or [])
        + " before timing). `predict_one` scores a prompt from its distinct hashed buckets "
        "(one sort) and one gather of a weights-and-idf table, without a sparse matrix. "
        "The all-calls tail moves with whatever else runs on the machine "
        "at the time; the per-prompt median row filters that out.",
        "",
    ]
    lines += _table(
        ["metric", "value", "accuracy", "held-out prompts", "target", "met"],
        _domain_scores(d, f1_target),
    )
    lines += [""]
    rows = [
        [
            "latency p50 / p90 / p99 / max, ms (all calls)",
            " / ".join(_fmt(lat.get(k), 3) for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")),
            f"p99 <= {p99_target}",
            f"**{_fmt(lat['p99_ms'] <= p99_target)}**" if lat and p99_target else "-",
        ],
        [
            "latency p50 / p90 / p99, ms (each prompt's median of its rounds)",
            " / ".join(_fmt(robust.get(k), 3) for k in ("p50_ms", "p90_ms", "p99_ms")),
            "-",
            "-",
        ],
    ]
    compared = dom.get("latency_vs_previous") or {}
    if compared:
        for name in ("current", "previous"):
            c = compared[name]
            m = c.get("median_of_repeats") or {}
            rows.append(
                [
                    f"{name} settings, timed in turn with the "
                    f"{'previous' if name == 'current' else 'current'}: p50 / p99 all calls; "
                    "p50 / p99 per-prompt median, ms",
                    " / ".join(_fmt(c.get(k), 3) for k in ("p50_ms", "p99_ms"))
                    + "; "
                    + " / ".join(_fmt(m.get(k), 3) for k in ("p50_ms", "p99_ms")),
                    "-",
                    "-",
                ]
            )
    lines += _table(["metric", "value", "target", "met"], rows) + [""]
    if compared:
        lines += [
            "The last two rows time this build's code with the current and with the previous "
            "settings (C = 10, lower-cased char 2-5-grams, no shape tokens, fitted on the "
            "same training rows), every prompt classified by both in turn, so that both see "
            "the same machine load: what the extra features cost, independent of how busy "
            "the machine was.",
            "",
        ]
    labels = d["confusion"]["labels"]
    lines += ["Confusion matrix, labels used (rows: true domain, columns: predicted):", ""]
    lines += _table(
        ["true \\ predicted", *labels],
        [
            [f"**{n}**", *map(_fmt, r)]
            for n, r in zip(labels, d["confusion"]["matrix"], strict=True)
        ],
    )
    # published-label columns only where they differ from the labels used
    published = (d.get("published_labels") or {}).get("per_class", {})
    published = published if d.get("relabelled_sources") else {}
    lines += ["", "Per domain (precision / recall / F1):", ""]

    def prf(v: dict[str, Any]) -> list[str]:
        return [
            " / ".join(_fmt(v[k], 3) for k in ("precision", "recall", "f1")),
            _fmt(v["support"]),
        ]

    head = ["domain", "labels used", "held-out prompts"]
    lines += _table(
        head + (["published labels", "held-out prompts"] if published else []),
        [
            [c, *prf(v), *(prf(published[c]) if published else [])]
            for c, v in d["per_class"].items()
        ],
    )
    if d.get("sources"):
        lines += [
            "",
            "Per source dataset (held-out prompts): the label each source carries (published "
            "-> used, where relabelled) and how the classifier labels its prompts; bold = "
            "agrees with the label.",
            "",
        ]
        lines += _source_table(d)
    ref = steps.get("reference", {})
    if ref.get("status") == "ok":
        rl = ref["latency"]
        lines += [
            "",
            f"Reference, same split, labels and truncation: scikit-learn's `TfidfVectorizer` "
            f"(word 1-2 + char_wb 2-5) + `LogisticRegression(C=10)` pipeline: macro-F1 "
            f"{ref['macro_f1']:.3f}, single-request `predict_proba` p50 / p99 "
            f"{rl['p50_ms']:.2f} / {rl['p99_ms']:.2f} ms (first {_fmt(rl['requests'])} held-out "
            f"prompts), fit {ref['fit_seconds']:.0f} s. Ours is the same model family with "
            "hashed features scored by a vectorised numpy path.",
        ]
    lines += [""]
    lines += _settings_table(steps.get("settings", {}))
    return lines


def _predictor_clusters(steps: dict[str, Any]) -> list[str]:
    c = steps.get("clusters", {})
    if c.get("status") != "ok":
        return ["### Activation clusters", "", f"Not measured: {c.get('message')}", ""]
    runs = c["runs"]
    lines = [
        "### Activation clusters (ESFT, real DeepSeek-V2-Lite routing; proxy metric)",
        "",
        f"{_fmt(c['requests'])} ESFT sequences; per split, 70% train / 30% held out "
        f"(stratified by ESFT domain), {len({r['seed'] for r in runs})} splits per N. "
        f"Prefill / decode: {c['pairs']} -- a **proxy**, ESFT has no generation. Clusters are "
        "fitted on the training requests' decode side; held-out requests are assigned from "
        "their prefill side and scored on their decode side. **Metric (proxy for the "
        "placement solve, which is not built yet):** fraction of held-out decode activations "
        "whose expert sits on the node of the request's cluster, when each cluster's node "
        "holds the cluster's E/N most used experts per layer (*hot set*, optimistic: ignores "
        "that every expert must be placed somewhere) or when paper B's greedy places every "
        "expert exactly once (*exact-once*, K = N only). Mean ± std over splits.",
        "",
    ]
    rows = []
    for nodes in sorted({r["nodes"] for r in runs}):
        mine = [r for r in runs if r["nodes"] == nodes]

        def col(key: str, field: str, group: list[dict[str, Any]] = mine) -> str:
            return _mean_std([r["held_out"][key][field] for r in group])

        chosen: dict[str, int] = {}
        for r in mine:
            s = r["selected"]
            name = f"{s['features']}/{s['layers']}/K={s['k']}"
            chosen[name] = chosen.get(name, 0) + 1
        rows.append(
            [
                str(nodes),
                col("selected", "hot_set"),
                col("paper_b", "hot_set"),
                col("one_cluster", "hot_set"),
                col("by_silhouette", "hot_set"),
                col("selected", "partition"),
                col("paper_b", "partition"),
                _mean_std([r["held_out"]["own_top_experts_bound"] for r in mine]),
                _fmt(mine[0]["held_out"]["uniform"], 3),
                ", ".join(f"{k} ({v}x)" for k, v in sorted(chosen.items(), key=lambda kv: -kv[1])),
            ]
        )
    lines += _table(
        [
            "N nodes",
            "ours (selected) hot set",
            "paper B (K=N) hot set",
            "one cluster",
            "chosen by silhouette",
            "ours exact-once",
            "paper B exact-once",
            "bound: own top E/N",
            "uniform",
            "ours: features / layers / K chosen",
        ],
        rows,
    )
    aris = [r["held_out"].get("paper_b_ari_vs_labels") for r in runs if r["nodes"] == 4]
    lines += [
        "",
        "Ours = every (features in share / share-idf / top-mask) x (layers all / first half / "
        "second half) x (K in 1..N) candidate scored by 3-fold cross-validated hot-set "
        "locality on the training requests, the best refitted. *exact-once* is blank where "
        "the selected K < N. Paper B's clusters against the ESFT domain labels "
        f"(N = 4, held out): adjusted Rand index {_mean_std(aris, 2)}.",
        "",
    ]
    return lines


def _predictor_prefill_decode(steps: dict[str, Any]) -> list[str]:
    p = steps.get("prefill_decode", {})
    if p.get("status") != "ok":
        return ["### Prefill -> decode", "", f"Not measured: {p.get('message')}", ""]
    rows_in = p["esft"]["rows"]
    k, m = rows_in[0]["k"], rows_in[0]["m"]
    lines = [
        "### Prefill -> decode expert prediction",
        "",
        f"**ESFT proxy** ({p['esft']['model']}, real routing): the first *f* of each "
        "sequence's tokens stand in for the prefill, the rest for the decode (ESFT sequences "
        "are single teacher-forced passes over prompt + answer; the real boundary is not "
        "recorded). Per-layer Pearson of the per-expert vectors (paper B §3.3.3), recall of "
        f"the true top-{k} decode experts in the predicted top-{k}, and the share of decode "
        f"activations on the predicted top-{m} (= E/4, one node's worth at N = 4); averaged "
        f"over layers and held-out requests, mean ± std over {len({r['seed'] for r in rows_in})} "
        "splits (70/30).",
        "",
    ]
    table = []
    for fraction in sorted({r["fraction"] for r in rows_in}):
        for method in ("prefill", "prior", "ridge"):
            sel = [r for r in rows_in if r["fraction"] == fraction and r["method"] == method]
            table.append(
                [
                    f"{fraction:.2f}",
                    {"prefill": "own prefill (baseline)", "prior": "training mean"}.get(
                        method, "per-layer ridge"
                    ),
                    _mean_std([r["pearson_mean"] for r in sel]),
                    _mean_std([r["recall_at_k_mean"] for r in sel]),
                    _mean_std([r["mass_at_m_mean"] for r in sel]),
                ]
            )
    lines += _table(
        ["f (prefill share)", "predictor", "Pearson", f"recall@{k}", f"mass@{m}"], table
    )
    mx = p["mixtral"]
    lines += [
        "",
        f"**Mixtral, measured (n = 1):** `{', '.join(mx['request'])}` ({mx['model']}, vLLM, "
        "135 prompt + 83 generated tokens) is the only real request with both phases. Its "
        "own prefill histogram against its decode, and the mean decode histogram of the "
        "other decode-only requests (`" + ", ".join(mx["prior_from"]) + "`):",
        "",
    ]
    lines += _table(
        ["predictor", "Pearson", f"recall@{mx['prefill']['k']}", f"mass@{mx['prefill']['m']}"],
        [
            [
                name,
                _fmt(mx[key]["pearson_mean"], 3),
                _fmt(mx[key]["recall_at_k_mean"], 3),
                _fmt(mx[key]["mass_at_m_mean"], 3),
            ]
            for key, name in (("prefill", "own prefill"), ("prior", "other requests' decode"))
        ],
    )
    lines += [
        "",
        "One request, 8 experts: an anecdote, not a benchmark. For scale, paper B reports "
        "per-layer prefill-decode Pearson of 0.55 (DeepSeek-V3) to 0.82 (Llama 4 Maverick) "
        "averaged over its datasets (third-party reading of §3.3.3, docs/sources.md). The "
        "ESFT ridge figure is high partly because each ESFT domain is one homogeneous task "
        "dataset: the model largely learns the domain's mean decode routing.",
        "",
    ]
    return lines


def _predictor_online(steps: dict[str, Any]) -> list[str]:
    lines = ["### Text-to-cluster classifier: incremental updates and drift", ""]
    lines += [
        "No real (prompt, routed experts) pairs exist at scale (the Mixtral sample has five), "
        "so the text-to-cluster classifier's accuracy is not measured. Its two mechanisms are "
        "measured on real prompts with **domain labels standing in for cluster labels "
        "(proxy)**; on ESFT, paper B's clusters coincide with the domains (ARI above).",
        "",
    ]
    inc = steps.get("incremental", {})
    d = ((steps.get("fit") or {}).get("report") or {}).get("domain", {})
    if inc.get("status") == "ok":
        curves = inc["curves"]
        seen = sorted({c["seen"] for v in curves.values() for c in v})
        lookup = {n: {c["seen"]: c["macro_f1"] for c in v} for n, v in curves.items()}
        lines += [
            f"`partial_fit` learning curve (SGD, learning rate {inc['learning_rate']}, "
            f"{inc['epochs']} epochs per batch, batch {inc['batch_size']}), held-out macro-F1 "
            "as training prompts arrive in random order. *cold*: from zero weights on the "
            f"bundle's fitted text features; *warm*: L-BFGS fit on the first "
            f"{_fmt(inc['warm_start_fit'])}, then updates. Full L-BFGS fit on all: "
            f"{_fmt(d.get('macro_f1'), 3)}. Update speed: "
            + ", ".join(f"{k} {v:,.0f} prompts/s" for k, v in inc["update_docs_per_s"].items())
            + ".",
            "",
        ]
        lines += _table(
            ["prompts seen", "cold macro-F1", "warm macro-F1"],
            [
                [_fmt(s), _fmt(lookup["cold"].get(s), 3), _fmt(lookup["warm"].get(s), 3)]
                for s in seen
            ],
        )
        lines.append("")
    dr = steps.get("drift", {})
    if dr.get("status") == "ok":
        lines += [
            f"Class-mix drift test (chi-square p < {dr['p_threshold']} **and** PSI >= "
            f"{dr['psi_threshold']}) on windows of {_fmt(dr['window'])} held-out prompts "
            "classified by the bundled domain classifier; reference = its predicted mix on "
            f"the held-out set. {_fmt(dr['windows'])} windows per row; a window mixes the "
            "held-out mix with one domain at the given shift. The windows are drawn from the "
            "same prompts the reference was computed on, so the no-shift row is a best case.",
            "",
        ]
        lines += _table(
            ["window mix", "shift", "windows flagged", "median PSI"],
            [
                [
                    s["name"],
                    "-" if s["shift"] is None else f"{s['shift']:.2f}",
                    f"{s['flagged']:.1%}",
                    _fmt(s["psi_median"], 3),
                ]
                for s in dr["scenarios"]
            ],
        )
        lines.append("")
    return lines


def render_predictors(data: dict[str, Any], source: Path) -> list[str]:
    steps = data.get("steps", {})
    fit = steps.get("fit", {})
    lines = [
        "## Request predictors on real data (`predictors`)",
        "",
        "Domain classifier, activation clusters, prefill -> decode prediction, incremental "
        "text-to-cluster updates and drift detection (docs/predictors.md). Real data "
        "throughout; each figure names the proxy it rests on.",
        "",
    ]
    failed = [f"`{n}`: {s.get('message')}" for n, s in steps.items() if s.get("status") != "ok"]
    if failed:
        lines += ["Failed steps: " + "; ".join(failed), ""]
    lines += _predictor_domain(steps, data.get("targets", {}))
    lines += _predictor_clusters(steps)
    lines += _predictor_prefill_decode(steps)
    lines += _predictor_online(steps)
    if fit.get("status") == "ok":
        lines += [
            f"`{fit['command']}` took {fit['wall_seconds']:.0f} s end to end (all prompts, "
            f"ESFT traces) and wrote a {fit['bundle_bytes'] / 2**20:.1f} MiB bundle; loading "
            f"it takes {_fmt(steps.get('domain', {}).get('bundle_load_seconds'), 2)} s.",
            "",
        ]
    lines += [
        _machine_line(data.get("machine", {})) + f" Run at {data.get('generated_at', '?')}.",
        "",
        f"Reproduce: `{_command(data, 'python -m benchmarks.predictors')}`. Raw numbers: "
        f"[`results/{source.name}`](results/{source.name}).",
        "",
    ]
    return lines

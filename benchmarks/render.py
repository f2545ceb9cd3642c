"""Render every ``benchmarks/results/*.json`` into ``benchmarks/RESULTS.md``.

Each result file names its benchmark in the ``"benchmark"`` key. A benchmark with an
entry in :data:`RENDERERS` gets its own section layout; any other result is shown as a
generic JSON dump, so a new benchmark appears in RESULTS.md before it has a renderer.

Usage::

    python benchmarks/render.py [--results benchmarks/results] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent

Renderer = Callable[[dict[str, Any], Path], list[str]]


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _machine_line(machine: dict[str, Any]) -> str:
    parts = []
    if machine.get("cpu_model"):
        parts.append(str(machine["cpu_model"]))
    if machine.get("cpu_count") is not None:
        usable = machine.get("cpus_usable")
        cpus = f"{machine['cpu_count']} CPUs"
        if usable is not None and usable != machine["cpu_count"]:
            cpus += f" ({usable} usable)"
        parts.append(cpus)
    if machine.get("memory_total_mib") is not None:
        parts.append(f"{machine['memory_total_mib'] / 1024:.0f} GiB RAM")
    for key, name in (("python", "Python"), ("numpy", "NumPy"), ("scikit_learn", "scikit-learn")):
        if machine.get(key):
            parts.append(f"{name} {machine[key]}")
    if machine.get("platform"):
        parts.append(str(machine["platform"]))
    return "Machine: " + ", ".join(parts) + "." if parts else "Machine: not recorded."


# --------------------------------------------------------------------------- renderers


def render_profile_scale(data: dict[str, Any], source: Path) -> list[str]:
    requests = data.get("requests")
    limit = data.get("memory_limit_mib")
    peaks = [s["peak_rss_mib"] for s in data.get("steps", []) if s.get("peak_rss_mib") is not None]
    top = max(peaks) if peaks else None
    lines = [
        "## Profile building at scale, synthetic requests (`profile_scale`)",
        "",
        f"Profile building for {_fmt(requests)} requests of {data.get('model')} shape "
        f"(MoE layers x experts decode counts), each step in its own process. "
        f"Memory limit: {_fmt(limit)} MiB; highest step peak: {_fmt(top, 0)} MiB; "
        f"within limit: **{_fmt(data.get('within_limit'))}**.",
        "",
    ]
    if data.get("synthetic"):
        lines += [
            f"**Synthetic data.** {data.get('synthetic_note', 'The requests are generated.')} "
            "Real traces of this size are not available; generated counts of the real shape "
            "exercise the same code paths (trace store, shard streaming, aggregation, "
            "clustering) at a size the real data cannot reach.",
            "",
        ]
    rows = []
    for step in data.get("steps", []):
        rows.append(
            [
                f"`{step.get('step')}`" + (" (synthetic)" if data.get("synthetic") else ""),
                str(step.get("status")),
                _fmt(step.get("seconds")),
                _fmt(step.get("peak_rss_mib"), 0),
                _fmt(step.get("requests_per_s"), 0),
            ]
        )
    lines += _table(["step", "status", "seconds", "peak RSS MiB", "requests/s"], rows)
    lines.append("")
    notes = []
    for step in data.get("steps", []):
        name = step.get("step")
        if name == "generate" and step.get("status") == "ok":
            notes.append(
                f"`generate` wrote {_fmt(step.get('shards'))} shards of "
                f"{_fmt(step.get('shard_size'))} requests (TraceWriter default, compressed); "
                f"{_fmt(step.get('draw_seconds'))} s of its time was drawing the random counts."
            )
        elif name == "label" and step.get("status") == "ok":
            notes.append(
                f'`label`: `build_profile(TraceSet(store), by="label")`, '
                f"{_fmt(step.get('classes'))} classes."
            )
        elif name == "cluster" and step.get("status") == "ok":
            notes.append(
                f'`cluster`: `build_profile(TraceSet(store), by="cluster", k={data.get("k")})`'
                f" (k-means fitted on {_fmt(step.get('kmeans_fitted_on'))} sampled requests, "
                "then every request assigned); "
                f"{_fmt(step.get('classes'))} clusters, purity against the generating "
                f"classes {_fmt(step.get('cluster_purity'), 3)}; cluster sizes "
                + ", ".join(_fmt(v) for v in step.get("requests_per_class", {}).values())
                + "."
            )
        if step.get("status") != "ok" and step.get("message"):
            notes.append(f"`{name}` {step.get('status')}: {step['message']}")
    baselines = [s.get("baseline_rss_mib") for s in data.get("steps", [])]
    if any(b is not None for b in baselines):
        low = min(b for b in baselines if b is not None)
        high = max(b for b in baselines if b is not None)
        span = f"{low:.0f}" if round(low) == round(high) else f"{low:.0f}-{high:.0f}"
        notes.append(
            f"Peak RSS is the child process's `ru_maxrss` and includes the interpreter "
            f"and imports ({span} MiB before the step's work); seconds are "
            "the step's own work, without process start-up."
        )
    per_request = (data.get("steps") or [{}])[0].get("store_bytes_per_request")
    lines += [
        f"- Store size on disk: {_fmt(data.get('store_mib'), 0)} MiB"
        + (f" ({per_request / 1024:.1f} KiB per request)." if per_request else ".")
    ]
    lines += [f"- {n}" for n in notes]
    lines += [
        "",
        _machine_line(data.get("machine", {})) + f" Run at {data.get('generated_at', '?')}.",
        "",
        "Reproduce: `make bench` (runs `python benchmarks/profile_scale.py` then "
        "`python benchmarks/render.py`). Raw numbers: "
        f"[`results/{source.name}`](results/{source.name}).",
        "",
    ]
    return lines


def render_emulator(data: dict[str, Any], source: Path) -> list[str]:
    target = data.get("target_requests_per_s")
    lines = [
        "## SGLang emulator throughput (`emulator`)",
        "",
        f"`moe-scheduler emulate {data.get('cluster', '')}` in its own process, driven over "
        f"real HTTP on loopback; {data.get('data', '')}; {data.get('prompts', '')}. "
        f"Target: at least {_fmt(target)} short non-streaming requests/s (`plain`); met: "
        f"**{_fmt(data.get('meets_target'))}**.",
        "",
        "Emulated, not measured on GPUs: routed experts are drawn from real per-class "
        "profiles and latency comes from the emulator's cost model (docs/emulator.md). "
        f"Load generator: {data.get('load_generator', 'not recorded')}; its CPU time is "
        "shown per request beside the server's.",
        "",
    ]
    rows = []
    for s in data.get("scenarios", []):
        latency = s.get("latency_ms") or {}
        options = ", ".join(
            name
            for name, on in (("stream", s.get("stream")), ("routed experts", s.get("routed")))
            if on
        )
        rows.append(
            [
                f"`{s.get('scenario')}`",
                options or "-",
                _fmt(s.get("time_scale"), 0),
                str(s.get("status")),
                _fmt(s.get("requests")),
                _fmt(s.get("requests_per_s"), 0),
                " / ".join(_fmt(latency.get(q), 1) for q in ("p50", "p90", "p99")),
                _fmt(s.get("server_cpu_us_per_request"), 0),
                _fmt(s.get("client_cpu_us_per_request"), 0),
            ]
        )
    lines += _table(
        [
            "scenario",
            "options",
            "time scale",
            "status",
            "requests",
            "requests/s",
            "latency ms p50 / p90 / p99",
            "server CPU us/request",
            "load-generator CPU us/request",
        ],
        rows,
    )
    lines.append("")
    first = (data.get("scenarios") or [{}])[0]
    lines += [
        f"Each scenario: {_fmt(first.get('concurrency'))} keep-alive connections, "
        f"{_fmt(first.get('max_new_tokens'))} completion tokens, capacity "
        f"{_fmt(first.get('capacity_per_rank'))} per rank. Time scale 0 answers at once (the "
        "emulator's own cost); time scale 1 holds each request for its modelled latency, so "
        "that row is bounded by connections / latency, not by the emulator."
    ]
    for s in data.get("scenarios", []):
        if s.get("message"):
            lines.append(f"- `{s.get('scenario')}`: {s['message']}")
    lines += [
        "",
        _machine_line(data.get("machine", {}))
        + f" aiohttp {data.get('machine', {}).get('aiohttp', '?')}."
        + f" Run at {data.get('generated_at', '?')}; load average (1/5/15 min) at start: "
        + " / ".join(_fmt(v, 2) for v in data.get("load_average_at_start") or [])
        + " (other work competes for the same cores).",
        "",
        f"Reproduce: `{data.get('command', 'python benchmarks/emulator_throughput.py')}` then "
        "`python benchmarks/render.py`. Raw numbers: "
        f"[`results/{source.name}`](results/{source.name}).",
        "",
    ]
    return lines


def _mean_std(values: list[Any], digits: int = 3) -> str:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    mean = sum(vals) / len(vals)
    std = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _predictor_domain(steps: dict[str, Any], targets: dict[str, Any]) -> list[str]:
    fit, dom = steps.get("fit", {}), steps.get("domain", {})
    d = (fit.get("report") or {}).get("domain")
    if not d:
        return [f"Domain classifier: not measured ({fit.get('message', 'fit failed')}).", ""]
    lat = dom.get("latency") or {}
    robust = lat.get("median_of_repeats") or {}
    f1_target, p99_target = targets.get("macro_f1"), targets.get("p99_ms")
    lines = [
        "### Domain classifier (real prompts)",
        "",
        f"Hashed TF-IDF word 1-2-grams + char 2-5-grams (first "
        f"{_fmt(dom.get('max_chars_used'))} characters) and multinomial logistic regression, "
        f"fitted on {_fmt(d['train'])} prompts and scored on {_fmt(d['test'])} held-out ones "
        f"({d.get('split')}). Latency: `predict_one` on every held-out prompt, one at a time, "
        f"{_fmt(lat.get('repeats'))} rounds after a warm-up, in one process on a machine "
        "shared with other work (load average "
        + " / ".join(_fmt(v, 2) for v in dom.get("loadavg_before") or [])
        + " before timing). The all-calls tail moves with whatever else runs on the machine "
        "at the time; the per-prompt median row filters that out.",
        "",
    ]
    rows = [
        [
            "macro-F1",
            _fmt(d["macro_f1"], 3),
            f">= {f1_target}",
            f"**{_fmt(d['macro_f1'] >= f1_target)}**" if f1_target else "-",
        ],
        ["accuracy", _fmt(d["accuracy"], 3), "-", "-"],
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
    lines += _table(["metric", "value", "target", "met"], rows) + [""]
    labels = d["confusion"]["labels"]
    lines += ["Confusion matrix (rows: true domain, columns: predicted):", ""]
    lines += _table(
        ["true \\ predicted", *labels],
        [
            [f"**{n}**", *map(_fmt, r)]
            for n, r in zip(labels, d["confusion"]["matrix"], strict=True)
        ],
    )
    lines += ["", "Per domain:", ""]
    lines += _table(
        ["domain", "precision", "recall", "F1", "held-out prompts"],
        [
            [c, _fmt(v["precision"], 3), _fmt(v["recall"], 3), _fmt(v["f1"], 3), _fmt(v["support"])]
            for c, v in d["per_class"].items()
        ],
    )
    worst = sorted(d.get("sources_test", {}).items(), key=lambda kv: kv[1]["accuracy"])[:5]
    lines += [
        "",
        "Lowest held-out accuracy by source dataset: "
        + "; ".join(f"`{s}` {v['accuracy']:.2f} (n={v['n']})" for s, v in worst)
        + ". The prompts' domain is the label of the dataset they come from, and AlpacaEval's "
        "user-style requests (labelled general) read like ShareGPT chat: most of the "
        "remaining error is that label overlap, not text the model could tell apart.",
    ]
    ref = steps.get("reference", {})
    if ref.get("status") == "ok":
        rl = ref["latency"]
        lines += [
            "",
            f"Reference, same split and truncation: scikit-learn's `TfidfVectorizer` (word 1-2 "
            f"+ char_wb 2-5) + `LogisticRegression(C=10)` pipeline: macro-F1 "
            f"{ref['macro_f1']:.3f}, single-request `predict_proba` p50 / p99 "
            f"{rl['p50_ms']:.2f} / {rl['p99_ms']:.2f} ms (first {_fmt(rl['requests'])} held-out "
            f"prompts), fit {ref['fit_seconds']:.0f} s. Ours is the same model family with "
            "hashed features scored by a vectorised numpy path.",
        ]
    return [*lines, ""]


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
        "averaged over its datasets (third-party reading of §3.3.3, docs/prior-work.md). The "
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
        f"Reproduce: `{data.get('command', 'python benchmarks/predictors.py')}`. Raw numbers: "
        f"[`results/{source.name}`](results/{source.name}).",
        "",
    ]
    return lines


def render_placement(data: dict[str, Any], source: Path) -> list[str]:
    records = data.get("records", [])
    lines = [
        "## Placement methods side by side (`placement`)",
        "",
        "Every method on the same input in the same run. Metrics are expected values under "
        "SGLang's static dispatch (`scheduler/placement/metrics.py`): remote (token, expert) "
        "hits per token-layer, the busiest rank's inter-node bytes (one copy per remote "
        "expert; relative to `trivial` with no redundancy), mean GPU balancedness "
        "(mean/max load; 1 is perfect) and its worst layer's max/mean, node request-load "
        "max/mean. `vs SGLang` is the remote-hit reduction against SGLang's default "
        "(`trivial`, no redundant experts, round-robin ranks).",
        "",
        "- **esft-heldout**: fitted on the even sequences of each ESFT domain, measured on the "
        "odd ones; requests go where each method's class-to-node shares send them, using the "
        "sequence's real domain (oracle classes).",
        "- **deepseek-v3-stats**: SGLang's published DeepSeek-V3 per-workload statistics "
        "(8 workload classes; aggregates, so fitted and measured on the same counts).",
        "",
    ]
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in records:
        key = (r.get("case"), r.get("nodes"), r.get("gpus_per_node"))
        groups.setdefault(key, []).append(r)
    for (case, nodes, gpus), group in groups.items():
        base = next(
            (
                r
                for r in group
                if r.get("method") == "trivial"
                and r.get("redundant_experts") == 0
                and r.get("status") != "error"
            ),
            None,
        )
        base_hits = (base or {}).get("metrics", {}).get("remote_hits_per_token_layer")
        base_bytes = (base or {}).get("metrics", {}).get("busiest_rank_inter_node_bytes")
        lines += [f"### {case}, {nodes} x {gpus} GPUs", ""]
        rows = []
        for r in group:
            m = r.get("metrics", {})
            hits = m.get("remote_hits_per_token_layer")
            busiest = m.get("busiest_rank_inter_node_bytes")
            rows.append(
                [
                    f"`{r.get('method')}`",
                    _fmt(r.get("redundant_experts")),
                    str(r.get("status")) + (f": {r['message']}" if r.get("message") else ""),
                    _fmt(r.get("seconds"), 1),
                    _fmt(hits, 3),
                    f"{(1 - hits / base_hits) * 100:.1f}%"
                    if hits is not None and base_hits
                    else "-",
                    _fmt(busiest / base_bytes, 3) if busiest is not None and base_bytes else "-",
                    _fmt(m.get("balancedness_mean"), 3),
                    _fmt(m.get("gpu_expert_load_imbalance_worst"), 3),
                    _fmt(m.get("node_request_load_imbalance"), 3),
                    f"{r['gap'] * 100:.2f}%" if r.get("gap") is not None else "-",
                ]
            )
        lines += _table(
            [
                "method",
                "redundant",
                "status",
                "seconds",
                "remote hits / token-layer",
                "vs SGLang",
                "busiest rank bytes (rel.)",
                "balancedness",
                "worst layer max/mean",
                "node requests max/mean",
                "gap to bound",
            ],
            rows,
        )
        lines.append("")
    lines += [
        f"Command: `{data.get('command', 'python benchmarks/placement.py')}` (also run by "
        "`make bench`); raw numbers: [`results/placement.json`](results/placement.json). "
        f"Run at {data.get('generated_at')}.",
        "",
    ]
    return lines


def render_accounting(data: dict[str, Any], source: Path) -> list[str]:
    target = data.get("target_token_layers_per_s")
    lines = [
        "## Locality accounting speed (`accounting`)",
        "",
        "Exact per-token accounting (`scheduler.accounting.account`: static dispatch, remote "
        "hits, node and intra-node copies, per-rank per-step bytes, GPU loads) over every "
        f"token-layer; target {_fmt(target, 0)} token-layers/s. "
        + _machine_line(data.get("machine", {})),
        "",
    ]
    rows = []
    for rec in data.get("records", []):
        if "error" in rec:
            rows.append([str(rec.get("case")), "failed: " + str(rec["error"])] + ["-"] * 6)
            continue
        rows.append(
            [
                f"{rec['case']} ({rec.get('note', '')})",
                f"{rec.get('model')}, {rec.get('topology')}, +{rec.get('redundant_slots')} slots",
                _fmt(rec.get("token_layers")),
                _fmt(rec.get("top_k")),
                _fmt(1e3 * rec["dispatch_table_s"], 1) + " ms",
                _fmt(rec.get("account_s"), 3) + " s",
                _fmt(rec["token_layers_per_s"] / 1e6, 1) + " M",
                _fmt(rec.get("meets_target")),
            ]
        )
    header = [
        "case",
        "shape",
        "token-layers",
        "top-k",
        "dispatch table",
        "account",
        "token-layers/s",
        "meets target",
    ]
    lines += _table(header, rows)
    lines += [
        "",
        f"Command: `{data.get('command', 'python benchmarks/accounting_speed.py')}` (also run "
        "by `make bench`); raw numbers: [`results/accounting.json`](results/accounting.json). "
        f"Run at {data.get('generated_at')}.",
        "",
    ]
    return lines


def render_generic(data: dict[str, Any], source: Path) -> list[str]:
    name = data.get("benchmark", source.stem)
    return [
        f"## {name}",
        "",
        f"No renderer for this benchmark yet; raw result from `results/{source.name}`:",
        "",
        "```json",
        json.dumps(data, indent=2),
        "```",
        "",
    ]


#: Benchmark name (the result's ``"benchmark"`` key) -> section renderer.
RENDERERS: dict[str, Renderer] = {
    "profile_scale": render_profile_scale,
    "emulator": render_emulator,
    "predictors": render_predictors,
    "placement": render_placement,
    "accounting": render_accounting,
}


def render(results_dir: Path) -> str:
    lines = [
        "# Benchmark results",
        "",
        "<!-- Generated by benchmarks/render.py from benchmarks/results/*.json; "
        "do not edit by hand. -->",
        "",
        "Regenerate with `make bench`.",
        "",
    ]
    files = sorted(results_dir.glob("*.json"))
    if not files:
        lines += ["No results yet.", ""]
    for path in files:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            lines += [f"## {path.stem}", "", f"Unreadable result file `{path.name}`: {e}", ""]
            continue
        if not isinstance(data, dict):
            lines += [f"## {path.stem}", "", f"`{path.name}` is not a JSON object.", ""]
            continue
        renderer = RENDERERS.get(str(data.get("benchmark")), render_generic)
        lines += renderer(data, path)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render benchmarks/RESULTS.md.")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "RESULTS.md")
    args = parser.parse_args(argv)
    args.out.write_text(render(args.results), encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

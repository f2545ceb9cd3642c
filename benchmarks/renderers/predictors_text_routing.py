"""RESULTS.md section of ``benchmarks/predictors_text_routing.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.renderers.common import _command, _fmt, _machine_line, _table

NAMES = ("text_cluster", "class_map", "one_cluster", "true_cluster")
LABELS = {
    "text_cluster": "learned text -> cluster / histogram",
    "class_map": "class map (domain classifier -> cluster)",
    "one_cluster": "one cluster (no prediction)",
    "true_cluster": "true cluster (bound)",
}


def _f(value: Any) -> str:
    return _fmt(value, 3)


def _held(held: dict[str, Any]) -> list[str]:
    rows = [
        [
            LABELS[n],
            _f(held[n].get("accuracy")),
            _f(held[n].get("pearson")),
            _f(held[n].get("locality")),
        ]
        for n in NAMES
        if n in held
    ]
    return _table(["predictor", "cluster accuracy", "histogram Pearson", "locality proxy"], rows)


def _curve(curve: list[dict[str, Any]]) -> list[str]:
    rows = []
    for r in curve:
        if "skipped" in r:
            rows.append([_fmt(r["pairs"]), "skipped: " + r["skipped"], "", "", "", ""])
            continue
        t, c, o = r["text_cluster"], r["class_map"], r["one_cluster"]
        rows.append(
            [
                _fmt(r["pairs"]),
                _fmt(r["runs"]),
                f"{_f(t['accuracy'])} / {_f(c['accuracy'])}",
                f"{_f(t['pearson'])} / {_f(c['pearson'])}",
                f"{_f(t['locality'])} / {_f(c['locality'])}",
                _f(o["locality"]),
            ]
        )
    header = [
        "training pairs",
        "seeds",
        "accuracy (learned / class map)",
        "Pearson (learned / class map)",
        "locality (learned / class map)",
        "locality, one cluster",
    ]
    return _table(header, rows)


def render_predictors_text_routing(data: dict[str, Any], source: Path) -> list[str]:
    steps = data.get("steps", {})
    lines = [
        "## Text -> routing predictors (`benchmarks/predictors_text_routing.py`)",
        "",
        f"Generated {data.get('generated_at', '?')}. {_machine_line(data.get('machine', {}))} "
        f"`{_command(data)}`. Raw: `results/{source.name}`.",
        "",
        "Baselines on the same held-out pairs: **class map** = the domain classifier's "
        "predicted domain -> the cluster most training pairs of that predicted domain "
        "belong to, histogram = their mean shares; **one cluster** = every request gets "
        "the training mean, placement one hot set. Locality: the hot-set proxy of "
        "`scheduler/prediction/locality.py` (not a placement solve).",
        "",
    ]
    real = steps.get("real_pairs", {})
    lines += ["### Real pairs (Mixtral sample)", ""]
    if real.get("status") != "ok":
        lines += [f"Error: {real.get('message', 'not run')}", ""]
    else:
        held = real.get("held_out", {})
        what = f"skipped: {held['skipped']}" if "skipped" in held else "see JSON"
        if "skipped" in real:
            what = f"skipped: {real['skipped']}"
        lines += [
            f"n = {real['pairs']} real (prompt, routed experts) pairs of {real['model']} "
            f"({real['with_prompts']} with prompts): {what}. Text mode: "
            f"{real['text_predictor']['use']} ({real['text_predictor']['why']}).",
            "",
        ]
        if "skipped" not in held and held:
            lines += [*_held(held), ""]
    em = steps.get("emulated_pairs", {})
    lines += ["### Emulated pairs (**proxy: routing drawn, not measured**)", ""]
    if em.get("status") != "ok":
        lines += [f"Error: {em.get('message', 'not run')}", ""]
    else:
        lines += [
            f"{em['proxy']}. Model {em['model']}, {em['decode_tokens_per_pair']} drawn decode "
            f"tokens per pair, {em['nodes']} nodes, {em['clusters']}; clusters vs true "
            f"domains ARI {_f(em['clusters_vs_domains_ari'])} (the draw makes clusters = "
            f"domains). {em['pairs']} pairs: {em['train_pairs']} training, "
            f"{em['test_pairs']} held out.",
            "",
        ]
        held = em["held_out"]
        if "skipped" in held:
            lines += [f"Skipped: {held['skipped']}", ""]
        else:
            lines += [*_held(held), ""]
        tp = em["text_predictor"]
        lines += [f"Text mode would use: **{tp['use']}** ({tp['why']}).", ""]
        lines += [
            f"Learning curve (mean over {em['learning_curve_seeds']} random orders of the "
            "training pairs; the held-out pairs are the same):",
            "",
            *_curve(em["learning_curve"]),
            "",
        ]
        lat = em.get("serving_latency") or {}
        if lat:
            lines += [
                f"Serving cost of one learned prediction (cluster + mixture histogram, "
                f"warm, {lat['requests']} held-out prompts): mean {_fmt(lat['mean_ms'], 3)} ms, "
                f"p99 {_fmt(lat['p99_ms'], 3)} ms.",
                "",
            ]
    buf = steps.get("buffer_row", {})
    if buf.get("status") == "ok":
        v2 = buf["deepseek_v2_lite_emulated"]
        v3 = buf["deepseek_v3_synthetic_bytes_by_tokens"]
        lines += [
            "### Feedback buffer row size (measured-routing encoding, without the prompt)",
            "",
            f"DeepSeek-V2-Lite (emulated, {v2['tokens']} tokens): mean "
            f"{_fmt(v2['mean_bytes'], 0)} B. DeepSeek-V3 shape (58 x 256, top-8; synthetic "
            "Dirichlet routing): "
            + ", ".join(f"{t} tokens {_fmt(b)} B" for t, b in v3.items())
            + "; 10,000 rows at 512 tokens: "
            + f"{_fmt(buf['deepseek_v3_10k_rows_mib_at_512_tokens'])} MiB.",
            "",
        ]
    return lines

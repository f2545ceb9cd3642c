"""``moe-scheduler fit`` and ``moe-scheduler classify``: the predictors' command line.

Thin: parses options, calls :mod:`scheduler.prediction`, reports. Registered by
:func:`scheduler.cli.build_parser` through :func:`add_commands`; heavy imports happen
inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from scheduler.errors import InputError
from scheduler.progress import ProgressLines

DEFAULT_DATA = Path("../shared/data")


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------- fit


def _print_fit_report(report: dict[str, Any]) -> None:
    d = report["domain"]
    print(
        f"domain classifier: macro-F1 {d['macro_f1']:.3f}, accuracy {d['accuracy']:.3f} on "
        f"{d['test']} held-out prompts (fitted on {d['train']} in {d['fit_seconds']:.0f} s)"
    )
    if d.get("relabelled_sources"):
        print(
            f"  labels: {d['labels']} ({', '.join(d['relabelled_sources'])}); macro-F1 against "
            f"the published labels {d['published_labels']['macro_f1']:.3f}"
        )
    if d.get("without_disagreeing_sources"):
        print(
            "  macro-F1 without the sources whose labels disagree with their text "
            f"(docs/predictors.md): {d['without_disagreeing_sources']['macro_f1']:.3f}"
        )
    labels = d["confusion"]["labels"]
    print("  confusion (rows: true, columns: predicted): " + " ".join(labels))
    for name, row in zip(labels, d["confusion"]["matrix"], strict=True):
        print(f"    {name:>10} " + " ".join(f"{v:6d}" for v in row))
    r = report.get("routing", {})
    if "skipped" in r:
        print(f"routing predictors: skipped ({r['skipped']})")
        return
    proxy = f" [{r['pairs']}]" if r.get("pairs") else ""
    c = r["clusters"]
    sel = c["selected"]
    line = (
        f"activation clusters ({r['model']}, {c['nodes']} nodes x {c['per_node']} experts "
        f"per layer): selected K={sel['n_clusters']}, features {sel['features']}, "
        f"layers {c.get('layer_set', 'all')}"
    )
    print(line)
    held = c.get("held_out")
    if held:
        print(
            f"  held-out locality proxy{proxy}: selected {held['selected']['hot_set']:.3f}, "
            f"paper B (K={held['paper_b']['k']}) {held['paper_b']['hot_set']:.3f}, "
            f"one cluster {held['one_cluster']['hot_set']:.3f}, uniform {held['uniform']:.3f}"
        )
    pd = r["prefill_decode"]
    if "held_out" in pd:
        h = pd["held_out"]
        print(f"prefill->decode predictor{proxy}, {pd['test']} held-out requests:")
        for name in ("prefill", "prior", "ridge_unblended", "ridge"):
            m = h[name]
            n0 = pd["blend_n0"]
            blended = f"ridge, blend n0 {n0:g}" if n0 else "ridge, no blend chosen"
            label = blended if name == "ridge" else name
            print(
                f"  {label:>24}: Pearson {_fmt(m['pearson_mean'])}, recall@{m['k']} "
                f"{_fmt(m['recall_at_k_mean'])}, mass@{m['m']} {_fmt(m['mass_at_m_mean'])}"
            )
        buckets = pd.get("held_out_by_prefill_length", {}).get("ridge", [])
        if buckets:
            print(
                "  blended ridge Pearson by prefill tokens: "
                + ", ".join(
                    f"{b['tokens']}: {_fmt(b['pearson_mean'])} ({b['requests']})" for b in buckets
                )
            )
    elif "skipped" in pd:
        print(f"prefill->decode predictor: skipped ({pd['skipped']})")
    _print_text_routing(r["text_cluster"])


def _print_text_routing(tc: dict[str, Any]) -> None:
    if "skipped" in tc:
        print(f"text -> routing predictors: skipped ({tc['skipped']})")
        return
    held = tc["held_out"]
    if "skipped" in held:
        print(
            f"text -> routing predictors: fitted on {tc['train_pairs']} pairs; held-out "
            f"figures skipped ({held['skipped']})"
        )
    else:
        print(
            f"text -> routing predictors, {held['test_pairs']} held-out pairs (fitted on "
            f"{held['train_pairs']}): accuracy / histogram Pearson / locality proxy"
        )
        for name in ("text_cluster", "class_map", "one_cluster", "true_cluster"):
            m = held[name]
            print(
                f"  {name:>13}: {_fmt(m['accuracy'])} / {_fmt(m['pearson'])} / "
                f"{_fmt(m['locality'])}"
            )
        curve = tc.get("learning_curve", [])
        if curve:
            parts = []
            for row in curve:
                if "skipped" in row:
                    parts.append(f"{row['pairs']}: skipped")
                    continue
                t, c = row["text_cluster"], row["class_map"]
                parts.append(
                    f"{row['pairs']}: {_fmt(t['accuracy'], 2)}/{_fmt(t['locality'], 2)} "
                    f"(class map {_fmt(c['accuracy'], 2)}/{_fmt(c['locality'], 2)})"
                )
            print("  learning curve, pairs: learned accuracy/locality: " + ", ".join(parts))
    choice = tc["text_predictor"]
    print(f"  text mode will use: {choice['use']} ({choice['why']})")


def cmd_fit(args: argparse.Namespace) -> int:
    from scheduler.model_shape import resolve_model
    from scheduler.prediction.bundle import save_bundle
    from scheduler.prediction.training import FitConfig, fit_predictors

    config = FitConfig(
        data_dir=args.data,
        traces=args.traces,
        trace_format=args.format,
        pairs=args.pairs,
        model=resolve_model(args.model) if args.model else None,
        nodes=args.nodes,
        clusters=args.clusters,
        prefill_fraction=args.prefill_fraction,
        max_prompts=args.max_prompts,
        relabel_sources=args.relabel_sources,
        random_state=args.seed,
    )
    print(f"fitting predictors from {args.data}", file=sys.stderr)
    bundle, report, routing = fit_predictors(config, progress=ProgressLines(at_once=False))
    _print_fit_report(report)
    digest = save_bundle(bundle, args.out)
    size = args.out.stat().st_size / 2**20
    print(f"wrote {args.out} ({size:.1f} MiB, sha256 {digest[:16]}...)")
    if args.report is not None:
        _write_atomic(args.report, json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.report}")
    if args.profile_out is not None:
        from scheduler.prediction.profiles import cluster_profile
        from scheduler.profile import save_profile

        if routing is None or bundle.clusters is None or bundle.model is None:
            raise InputError(config.traces_path, "no routing data: cannot write --profile-out")
        profile = cluster_profile(bundle.clusters, routing, bundle.model, config)
        args.profile_out.parent.mkdir(parents=True, exist_ok=True)
        save_profile(profile, args.profile_out)
        print(f"wrote {args.profile_out}: {len(profile.classes)} cluster classes")
    return 0


# ----------------------------------------------------------------------------- classify


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_requests(path: Path) -> tuple[list[Any], list[str]]:
    from scheduler.jsonio import read_json_lines

    if not path.is_file():
        raise InputError(path, "does not exist")
    ids, prompts = [], []
    for n, row in read_json_lines(path):
        if not isinstance(row, dict) or "id" not in row:
            raise InputError(path, f"line {n}: expected a JSON object with 'id' and 'prompt'")
        if not isinstance(row.get("prompt"), str):
            raise InputError(path, f"line {n}: 'prompt' must be a string")
        ids.append(row["id"])
        prompts.append(row["prompt"])
    return ids, prompts


def cmd_classify(args: argparse.Namespace) -> int:
    from scheduler.model_shape import resolve_model
    from scheduler.prediction.bundle import load_bundle

    model = resolve_model(args.model) if args.model else None
    bundle = load_bundle(args.bundle, model=model)
    ids, prompts = _read_requests(args.input)
    progress = ProgressLines(at_once=False)
    rows = []
    domains = []
    for i, (rid, text) in enumerate(zip(ids, prompts, strict=True)):
        domain, p = bundle.domain.predict_one(text)
        domains.append(domain)
        row: dict[str, Any] = {"id": rid, "domain": domain, "probability": round(p, 6)}
        if bundle.text_cluster is not None:
            cluster, q = bundle.text_cluster.predict_one(text)
            row.update(cluster=cluster, cluster_probability=round(q, 6))
        rows.append(json.dumps(row, ensure_ascii=False))
        progress(f"classify: {i + 1}/{len(ids)} requests")
    text_out = "".join(r + "\n" for r in rows)
    if args.output is None:
        sys.stdout.write(text_out)
    else:
        _write_atomic(args.output, text_out)
    mix = {c: domains.count(c) for c in bundle.domain.classes_.tolist()}
    summary = f"classified {len(rows)} requests: " + ", ".join(f"{c} {n}" for c, n in mix.items())
    if bundle.domain_drift is not None and domains:
        t = bundle.domain_drift.test(domains)
        summary += (
            f"; domain mix vs the training reference: PSI {t.psi:.3f}, chi-square "
            f"p={t.p_value:.2g} -> {'DRIFT' if t.drifted else 'no drift'}"
        )
    print(summary + (f"; wrote {args.output}" if args.output else ""), file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- parser


def add_commands(sub: Any) -> None:
    """Add ``fit`` and ``classify`` to the ``moe-scheduler`` subparsers."""
    from scheduler.model_shape import PRESETS
    from scheduler.traces.importers import FORMATS

    model_help = f"model shape: a preset ({', '.join(PRESETS)}) or a JSON file with the model keys"
    p = sub.add_parser(
        "fit",
        help="train the predictors (domain, clusters, prefill->decode) into a bundle",
        description="Train the request predictors from the real prompts and traces, print "
        "their held-out scores and write one versioned bundle (docs/predictors.md).",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help=f"data directory with prompts/ and traces/ (default {DEFAULT_DATA})",
    )
    p.add_argument("--out", type=Path, required=True, help="bundle file to write (.npz)")
    p.add_argument(
        "--traces",
        type=Path,
        default=None,
        help="routing traces for the clusters and the prefill->decode predictor "
        "(default DATA/traces/esft-deepseek-v2-lite)",
    )
    p.add_argument("--format", choices=list(FORMATS), default=None, help="--traces format")
    p.add_argument(
        "--pairs",
        type=Path,
        default=None,
        help="the server's feedback buffer (FEEDBACK_DIR/buffer.jsonl) as the routing "
        "source instead of --traces: (prompt, measured routing) pairs; needs --model",
    )
    p.add_argument("--model", default=None, metavar="NAME|FILE", help=model_help)
    p.add_argument("--nodes", type=int, default=4, help="nodes for the locality proxy (default 4)")
    p.add_argument(
        "--clusters",
        type=int,
        default=None,
        help="number of activation clusters (default: chosen by the locality proxy)",
    )
    p.add_argument(
        "--prefill-fraction",
        type=float,
        default=0.5,
        help="for single-pass traces (ESFT): share of each sequence's tokens taken as "
        "its prefill (default 0.5)",
    )
    p.add_argument(
        "--max-prompts",
        type=int,
        default=None,
        help="train the domain classifier on a random subsample of this many prompts",
    )
    p.add_argument(
        "--relabel-sources",
        action="store_true",
        help="train and score the domain classifier with the sources whose published label "
        "disagrees with their text relabelled (docs/predictors.md; default: the prompt "
        "files' own domain labels)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed for splits and k-means")
    p.add_argument("--report", type=Path, default=None, help="also write the scores as JSON")
    p.add_argument(
        "--profile-out",
        type=Path,
        default=None,
        help="also write a workload profile whose classes are the activation clusters",
    )
    p.set_defaults(handler=cmd_fit)

    p = sub.add_parser(
        "classify",
        help="classify prompts (JSON lines with id and prompt) with a predictor bundle",
        description="Predict each request's domain (and activation cluster when the bundle "
        "has a text-to-cluster classifier). Input: JSON lines with 'id' and 'prompt' "
        "(.gz/.xz accepted); output: one JSON line per input row.",
    )
    p.add_argument("--bundle", type=Path, required=True, help="bundle written by fit")
    p.add_argument("--input", type=Path, required=True, help="requests, JSON lines")
    p.add_argument("--output", type=Path, default=None, help="JSON lines to write (default stdout)")
    p.add_argument(
        "--model",
        default=None,
        metavar="NAME|FILE",
        help="refuse the bundle unless it was fitted for this model shape",
    )
    p.set_defaults(handler=cmd_classify)

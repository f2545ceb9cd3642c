"""Benchmark: the request predictors on the real data.

1. ``fit``: runs ``moe-scheduler fit`` (all real prompts, the ESFT traces) as a user
   would, timed; its held-out scores are the domain classifier's and the defaults'.
2. ``domain``: held-out macro-F1 / confusion / per-source predictions (from the fit) and
   warm single-request latency of the bundled classifier over every held-out prompt.
   ``settings``: the previous and the current classifier settings, each trained on the
   published and on the relabelled labels, fitted on the training rows less a
   validation split and scored on that validation split (never on the held-out rows);
   ``--selection`` adds the one-change-at-a-time candidates the defaults were chosen from.
3. ``reference``: scikit-learn's own TfidfVectorizer (word 1-2 + char_wb 2-5) and
   LogisticRegression on the same split, for comparison.
4. ``incremental``: ``partial_fit`` learning curves (cold start on the bundle's text
   features, and warm start from a fit on 10%) -- PROXY: domain labels stand in for
   activation-cluster labels, as no real (prompt, routed experts) pairs exist at scale.
5. ``drift``: false-alarm and detection rates of the class-mix drift test on windows of
   real held-out prompts drawn with the training mix or a shifted one.
6. ``clusters``: ESFT (real routing, DeepSeek-V2-Lite): paper B's k-means (K = N) vs ours
   (K / features chosen by the locality proxy) vs one cluster, several splits and N.
   PROXY: the placement-benefit proxy of scheduler.prediction.locality, and the ESFT
   early/late split of each sequence standing in for prefill / decode.
7. ``prefill_decode``: ESFT early/late proxy at several split points; and the one real
   Mixtral request with both phases (n = 1).
8. Text -> routing (held-out cluster accuracy, histogram Pearson and locality of the
   learned text predictor vs the class map and one cluster, and its learning curve) is
   its own script, ``benchmarks/predictors_text_routing.py``, so it runs alone in a few
   minutes and writes ``results/predictors_text_routing.json``.

Usage::

    python -m benchmarks.predictors [--data ../shared/data] [--seeds 5] [--no-reference]
        [--selection]

Failures are recorded per step in the JSON (status "error" and a message), not raised.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import harness
from benchmarks.machine import machine_facts
from scheduler.prediction.bundle import load_bundle
from scheduler.prediction.training import FitConfig, domain_split, request_split

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

NODES = (2, 4, 8)
FRACTIONS = (0.25, 0.5, 0.75)
TARGETS = {"macro_f1": 0.96, "p99_ms": 0.5}
#: The domain classifier's earlier settings (logistic-regression C and the
#: HashedTfidf parameters that changed); "current" = the defaults of this build.
PREVIOUS: dict[str, Any] = {
    "C": 10.0,
    "char_ngrams": (2, 5),
    "keep_char_case": False,
    "shape_tokens": False,
}
#: (name, settings, training labels) compared on the validation split in every run.
SETTINGS = [
    ("previous", PREVIOUS, "published"),
    ("previous", PREVIOUS, "relabelled"),
    ("current", {}, "published"),
    ("current", {}, "relabelled"),
]
#: With --selection: one change at a time from the previous settings, and from the current.
SELECTION = [
    ("previous, C=30", {**PREVIOUS, "C": 30.0}, "published"),
    ("previous + case-kept char n-grams", {**PREVIOUS, "keep_char_case": True}, "published"),
    ("previous + shape tokens", {**PREVIOUS, "shape_tokens": True}, "published"),
    ("previous + char 1-5-grams", {**PREVIOUS, "char_ngrams": (1, 5)}, "published"),
    ("current, C=10", {"C": 10.0}, "published"),
    ("current, C=100", {"C": 100.0}, "published"),
    ("current, lower-cased char n-grams", {"keep_char_case": False}, "published"),
    ("current, no shape tokens", {"shape_tokens": False}, "published"),
    ("current, char 2-5-grams", {"char_ngrams": (2, 5)}, "published"),
    ("current, 2**19 word + 2**21 char buckets", {"word_bits": 19, "char_bits": 21}, "published"),
    ("current, first 2,000 characters", {"max_chars": 2000}, "published"),
]


def _machine() -> dict[str, Any]:
    return machine_facts("numpy", "scikit-learn")


def _relative(arg: str) -> str:
    """A path argument as seen from the repository root (for the displayed command)."""
    return os.path.relpath(arg, ROOT) if arg.startswith("/") else arg


# --------------------------------------------------------------------------- steps


def step_fit(data: Path, work: Path) -> dict[str, Any]:
    bundle, report = work / "predictors.npz", work / "predictors-fit.json"
    cmd = ["fit", "--data", str(data), "--out", str(bundle), "--report", str(report)]
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "scheduler", *cmd], cwd=ROOT, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"fit exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return {
        "command": "moe-scheduler " + " ".join(_relative(a) for a in cmd),
        "wall_seconds": wall,
        "stdout": proc.stdout,
        "report": json.loads(report.read_text()),
        "bundle_bytes": bundle.stat().st_size,
    }


def step_domain(bundle_path: Path, data: Path) -> dict[str, Any]:
    from scheduler.prediction.evaluation import interleaved_latency, single_request_latency

    start = time.perf_counter()
    bundle = load_bundle(bundle_path)
    load_s = time.perf_counter() - start
    prompts, train, test = domain_split(FitConfig(data_dir=data))
    texts = prompts.texts[test]
    lengths = np.array([len(t) for t in texts])
    load_before = os.getloadavg()
    latency = single_request_latency(bundle.domain.predict_one, texts, repeats=3)
    load_after = os.getloadavg()
    # The previous settings' cost on the same prompts, timed in turn with the bundle's
    # model so that both see the same machine load (this build's code for both).
    previous = _classifier(PREVIOUS).fit(prompts.texts[train], prompts.domains[train])
    compared = interleaved_latency(
        {"current": bundle.domain.predict_one, "previous": previous.predict_one},
        texts,
        repeats=3,
    )
    return {
        "bundle_load_seconds": load_s,
        "latency": latency,
        "loadavg_before": list(load_before),
        "loadavg_after": list(load_after),
        "latency_vs_previous": compared,
        "prompt_chars": {
            "p50": float(np.percentile(lengths, 50)),
            "p90": float(np.percentile(lengths, 90)),
            "p99": float(np.percentile(lengths, 99)),
        },
        "max_chars_used": bundle.domain.features_.max_chars,
    }


def _classifier(settings: dict[str, Any]) -> Any:
    from scheduler.prediction.text_classifier import TextClassifier
    from scheduler.prediction.text_features import HashedTfidf

    features = {k: v for k, v in settings.items() if k != "C"}
    extra = {"C": settings["C"]} if "C" in settings else {}
    return TextClassifier(features=HashedTfidf(**features), **extra)


def step_settings(data: Path, selection: bool) -> dict[str, Any]:
    from scheduler.prediction.training import domain_scores, validation_split

    config = FitConfig(data_dir=data, relabel_sources=True)
    prompts, train, _ = domain_split(config)
    fit_rows, val_rows = validation_split(prompts, train, config)
    labels = {"published": prompts.published_domains, "relabelled": prompts.domains}
    val = prompts.subset(val_rows)
    runs = []
    for name, settings, trained_on in SETTINGS + (SELECTION if selection else []):
        model = _classifier(settings)
        start = time.perf_counter()
        model.fit(prompts.texts[fit_rows], labels[trained_on][fit_rows])
        fit_s = time.perf_counter() - start
        scores = domain_scores(val, model.predict(val.texts), model.classes_)
        runs.append(
            {
                "name": name,
                "settings": {"C": model.C, **model.features_.get_params()},
                "trained_on": trained_on,
                "fit_seconds": fit_s,
                "converged": model.converged_,
                "relabelled": {k: scores[k] for k in ("macro_f1", "accuracy", "per_class")},
                "published": scores["published_labels"],
                "without_disagreeing_sources": scores["without_disagreeing_sources"],
            }
        )
        harness.eprint(
            f"  settings {name} (trained on {trained_on} labels): validation macro-F1 "
            f"{scores['published_labels']['macro_f1']:.4f} published, {scores['macro_f1']:.4f} "
            "relabelled"
        )
    return {"fit_rows": len(fit_rows), "validation_rows": len(val_rows), "runs": runs}


def step_reference(data: Path) -> dict[str, Any]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline, make_union

    from scheduler.prediction.evaluation import classification_scores, single_request_latency

    prompts, train, test = domain_split(FitConfig(data_dir=data))
    pipe = make_pipeline(
        make_union(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2),
            TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2),
        ),
        LogisticRegression(C=10.0, max_iter=300),
    )
    cut = [t[:1000] for t in prompts.texts]  # same truncation as ours
    start = time.perf_counter()
    pipe.fit([cut[i] for i in train], prompts.domains[train].astype(str))
    fit_s = time.perf_counter() - start
    test_texts = [cut[i] for i in test]
    scores = classification_scores(prompts.domains[test], pipe.predict(test_texts), pipe.classes_)
    sample = test_texts[:2000]
    latency = single_request_latency(lambda t: pipe.predict_proba([t]), sample, warmup=50)
    return {"fit_seconds": fit_s, "macro_f1": scores["macro_f1"], "latency": latency}


def step_incremental(bundle_path: Path, data: Path, seed: int) -> dict[str, Any]:
    from scheduler.prediction.evaluation import classification_scores
    from scheduler.prediction.text_classifier import TextClassifier

    features = load_bundle(bundle_path).domain.features_
    prompts, train, test = domain_split(FitConfig(data_dir=data))
    order = np.random.default_rng(seed).permutation(train)
    y = prompts.domains.astype(str)
    checkpoints = [500, 1000, 2000, 4000, 8000, 16000, len(order)]
    curves: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": []}
    docs_per_s: dict[str, float] = {}
    warm_n = len(order) // 10
    models = {
        "cold": TextClassifier(features=features),
        "warm": TextClassifier(features=features).fit(
            prompts.texts[order[:warm_n]], y[order[:warm_n]]
        ),
    }
    for name, model in models.items():
        done = 0 if name == "cold" else warm_n
        update_s = 0.0
        for stop in checkpoints:
            if stop <= done:
                continue
            rows = order[done:stop]
            start = time.perf_counter()
            model.partial_fit(prompts.texts[rows], y[rows], classes=np.unique(y))
            update_s += time.perf_counter() - start
            done = stop
            f1 = classification_scores(y[test], model.predict(prompts.texts[test]), model.classes_)
            curves[name].append({"seen": done, "macro_f1": f1["macro_f1"]})
            harness.eprint(f"  incremental {name}: {done} seen, macro-F1 {f1['macro_f1']:.3f}")
        docs_per_s[name] = (done - (0 if name == "cold" else warm_n)) / update_s
    cold = models["cold"]
    return {
        "warm_start_fit": warm_n,
        "curves": curves,
        "update_docs_per_s": docs_per_s,
        "learning_rate": cold.learning_rate,
        "epochs": cold.epochs,
        "batch_size": cold.batch_size,
    }


def step_drift(bundle_path: Path, data: Path, seed: int) -> dict[str, Any]:
    bundle = load_bundle(bundle_path)
    drift = bundle.domain_drift
    assert drift is not None
    prompts, _, test = domain_split(FitConfig(data_dir=data))
    truth = prompts.domains[test].astype(str)
    predicted = bundle.domain.predict(prompts.texts[test])
    classes = drift.classes_.tolist()
    by_class = {c: np.flatnonzero(truth == c) for c in classes}
    natural = np.array([len(by_class[c]) for c in classes], dtype=float)
    natural /= natural.sum()
    rng = np.random.default_rng(seed)
    windows, size = 200, drift.window

    def rate(mix: np.ndarray) -> dict[str, float]:
        hits, psis = 0, []
        for _ in range(windows):
            per_domain = rng.multinomial(size, mix)
            rows = np.concatenate(
                [rng.choice(by_class[c], size=k) for c, k in zip(classes, per_domain, strict=True)]
            )
            result = drift.test(predicted[rows])
            hits += result.drifted
            psis.append(result.psi)
        return {"flagged": hits / windows, "psi_median": float(np.median(psis))}

    scenarios = [{"name": "training mix", "shift": 0.0, **rate(natural)}]
    for target in ("code", "math", "chat", "general"):
        onehot = np.array([c == target for c in classes], dtype=float)
        for s in (0.05, 0.1, 0.2, 0.3):
            mix = (1 - s) * natural + s * onehot
            scenarios.append({"name": f"towards {target}", "shift": s, **rate(mix)})
    scenarios.append({"name": "uniform over domains", "shift": None, **rate(np.full(4, 0.25))})
    return {
        "window": size,
        "windows": windows,
        "p_threshold": drift.p_threshold,
        "psi_threshold": drift.psi_threshold,
        "natural_mix": dict(zip(classes, natural.tolist(), strict=True)),
        "scenarios": scenarios,
    }


def _esft(data: Path) -> Any:
    from scheduler.prediction.datasets import load_routing
    from scheduler.traces.importers import open_traces

    with tempfile.TemporaryDirectory() as tmp:
        traces = open_traces(data / "traces" / "esft-deepseek-v2-lite", Path(tmp))
        return load_routing(traces), traces.model


def step_clusters(data: Path, seeds: int) -> dict[str, Any]:
    from scheduler.prediction.cluster_selection import make_clusters, score_clusters
    from scheduler.prediction.training import fit_clusters, phase_pairs

    routing, model = _esft(data)
    pairs = phase_pairs(routing, model.num_experts, 0.5)
    labels = np.asarray(routing.labels, dtype=str)
    runs = []
    for nodes in NODES:
        for seed in range(seeds):
            config = FitConfig(data_dir=data, nodes=nodes, random_state=seed)
            train, test = request_split(list(labels), config)
            _, report = fit_clusters(pairs, labels, train, test, config)
            cands = [c for c in report["candidates"] if c["silhouette"] is not None]
            by_sil = max(cands, key=lambda c: c["silhouette"])
            per_node = model.num_experts // nodes
            sil_model = make_clusters(
                by_sil["features"],
                by_sil["layers"],
                by_sil["k"],
                model.num_moe_layers,
                per_node,
                seed,
            ).fit(pairs["decode"][train])
            sil_hot, _ = score_clusters(
                sil_model, per_node, pairs["prefill"][test], pairs["decode"][test]
            )
            held = report["held_out"]
            held["by_silhouette"] = {
                **{k: by_sil[k] for k in ("features", "layers", "k")},
                "hot_set": sil_hot,
            }
            sel = report["selected"]
            runs.append(
                {
                    "nodes": nodes,
                    "seed": seed,
                    "selected": {
                        "features": sel["features"],
                        "layers": report["layer_set"],
                        "k": sel["n_clusters"],
                    },
                    "held_out": held,
                }
            )
            harness.eprint(
                f"  clusters N={nodes} seed={seed}: {sel['features']} K={sel['n_clusters']}"
            )
    return {"model": model.name, "requests": len(routing), "pairs": pairs["mode"], "runs": runs}


def step_prefill_decode(data: Path, seeds: int) -> dict[str, Any]:
    from sklearn.model_selection import train_test_split

    from scheduler.prediction.datasets import load_routing, split_tokens
    from scheduler.prediction.prefill_decode import METHODS, PrefillDecodePredictor
    from scheduler.prediction.prefill_decode import evaluate_prediction as evaluate
    from scheduler.traces.importers import open_traces

    routing, model = _esft(data)
    labels = np.asarray(routing.labels, dtype=str)
    m = model.num_experts // 4
    esft = []
    for fraction in FRACTIONS:
        early, late = split_tokens(
            [t["prefill"] for t in routing.token_ids], model.num_experts, fraction
        )
        for seed in range(seeds):
            idx = np.arange(len(routing))
            train, test = train_test_split(idx, test_size=0.3, stratify=labels, random_state=seed)
            for method in METHODS:
                p = PrefillDecodePredictor(method).fit(early[train], late[train])
                s = evaluate(p.predict(early[test]), late[test], k=model.top_k, m=m)
                esft.append({"fraction": fraction, "seed": seed, "method": method, **s})
    with tempfile.TemporaryDirectory() as tmp:
        traces = open_traces(data / "traces" / "mixtral-humaneval-gsm8k-small", Path(tmp))
        mixtral = load_routing(traces)
        mshape = traces.model
    both = np.flatnonzero(mixtral.present["prefill"] & mixtral.present["decode"])
    others = [i for i in range(len(mixtral)) if i not in both and mixtral.ids[i] != "humaneval/0"]
    pre = mixtral.phase_counts["prefill"][both]
    dec = mixtral.phase_counts["decode"][both]
    mx: dict[str, Any] = {
        "request": [mixtral.ids[i] for i in both],
        "prior_from": [mixtral.ids[i] for i in others],
    }
    mm = mshape.num_experts // 4
    for method in ("prefill", "prior"):
        src = mixtral.phase_counts["decode"][others]
        p = PrefillDecodePredictor(method).fit(src, src)
        mx[method] = evaluate(p.predict(pre), dec, k=mshape.top_k, m=mm)
    return {"esft": {"model": model.name, "rows": esft}, "mixtral": {"model": mshape.name, **mx}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "predictors.json")
    parser.add_argument("--workdir", type=Path, default=BENCH_DIR / "work")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument(
        "--selection",
        action="store_true",
        help="also score the candidate settings the domain classifier's defaults were "
        f"chosen from on the validation split ({len(SELECTION)} more fits)",
    )
    args = parser.parse_args(argv)
    data = args.data.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle = args.workdir / "predictors.npz"
    result: dict[str, Any] = {
        "benchmark": "predictors",
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "data": str(args.data),
        "targets": TARGETS,
        "machine": _machine(),
        "command": "python -m benchmarks.predictors"
        + (" --selection" if args.selection else "")
        + " && python -m benchmarks.render",
    }
    steps = result["steps"] = {}
    steps["fit"] = harness.run_step("fit", lambda: step_fit(data, args.workdir))
    if steps["fit"]["status"] == "ok":
        steps["domain"] = harness.run_step("domain", lambda: step_domain(bundle, data))
        steps["incremental"] = harness.run_step(
            "incremental", lambda: step_incremental(bundle, data, 0)
        )
        steps["drift"] = harness.run_step("drift", lambda: step_drift(bundle, data, 0))
    steps["settings"] = harness.run_step("settings", lambda: step_settings(data, args.selection))
    if not args.no_reference:
        steps["reference"] = harness.run_step("reference", lambda: step_reference(data))
    steps["clusters"] = harness.run_step("clusters", lambda: step_clusters(data, args.seeds))
    steps["prefill_decode"] = harness.run_step(
        "prefill_decode", lambda: step_prefill_decode(data, args.seeds)
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    harness.eprint(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

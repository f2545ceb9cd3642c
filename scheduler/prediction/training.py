"""Fitting every predictor from the shared data, with held-out scores.

:func:`fit_predictors` is what ``moe-scheduler fit`` runs. The bundle holds exactly the
models whose held-out scores it reports (fitted on the training split only).

* Domain classifier: prompts split by text (identical prompts on one side), stratified
  by published domain. Trained on the published labels; with ``relabel_sources`` the
  sources of :data:`~scheduler.prediction.datasets.SOURCE_RELABELS` (labels that disagree
  with their text) are relabelled instead, which changes labels, never rows. Fitted on
  the training part, scored on the rest against the labels used (and the published ones
  when they differ), without the disagreeing sources, and per source.
* Routing-based predictors, from a trace set. Requests are split (stratified by label
  when labelled). The prefill / decode pair of a request is, in order of preference:
  its measured prefill and decode routing (``"measured"``), or -- for traces of one
  forward pass such as ESFT -- its first ``prefill_fraction`` of tokens against the
  rest (``"early-late proxy"``). Clusters are fitted on the decode side (as paper B
  clusters decode activations); held-out requests are assigned from their prefill side
  and scored on their decode side.
* Text-to-cluster classifier: from the training requests that carry prompt text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.errors import ConfigError, InputError
from scheduler.model_shape import ModelShape
from scheduler.prediction.bundle import PredictorBundle
from scheduler.prediction.cluster_selection import make_clusters, score_clusters, select_clusters
from scheduler.prediction.clusters import ActivationClusters
from scheduler.prediction.datasets import (
    SOURCE_RELABELS,
    PromptSet,
    RoutingSet,
    grouped_split,
    load_prompts,
    relabel_sources,
    split_tokens,
    text_groups,
)
from scheduler.prediction.drift import ClassMixDrift
from scheduler.prediction.evaluation import classification_scores
from scheduler.prediction.locality import oracle_locality, per_node_capacity
from scheduler.prediction.prefill_decode import (
    METHODS,
    PrefillDecodePredictor,
    evaluate_prediction,
    quality_by_length,
)
from scheduler.prediction.text_classifier import TextClassifier
from scheduler.prediction.text_cluster import TextClusterClassifier
from scheduler.progress import Progress

DEFAULT_TRACES = Path("traces") / "esft-deepseek-v2-lite"
#: Fewer requests than this: no held-out split (everything is training data).
MIN_SPLIT_REQUESTS = 10


@dataclass(frozen=True)
class FitConfig:
    """Options of ``moe-scheduler fit``; see :func:`fit_predictors`."""

    data_dir: Path
    traces: Path | None = None
    trace_format: str | None = None
    #: A feedback buffer (``buffer.jsonl``) of (prompt, measured routing) pairs: the
    #: routing source instead of ``traces``; needs ``model``.
    pairs: Path | None = None
    model: ModelShape | None = None
    nodes: int = 4
    clusters: int | None = None
    prefill_fraction: float = 0.5
    prompt_test_fraction: float = 0.2
    trace_test_fraction: float = 0.3
    max_prompts: int | None = None
    relabel_sources: bool = False
    random_state: int = 0

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"--nodes must be >= 1, got {self.nodes}")
        if self.clusters is not None and not 1 <= self.clusters <= self.nodes:
            raise ConfigError(f"--clusters must be in [1, --nodes={self.nodes}]")
        if not 0 < self.prefill_fraction < 1:
            raise ConfigError(f"--prefill-fraction must be in (0, 1), got {self.prefill_fraction}")
        for name in ("prompt_test_fraction", "trace_test_fraction"):
            if not 0.05 <= getattr(self, name) <= 0.5:
                raise ConfigError(f"{name} must be in [0.05, 0.5], got {getattr(self, name)}")
        if self.max_prompts is not None and self.max_prompts < 20:
            raise ConfigError(f"--max-prompts must be >= 20, got {self.max_prompts}")

    @property
    def traces_path(self) -> Path:
        return self.traces if self.traces is not None else self.data_dir / DEFAULT_TRACES


# --------------------------------------------------------------------------- domain


def domain_split(
    config: FitConfig, progress: Progress | None = None
) -> tuple[PromptSet, np.ndarray, np.ndarray]:
    """The prompts (subsampled to ``max_prompts`` if set, relabelled if
    ``relabel_sources``) and their (train, test) rows. The rows do not depend on the
    relabelling: the split is stratified by the published domains."""
    prompts = load_prompts(config.data_dir / "prompts", progress)
    if config.max_prompts is not None and config.max_prompts < len(prompts):
        rng = np.random.default_rng(config.random_state)
        prompts = prompts.subset(np.sort(rng.choice(len(prompts), config.max_prompts, False)))
    train, test = grouped_split(
        prompts.published_domains,
        text_groups(prompts.texts),
        config.prompt_test_fraction,
        config.random_state,
    )
    if config.relabel_sources:
        prompts = relabel_sources(prompts, SOURCE_RELABELS)
    return prompts, train, test


def validation_split(
    prompts: PromptSet, train: np.ndarray, config: FitConfig
) -> tuple[np.ndarray, np.ndarray]:
    """(fit rows, validation rows): the training rows of :func:`domain_split` split again
    the same way (seed ``random_state + 1``), for choosing settings without the test rows."""
    fit, val = grouped_split(
        prompts.published_domains[train],
        text_groups(prompts.texts[train]),
        config.prompt_test_fraction,
        config.random_state + 1,
    )
    return train[fit], train[val]


def fit_domain(
    config: FitConfig, progress: Progress | None = None
) -> tuple[TextClassifier, ClassMixDrift, dict[str, Any], list[Path]]:
    """Domain classifier and its drift reference; returns (model, drift, report, files)."""
    prompts, train, test = domain_split(config, progress)
    if progress:
        progress(f"domain: fitting on {len(train)} prompts ({len(test)} held out)")
    start = time.perf_counter()
    model = TextClassifier(random_state=config.random_state)
    model.fit(prompts.texts[train], prompts.domains[train])
    fit_s = time.perf_counter() - start
    predicted = model.predict(prompts.texts[test])
    report = domain_scores(prompts.subset(test), predicted, model.classes_)
    report.update(
        train=len(train),
        test=len(test),
        fit_seconds=fit_s,
        converged=model.converged_,
        split="grouped by prompt text, stratified by published domain",
        features=model.features_.get_params(),
        C=model.C,
    )
    drift = ClassMixDrift().fit(predicted, classes=model.classes_)
    return model, drift, report, list(prompts.files)


def domain_scores(prompts: PromptSet, predicted: np.ndarray, classes: np.ndarray) -> dict[str, Any]:
    """Scores of ``predicted`` [n] for ``prompts`` (n rows): against the labels used (the
    top-level keys), against the published labels (``published_labels``), on the rows
    of the sources whose labels agree with their text (``without_disagreeing_sources``:
    those not in :data:`SOURCE_RELABELS`; absent when there are none of those), and per
    source (``sources``)."""
    report = classification_scores(prompts.domains, predicted, classes)
    relabelled = sorted(set(prompts.sources[prompts.relabelled].tolist()))
    report["labels"] = (
        "published" if not relabelled else f"published, {len(relabelled)} sources relabelled"
    )
    report["relabelled_sources"] = {s: SOURCE_RELABELS.get(s) for s in relabelled}
    report["published_labels"] = _summary(prompts.published_domains, predicted, classes)
    keep = ~np.isin(prompts.sources, list(SOURCE_RELABELS))
    if not keep.all():
        report["without_disagreeing_sources"] = _summary(
            prompts.domains[keep], predicted[keep], classes
        )
    report["sources"] = source_confusion(prompts, predicted, classes)
    return report


def _summary(truth: np.ndarray, predicted: np.ndarray, classes: np.ndarray) -> dict[str, Any]:
    s = classification_scores(truth, predicted, classes)
    return {k: s[k] for k in ("n", "macro_f1", "accuracy", "per_class")}


def source_confusion(
    prompts: PromptSet, predicted: np.ndarray, classes: np.ndarray
) -> dict[str, Any]:
    """Per source dataset: its rows ``n``, its ``label`` (and ``published_label`` when
    relabelled), ``accuracy`` against the label, and ``predicted``: class -> count."""
    out: dict[str, Any] = {}
    for source in sorted(set(prompts.sources.tolist())):
        rows = prompts.sources == source
        labels = sorted(set(prompts.domains[rows].tolist()))
        published = sorted(set(prompts.published_domains[rows].tolist()))
        entry: dict[str, Any] = {
            "n": int(rows.sum()),
            "label": "/".join(labels),
            "accuracy": float(np.mean(prompts.domains[rows] == predicted[rows])),
            "predicted": {str(c): int(np.sum(predicted[rows] == c)) for c in classes},
        }
        if published != labels:
            entry["published_label"] = "/".join(published)
        out[str(source)] = entry
    return out


# --------------------------------------------------------------------------- routing


def phase_pairs(routing: RoutingSet, num_experts: int, fraction: float) -> dict[str, Any]:
    """Prefill / decode count pairs of the requests that have them (module docstring)."""
    both = routing.present.get("prefill", np.zeros(len(routing), bool)) & routing.present.get(
        "decode", np.zeros(len(routing), bool)
    )
    if both.sum() >= MIN_SPLIT_REQUESTS:
        rows = np.flatnonzero(both)
        return {
            "mode": "measured",
            "rows": rows,
            "prefill": routing.phase_counts["prefill"][rows],
            "decode": routing.phase_counts["decode"][rows],
        }
    single = [next(iter(t.values())) for t in routing.token_ids if len(t) == 1]
    if len(single) == len(routing) and all(len(t) >= 2 for t in single):
        early, late = split_tokens(single, num_experts, fraction)
        return {
            "mode": f"early-late proxy (first {fraction:.0%} of each sequence's tokens "
            "= prefill, the rest = decode)",
            "rows": np.arange(len(routing)),
            "prefill": early,
            "decode": late,
        }
    rows = np.arange(len(routing))
    return {
        "mode": None,
        "why": f"{int(both.sum())} requests have both phases (need {MIN_SPLIT_REQUESTS}) and "
        "the traces are not single-phase token-level routing to split",
        "rows": rows,
        "prefill": routing.counts,
        "decode": routing.counts,
    }


def request_split(labels: list[str | None], config: FitConfig) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    n = len(labels)
    idx = np.arange(n)
    if n < MIN_SPLIT_REQUESTS:
        return idx, idx[:0]
    strata = None
    if all(label is not None for label in labels):
        y = np.asarray(labels, dtype=str)
        if np.unique(y, return_counts=True)[1].min() >= 2:
            strata = y
    train, test = train_test_split(
        idx,
        test_size=config.trace_test_fraction,
        stratify=strata,
        random_state=config.random_state,
    )
    return np.sort(train), np.sort(test)


def fit_clusters(
    pairs: dict[str, Any],
    labels: np.ndarray | None,
    train: np.ndarray,
    test: np.ndarray,
    config: FitConfig,
    progress: Progress | None = None,
) -> tuple[ActivationClusters, dict[str, Any]]:
    pre, dec = pairs["prefill"], pairs["decode"]
    experts = dec.shape[2]
    per_node = per_node_capacity(experts, config.nodes)
    report: dict[str, Any] = {"nodes": config.nodes, "per_node": per_node}
    strata = None if labels is None else labels[train]
    if len(train) >= MIN_SPLIT_REQUESTS:
        model, candidates = select_clusters(
            dec[train],
            nodes=config.nodes,
            assign_counts=pre[train],
            eval_counts=dec[train],
            labels=strata,
            ks=None if config.clusters is None else [config.clusters],
            random_state=config.random_state,
            progress=progress,
        )
        report["candidates"] = [c.to_json() for c in candidates]
        report["layer_set"] = candidates[0].layers
        report["selection"] = "3-fold cross-validated hot-set locality on the training requests"
    else:
        k = min(config.clusters or config.nodes, len(train))
        model = make_clusters("share", "all", k, dec.shape[1], per_node, config.random_state)
        model.fit(dec[train])
        report["selection"] = f"too few requests to select; paper B features with K={k}"
        report["layer_set"] = "all"
    report["selected"] = model.get_params()
    if len(test):
        paper_b = make_clusters(
            "share",
            "all",
            min(config.nodes, len(train)),
            dec.shape[1],
            per_node,
            config.random_state,
        ).fit(dec[train])
        one = make_clusters("share", "all", 1, dec.shape[1], per_node, config.random_state)
        one.fit(dec[train])
        held: dict[str, Any] = {}
        for name, m in (("paper_b", paper_b), ("selected", model), ("one_cluster", one)):
            hot, part = score_clusters(m, per_node, pre[test], dec[test])
            hot_oracle, part_oracle = score_clusters(m, per_node, dec[test], dec[test])
            held[name] = {
                "k": m.n_clusters,
                "features": m.features,
                "layers": "all" if m.layers is None else f"{len(m.layers)} layers",
                "hot_set": hot,
                "partition": part,
                "hot_set_oracle_assignment": hot_oracle,
                "partition_oracle_assignment": part_oracle,
            }
        held["own_top_experts_bound"] = oracle_locality(dec[test], per_node)
        held["uniform"] = per_node / experts
        if labels is not None:
            from sklearn.metrics import adjusted_rand_score

            held["paper_b_ari_vs_labels"] = float(
                adjusted_rand_score(labels[test], paper_b.predict(dec[test]))
            )
        report["held_out"] = held
    return model, report


def fit_prefill_decode(
    pairs: dict[str, Any], train: np.ndarray, test: np.ndarray, model: ModelShape, nodes: int
) -> tuple[PrefillDecodePredictor | None, dict[str, Any]]:
    if pairs["mode"] is None:
        return None, {"skipped": pairs["why"]}
    pre, dec = pairs["prefill"], pairs["decode"]
    if len(train) < 3:
        return None, {"skipped": f"only {len(train)} requests with both phases"}
    report: dict[str, Any] = {"mode": pairs["mode"], "train": len(train), "test": len(test)}
    k = model.top_k
    fitted = {m: PrefillDecodePredictor(m, top_k=k).fit(pre[train], dec[train]) for m in METHODS}
    fitted["ridge_unblended"] = PrefillDecodePredictor("ridge", blend=False, top_k=k).fit(
        pre[train], dec[train]
    )
    report["blend_n0"] = fitted["ridge"].blend_n0_
    if len(test):
        m = per_node_capacity(model.num_experts, nodes)
        predicted = {name: p.predict(pre[test]) for name, p in fitted.items()}
        report["held_out"] = {
            name: evaluate_prediction(p, dec[test], k=k, m=m) for name, p in predicted.items()
        }
        report["held_out_by_prefill_length"] = {
            name: quality_by_length(p, dec[test], pre[test], k=k, m=m, top_k=k)
            for name, p in predicted.items()
        }
        report["alpha_per_layer"] = fitted["ridge"].alpha_.tolist()
    return fitted["ridge"], report


def fit_text_cluster(
    routing: RoutingSet,
    pairs: dict[str, Any],
    clusters: ActivationClusters,
    features_from: TextClassifier,
    train: np.ndarray,
    test: np.ndarray,
    *,
    nodes: int = 4,
    top_k: int = 1,
    curve_seeds: int = 3,
) -> tuple[TextClusterClassifier | None, dict[str, Any]]:
    """Text -> cluster and text -> histogram on the pairs that carry prompt text, scored
    on the held-out ones against the one-cluster and class-map baselines, with a learning
    curve and the choice of the text predictor (:mod:`scheduler.prediction.text_routing`).
    Too few pairs or one cluster: ``{"skipped": why}`` and the class map serves."""
    from scheduler.prediction import text_routing as tr_

    rows = pairs["rows"]
    prompts = [routing.prompts[r] for r in rows]
    have = np.array([p is not None and bool(p.strip()) for p in prompts], dtype=bool)
    tr, te = train[have[train]], test[have[test]]
    texts = np.array([p or "" for p in prompts], dtype=object)
    counts = pairs["decode"]
    n_clusters = len(np.unique(clusters.predict(counts[tr]))) if len(tr) else 0
    if len(tr) < tr_.MIN_TRAIN_PAIRS or n_clusters < 2:
        why = (
            f"{int(have.sum())} of {len(rows)} requests carry prompt text ({len(tr)} training "
            f"pairs in {n_clusters} cluster(s)); need at least {tr_.MIN_TRAIN_PAIRS} training "
            "pairs of at least two clusters"
        )
        return None, {"skipped": why, "text_predictor": {"use": "class_map", "why": why}}
    report: dict[str, Any] = {"train_pairs": len(tr), "test_pairs": len(te)}
    if not len(te):
        text = TextClassifier(features=features_from.features_)
        model = TextClusterClassifier(clusters, text=text).fit(texts[tr], counts[tr])
        held: dict[str, Any] = {"skipped": "no held-out pairs"}
    else:
        learned, held, runs = tr_.score_with_curve(
            clusters,
            features_from,
            texts[tr],
            counts[tr],
            texts[te],
            counts[te],
            nodes=nodes,
            top_k=top_k,
            seeds=curve_seeds,
        )
        assert learned is not None
        model = learned
        report["held_out_accuracy"] = held["text_cluster"]["accuracy"]
        report["learning_curve"] = tr_.summarise_curve(runs)
        report["learning_curve_seeds"] = curve_seeds
    report["held_out"] = held
    report["baselines"] = {
        "one_cluster": "every request gets the training mean shares; placement = one hot set",
        "class_map": "domain classifier -> the cluster most training pairs of that predicted "
        "domain belong to; histogram = their mean shares",
    }
    report["text_predictor"] = tr_.choose_text_predictor(held)
    return model, report


# --------------------------------------------------------------------------- all


def fit_predictors(
    config: FitConfig, progress: Progress | None = None
) -> tuple[PredictorBundle, dict[str, Any], RoutingSet | None]:
    """Fit everything; returns (bundle, report, the routing read, for profiles)."""
    from scheduler.prediction.datasets import file_fingerprint, load_routing
    from scheduler.traces.importers import open_traces

    domain, domain_drift, domain_report, prompt_files = fit_domain(config, progress)
    report: dict[str, Any] = {"domain": domain_report}
    bundle = PredictorBundle(domain=domain, domain_drift=domain_drift)
    trace_files: list[Path] = []
    routing = None
    path = config.traces_path if config.pairs is None else config.pairs
    if config.pairs is not None:
        if config.traces is not None:
            raise ConfigError("give --traces or --pairs, not both")
        if config.model is None:
            raise ConfigError("--pairs needs --model (the shape the buffer's routing is for)")
        routing = pairs_routing(config.pairs, config.model)
        trace_files = [config.pairs]
        report["routing"] = _fit_routing(bundle, routing, config.model, config, progress)
        report["routing"]["source"] = f"{config.pairs} (feedback buffer pairs)"
    elif not path.exists():
        if config.traces is not None:
            raise InputError(path, "does not exist")
        report["routing"] = {"skipped": f"no traces at {path}"}
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="moe-scheduler-") as tmp:
            traces = open_traces(path, Path(tmp), fmt=config.trace_format, model=config.model)
            if traces.granularity != "request":
                raise InputError(
                    path,
                    f"{traces.granularity} statistics (one record per workload), not "
                    "per-request routing: the predictors need per-request traces",
                )
            routing = load_routing(traces)
            model = traces.model
        trace_files = sorted(
            p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()
        )
        report["routing"] = _fit_routing(bundle, routing, model, config, progress)
        report["routing"]["source"] = str(path)
    fingerprint = {
        "prompts": file_fingerprint(prompt_files, config.data_dir),
        "traces": file_fingerprint(trace_files, path.parent) if trace_files else None,
    }
    bundle.metadata = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {
            "nodes": config.nodes,
            "clusters": config.clusters,
            "prefill_fraction": config.prefill_fraction,
            "max_prompts": config.max_prompts,
            "relabel_sources": config.relabel_sources,
            "random_state": config.random_state,
        },
        "training_data": fingerprint,
        "scores": report,
        "text_predictor": report.get("routing", {})
        .get("text_cluster", {})
        .get("text_predictor", {"use": "class_map", "why": "no routing pairs with prompts"}),
    }
    return bundle, report, routing


def pairs_routing(path: Path, model: ModelShape) -> RoutingSet:
    """A feedback buffer's (prompt, measured routing) rows as a :class:`RoutingSet` of
    one phase (decode; rows measured on the prompt only count as their decode too)."""
    from scheduler.prediction.pair_buffer import read_pairs

    prompts, _, counts = read_pairs(path, model)
    n = len(prompts)
    tokens = np.rint(counts.sum(axis=2).mean(axis=1) / model.top_k).astype(np.int64)
    return RoutingSet(
        ids=[f"buffer-{i}" for i in range(n)],
        labels=[None] * n,
        prompts=list(prompts),
        counts=counts,
        phase_counts={"decode": counts},
        present={"decode": np.ones(n, dtype=bool)},
        tokens={"decode": tokens},
        token_ids=[{} for _ in range(n)],
    )


def _fit_routing(
    bundle: PredictorBundle,
    routing: RoutingSet,
    model: ModelShape,
    config: FitConfig,
    progress: Progress | None,
) -> dict[str, Any]:
    if model.num_experts % config.nodes:
        raise ConfigError(
            f"--nodes {config.nodes} must divide the {model.num_experts} experts of {model.name}"
        )
    pairs = phase_pairs(routing, model.num_experts, config.prefill_fraction)
    labels_all = [routing.labels[r] for r in pairs["rows"]]
    train, test = request_split(labels_all, config)
    labels = np.asarray(labels_all, dtype=str) if all(v is not None for v in labels_all) else None
    out: dict[str, Any] = {
        "model": model.name,
        "requests": len(routing),
        "pairs": pairs["mode"],
        "train": len(train),
        "test": len(test),
    }
    if progress:
        progress(f"clusters: {len(train)} training requests, {len(test)} held out")
    clusters, out["clusters"] = fit_clusters(pairs, labels, train, test, config, progress)
    predictor, out["prefill_decode"] = fit_prefill_decode(pairs, train, test, model, config.nodes)
    text_cluster, out["text_cluster"] = fit_text_cluster(
        routing, pairs, clusters, bundle.domain, train, test, nodes=config.nodes, top_k=model.top_k
    )
    bundle.model = model
    bundle.clusters = clusters
    bundle.prefill_decode = predictor
    bundle.text_cluster = text_cluster
    return out

"""Statistics over expert counts. Pure: arrays in, arrays out.

Shapes: ``counts [layers, experts]``; ``vectors [requests, layers, experts]``.
"""

from __future__ import annotations

import warnings

import numpy as np


def finite_mean(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Mean of the finite values (along ``axis``); nan where there are none.

    ``np.nanmean`` without its "Mean of empty slice" warning; also skips infinities.
    """
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(values)
    n = ok.sum(axis=axis)
    total = np.where(ok, values, 0.0).sum(axis=axis)
    return np.divide(total, n, out=np.full(np.shape(n), np.nan), where=n > 0)


def load_imbalance(counts: np.ndarray) -> np.ndarray:
    """Per-layer max / mean expert load. counts [layers, experts] -> [layers] (nan if empty)."""
    mean = counts.mean(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, counts.max(axis=1) / np.where(mean > 0, mean, 1), np.nan)


def hottest_experts(counts: np.ndarray, n: int = 5) -> list[tuple[int, int, float]]:
    """The ``n`` heaviest (layer index, expert, load / layer mean) cells over all layers.

    Only cells with load: fewer than ``n`` when fewer carry any, none for empty counts.
    """
    mean = counts.mean(axis=1, keepdims=True)
    rel = np.divide(counts, mean, out=np.zeros_like(counts, dtype=np.float64), where=mean > 0)
    flat = np.argsort(rel, axis=None, kind="stable")[::-1]
    flat = flat[rel.ravel()[flat] > 0][:n]  # an unused expert (or an empty layer) is not hot
    layers, experts = np.unravel_index(flat, rel.shape)
    return [
        (int(layer), int(e), float(rel[layer, e])) for layer, e in zip(layers, experts, strict=True)
    ]


def _normalise_rows(counts: np.ndarray) -> np.ndarray:
    sums = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, sums, out=np.zeros_like(counts, dtype=np.float64), where=sums > 0)


def js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence in bits between count rows (normalised here).

    p, q: [..., experts] -> [...]; 0 for identical distributions, at most 1; nan where
    either row is empty (no distribution to compare).
    """
    empty = (np.sum(p, axis=-1) <= 0) | (np.sum(q, axis=-1) <= 0)
    p, q = _normalise_rows(p), _normalise_rows(q)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> np.ndarray:
        ratio = np.divide(a, m, out=np.ones_like(a), where=a > 0)
        return (a * np.log2(ratio)).sum(axis=-1)

    return np.where(empty, np.nan, np.clip((kl(p) + kl(q)) / 2, 0.0, 1.0))


def pairwise_js(class_counts: dict[str, np.ndarray]) -> dict[tuple[str, str], np.ndarray]:
    """JS divergence per layer for every pair of classes: (a, b) -> [layers]."""
    names = sorted(class_counts)
    return {
        (a, b): js_divergence(class_counts[a], class_counts[b])
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }


def pearson_per_layer(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of per-expert counts, layer by layer. [layers, E] x2 -> [layers].

    nan where either layer is constant.
    """
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (a * b).sum(axis=1) / np.where(denom > 0, denom, 1), np.nan)


def class_accuracy_per_layer(
    vectors: np.ndarray,
    labels: np.ndarray,
    *,
    test_size: float = 0.2,
    n_splits: int = 5,
    random_state: int = 0,
) -> np.ndarray:
    """Held-out accuracy of predicting a request's class from one layer's activations.

    As paper B: per layer, multinomial logistic regression on the request's normalised
    expert counts, stratified ``1 - test_size : test_size`` split by request, averaged
    over ``n_splits`` random splits. vectors [requests, layers, experts] -> [layers].
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedShuffleSplit

    x = _normalise_rows(vectors.astype(np.float64))
    splitter = StratifiedShuffleSplit(
        n_splits=n_splits, test_size=test_size, random_state=random_state
    )
    scores = np.zeros((n_splits, x.shape[1]))
    for s, (train, test) in enumerate(splitter.split(x[:, 0], labels)):
        for layer in range(x.shape[1]):
            model = LogisticRegression(max_iter=2000, C=10.0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(x[train, layer], labels[train])
            scores[s, layer] = model.score(x[test, layer], labels[test])
    return scores.mean(axis=0)


def coactivation(token_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Co-activation counts per layer: tokens routed to both experts i and j.

    token_ids [tokens, layers, top_k] (-1 = not recorded) -> [layers, E, E]; the
    diagonal holds each expert's token count.
    """
    tokens, layers, _ = token_ids.shape
    out = np.zeros((layers, num_experts, num_experts), dtype=np.int64)
    for layer in range(layers):
        onehot = np.zeros((tokens, num_experts), dtype=np.float32)
        ids = token_ids[:, layer, :]
        rows = np.repeat(np.arange(tokens), ids.shape[1])
        valid = ids.ravel() >= 0
        onehot[rows[valid], ids.ravel()[valid]] = 1.0
        out[layer] = np.rint(onehot.T @ onehot).astype(np.int64)
    return out


def coactivation_lift(co: np.ndarray, tokens: int, min_expected: float = 5.0) -> np.ndarray:
    """Observed / expected-if-independent co-activation, per layer and expert pair.

    co [layers, E, E] from :func:`coactivation` over ``tokens`` tokens. Pairs expected
    fewer than ``min_expected`` times, and the diagonal, are nan.
    """
    p = np.diagonal(co, axis1=1, axis2=2) / max(tokens, 1)
    expected = tokens * p[:, :, None] * p[:, None, :]
    lift = np.divide(co, expected, out=np.full(co.shape, np.nan), where=expected >= min_expected)
    idx = np.arange(co.shape[1])
    lift[:, idx, idx] = np.nan
    return lift


def top_pair_share(co: np.ndarray, fraction: float = 0.1) -> np.ndarray:
    """Share of all co-activations carried by the top ``fraction`` of expert pairs, per layer.

    co [layers, E, E] -> [layers]. Uniform co-activation gives ``fraction``; nan for a
    layer without any co-activated pair (top-1 routing, or no token with two experts
    recorded).
    """
    e = co.shape[1]
    iu = np.triu_indices(e, k=1)
    pairs = np.sort(co[:, iu[0], iu[1]], axis=1)[:, ::-1]
    top = max(1, int(round(fraction * pairs.shape[1])))
    total = pairs.sum(axis=1)
    return np.divide(
        pairs[:, :top].sum(axis=1), total, out=np.full(len(total), np.nan), where=total > 0
    )

"""Predicting a request's decode experts from its prefill routing.

Methods (``method``):

* ``"prefill"`` -- the baseline: the request's own prefill histogram, per layer.
* ``"prior"`` -- the mean decode distribution of the training requests (ignores the
  request; shows what the prefill adds).
* ``"ridge"`` -- per MoE layer, a ridge regression from the request's prefill expert
  shares of that layer to its decode expert shares (``[E] -> [E]``; the penalty chosen
  per layer by scikit-learn's efficient leave-one-out ``RidgeCV``). Predictions are
  clipped at zero and renormalised.

A short prefill says little about the decode: a prompt of a few tokens (often all that
is left after a prefix-cache hit) routes a handful of (token, expert) pairs per layer.
``ridge`` therefore blends, per request, its prediction with a prior by the prefill's
length ``n`` (tokens): ``w = n / (n + n0)`` on the ridge prediction, ``1 - w`` on the
prior (the training decode mean, or a class's shares the caller passes). ``n0`` is
chosen from :data:`BLEND_N0` on a validation part of the training requests (mean
per-layer Pearson), then the model is refitted on all of them; ``n0 = 0`` is no blend.
:func:`quality_by_length` reports a method's scores per prefill-length bucket.

Arrays: ``prefill`` / ``decode`` [n, layers, experts] counts; predictions are
[n, layers, experts] per-layer shares. Metrics (paper B's per-layer Pearson, top-k
recall, activation mass captured) are :func:`evaluate_prediction`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from scheduler.analysis.stats import pearson_per_layer
from scheduler.prediction.locality import top_mask

METHODS = ("prefill", "prior", "ridge")
#: Candidate blend half-weights (prefill tokens at which ridge and the prior weigh the
#: same); 0: ridge alone.
BLEND_N0 = (0.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
#: Share of the training requests held out to choose ``n0`` (at least 3 requests each).
BLEND_VALIDATION = 0.2
#: Upper edges (prefill tokens, inclusive) of the length buckets of the report.
LENGTH_BUCKETS = (8, 32, 128, 512)


def layer_shares(counts: np.ndarray) -> np.ndarray:
    """Counts [..., E] -> per-row shares (rows summing to 0 stay 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    sums = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, sums, out=np.zeros_like(counts), where=sums > 0)


class PrefillDecodePredictor:
    """Decode expert shares from prefill counts (see the module docstring).

    Learned: ``prior_`` [L, E] mean training decode shares; for ``ridge`` also
    ``coef_`` [L, E, E] (output expert x input expert), ``intercept_`` [L, E],
    ``alpha_`` [L] and ``blend_n0_`` (0 when fitted with ``blend=False`` or too few
    requests to choose it).
    """

    def __init__(
        self,
        method: str = "ridge",
        *,
        alphas: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0),
        blend: bool = True,
        top_k: int = 1,
    ) -> None:
        self.method = method
        self.alphas = alphas
        self.blend = blend
        self.top_k = top_k
        self.blend_n0_ = 0.0

    def get_params(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "alphas": list(self.alphas),
            "blend": self.blend,
            "top_k": self.top_k,
        }

    def fit(self, prefill: np.ndarray, decode: np.ndarray) -> PrefillDecodePredictor:
        """Fit on ``prefill`` / ``decode`` counts [n, L, E]; a blending ridge first picks
        ``n0`` on a validation part (``top_k`` turns counts into tokens)."""
        prefill, decode = np.asarray(prefill), np.asarray(decode)
        self.blend_n0_ = 0.0
        n_val = int(len(prefill) * BLEND_VALIDATION)
        if self.method == "ridge" and self.blend and n_val >= 3 and len(prefill) - n_val >= 3:
            order = np.random.default_rng(0).permutation(len(prefill))
            val, fit = order[:n_val], order[n_val:]
            self._fit(prefill[fit], decode[fit])
            scores = {}
            for n0 in BLEND_N0:
                self.blend_n0_ = n0
                pred = self.predict(prefill[val])
                per_layer = _nanmean(
                    np.stack(
                        [pearson_per_layer(p, a) for p, a in zip(pred, decode[val], strict=True)]
                    ),
                    axis=0,
                )
                scores[n0] = float(np.nanmean(per_layer)) if np.isfinite(per_layer).any() else -1.0
            self.blend_n0_ = max(scores, key=lambda n0: (scores[n0], -n0))
        return self._fit(prefill, decode)

    def _fit(self, prefill: np.ndarray, decode: np.ndarray) -> PrefillDecodePredictor:
        from sklearn.linear_model import RidgeCV

        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        prefill, decode = np.asarray(prefill), np.asarray(decode)
        if prefill.ndim != 3 or prefill.shape != decode.shape:
            raise ValueError(
                f"prefill and decode must both be [n, layers, experts], got "
                f"{prefill.shape} and {decode.shape}"
            )
        x, y = layer_shares(prefill), layer_shares(decode)
        self.prior_ = y.mean(axis=0)
        if self.method != "ridge":
            return self
        if len(x) < 3:
            raise ValueError(f"ridge needs at least 3 training requests, got {len(x)}")
        _, layers, experts = x.shape
        self.coef_ = np.zeros((layers, experts, experts))
        self.intercept_ = np.zeros((layers, experts))
        self.alpha_ = np.zeros(layers)
        for layer in range(layers):
            model = RidgeCV(alphas=self.alphas).fit(x[:, layer], y[:, layer])
            self.coef_[layer] = model.coef_
            self.intercept_[layer] = model.intercept_
            self.alpha_[layer] = model.alpha_
        return self

    def predict(self, prefill: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
        """Predicted decode shares [n, L, E] from prefill counts [n, L, E]; ``prior``:
        per-request [n, L, E] (or shared [L, E]) shares a blending ridge leans on for
        short prefills (default: the training decode mean)."""
        x = layer_shares(prefill)
        if x.shape[1:] != self.prior_.shape:
            raise ValueError(
                f"prefill has shape {x.shape}, model expects [n, *{self.prior_.shape}]"
            )
        if self.method == "prefill":
            return x
        if self.method == "prior":
            return np.broadcast_to(self.prior_, x.shape).copy()
        pred = np.einsum("nle,lfe->nlf", x, self.coef_) + self.intercept_
        pred = layer_shares(np.clip(pred, 0.0, None))
        base = np.broadcast_to(self.prior_ if prior is None else layer_shares(prior), x.shape)
        empty = pred.sum(axis=-1) == 0
        pred[empty] = base[empty]
        if self.blend_n0_ > 0:
            w = self.weight(prefill)[:, None, None]
            pred = w * pred + (1 - w) * base
        return pred

    def weight(self, prefill: np.ndarray) -> np.ndarray:
        """[n] the ridge's share of the blend for prefill counts [n, L, E]."""
        tokens = prefill_tokens(prefill, self.top_k)
        if self.blend_n0_ <= 0:
            return np.ones(len(tokens))
        return tokens / (tokens + self.blend_n0_)

    # ------------------------------------------------------------------ state

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        arrays = {"prior": self.prior_}
        if self.method == "ridge":
            arrays.update(coef=self.coef_, intercept=self.intercept_, alpha=self.alpha_)
        return {**self.get_params(), "blend_n0": self.blend_n0_}, arrays

    @classmethod
    def from_state(
        cls, params: dict[str, Any], arrays: dict[str, np.ndarray]
    ) -> PrefillDecodePredictor:
        self = cls(
            str(params["method"]),
            alphas=tuple(float(a) for a in params["alphas"]),
            blend=bool(params.get("blend", False)),  # bundles before blending had none
            top_k=int(params.get("top_k", 1)),
        )
        self.blend_n0_ = float(params.get("blend_n0", 0.0))
        if self.method not in METHODS:
            raise ValueError(f"unknown prefill-decode method {self.method!r}")
        self.prior_ = arrays["prior"].astype(np.float64)
        if self.prior_.ndim != 2:
            raise ValueError("prior must be [layers, experts]")
        if self.method == "ridge":
            layers, experts = self.prior_.shape
            self.coef_ = arrays["coef"].astype(np.float64)
            self.intercept_ = arrays["intercept"].astype(np.float64)
            self.alpha_ = arrays["alpha"].astype(np.float64)
            if self.coef_.shape != (layers, experts, experts) or self.intercept_.shape != (
                layers,
                experts,
            ):
                raise ValueError("ridge arrays do not match the prior's shape")
        return self


def evaluate_prediction(
    predicted: np.ndarray, actual: np.ndarray, *, k: int, m: int | None = None
) -> dict[str, Any]:
    """Scores of predicted decode shares against actual decode counts.

    predicted / actual: [n, L, E]. Per layer, averaged over requests:

    * ``pearson``: Pearson correlation of the per-expert vectors (paper B §3.3.3),
      layers where either side is constant skipped;
    * ``recall_at_k``: share of the actual top-``k`` experts (those with a count) that
      are among the predicted top-``k``;
    * ``mass_at_m`` (when ``m`` is given): share of the actual activations that fall on
      the predicted top-``m`` experts (e.g. ``m = E / N``, a node's worth).

    Returns per-layer lists and their means (``*_mean``).
    """
    if predicted.shape != actual.shape:
        raise ValueError(f"shapes differ: {predicted.shape} vs {actual.shape}")
    pearson = np.stack([pearson_per_layer(p, a) for p, a in zip(predicted, actual, strict=True)])
    true_top = top_mask(actual, k) & (actual > 0)
    hits = (top_mask(predicted, k) & true_top).sum(axis=-1)
    sizes = true_top.sum(axis=-1)
    with np.errstate(invalid="ignore"):
        recall = np.where(sizes > 0, hits / np.maximum(sizes, 1), np.nan)
    out: dict[str, Any] = {}
    metrics = {"pearson": pearson, "recall_at_k": recall}
    if m is not None:
        totals = actual.sum(axis=-1)
        captured = (actual * top_mask(predicted, m)).sum(axis=-1)
        metrics["mass_at_m"] = np.where(totals > 0, captured / np.maximum(totals, 1), np.nan)
    for name, values in metrics.items():
        per_layer = _nanmean(values, axis=0)
        out[name] = [None if np.isnan(v) else float(v) for v in per_layer]
        out[f"{name}_mean"] = float(np.nanmean(per_layer)) if np.isfinite(per_layer).any() else None
    out.update(k=k, m=m, requests=len(actual))
    return out


def prefill_tokens(prefill: np.ndarray, top_k: int) -> np.ndarray:
    """[n] prompt tokens behind prefill counts [n, L, E] (pairs per MoE layer / top_k)."""
    prefill = np.asarray(prefill, dtype=np.float64)
    return prefill.sum(axis=-1).max(axis=-1) / max(top_k, 1)


def quality_by_length(
    predicted: np.ndarray,
    actual: np.ndarray,
    prefill: np.ndarray,
    *,
    k: int,
    m: int | None = None,
    top_k: int = 1,
) -> list[dict[str, Any]]:
    """:func:`evaluate_prediction` per prefill-length bucket (:data:`LENGTH_BUCKETS`):
    ``[{"tokens": "<= 8", "requests": n, "pearson_mean", "recall_at_k_mean", ...}]``,
    empty buckets left out."""
    tokens = prefill_tokens(prefill, top_k)
    edges = (0, *LENGTH_BUCKETS, np.inf)
    out = []
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        rows = (tokens > low) & (tokens <= high) if low else tokens <= high
        if not rows.any():
            continue
        scores = evaluate_prediction(predicted[rows], actual[rows], k=k, m=m)
        if low == 0:
            label = f"<= {high:g}"
        else:
            label = f"> {low:g}" if high == np.inf else f"({low:g}, {high:g}]"
        out.append(
            {"tokens": label, "requests": int(rows.sum())}
            | {key: value for key, value in scores.items() if key.endswith("_mean")}
        )
    return out


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    valid = np.isfinite(values)
    total = np.where(valid, values, 0.0).sum(axis=axis)
    count = valid.sum(axis=axis)
    return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)

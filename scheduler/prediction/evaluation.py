"""Held-out scores of the predictors: classification quality and single-request latency.

Pure except for the clock read by :func:`single_request_latency`.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def classification_scores(
    y_true: Sequence[Any] | np.ndarray,
    y_pred: Sequence[Any] | np.ndarray,
    classes: Sequence[Any] | np.ndarray,
) -> dict[str, Any]:
    """Macro-F1, accuracy, per-class precision / recall / F1 / support and the
    confusion matrix (rows: true class, columns: predicted class, in ``classes`` order)."""
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    labels = [str(c) for c in classes]
    t = np.asarray([str(v) for v in y_true])
    p = np.asarray([str(v) for v in y_pred])
    precision, recall, f1, support = precision_recall_fscore_support(
        t, p, labels=labels, zero_division=0
    )
    return {
        "n": len(t),
        "macro_f1": float(f1_score(t, p, labels=labels, average="macro", zero_division=0)),
        "accuracy": float(np.mean(t == p)) if len(t) else float("nan"),
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(labels)
        },
        "confusion": {
            "labels": labels,
            "matrix": confusion_matrix(t, p, labels=labels).tolist(),
        },
    }


def single_request_latency(
    predict_one: Callable[[str], Any],
    texts: Sequence[str] | np.ndarray,
    *,
    warmup: int = 200,
    repeats: int = 1,
) -> dict[str, Any]:
    """Warm single-request latency of ``predict_one`` over ``texts``, in milliseconds.

    Every text is classified alone, ``repeats`` times (rounds over the whole list);
    ``warmup`` calls come first and are not timed; the garbage collector is paused
    while timing. Reports percentiles over all timed calls (``p50_ms`` ...), and, when
    ``repeats > 1``, percentiles of each text's median call (``median_of_repeats``),
    which is less sensitive to interference from other processes.
    """
    return interleaved_latency({"": predict_one}, texts, warmup=warmup, repeats=repeats)[""]


def interleaved_latency(
    predictors: dict[str, Callable[[str], Any]],
    texts: Sequence[str] | np.ndarray,
    *,
    warmup: int = 200,
    repeats: int = 1,
) -> dict[str, dict[str, Any]]:
    """:func:`single_request_latency` of several predictors at once (name -> its
    report): each text is classified by every predictor in turn, the order rotating
    from text to text, so that all of them run under the same load of the machine."""
    items = list(texts)
    if not items:
        raise ValueError("no texts to time")
    fns = list(predictors.values())
    for fn in fns:
        for i in range(min(warmup, len(items) * 4)):
            fn(items[i % len(items)])
    times = np.zeros((len(fns), repeats, len(items)))
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            for i, text in enumerate(items):
                for k in range(len(fns)):
                    j = (i + k) % len(fns)
                    start = time.perf_counter_ns()
                    fns[j](text)
                    times[j, r, i] = time.perf_counter_ns() - start
    finally:
        if enabled:
            gc.enable()
    ms = times / 1e6

    def pct(values: np.ndarray) -> dict[str, float]:
        p50, p90, p99 = np.percentile(values, [50, 90, 99])
        return {
            "p50_ms": float(p50),
            "p90_ms": float(p90),
            "p99_ms": float(p99),
            "max_ms": float(values.max()),
        }

    out: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(predictors):
        out[name] = {"requests": len(items), "repeats": repeats, **pct(ms[j].ravel())}
        if repeats > 1:
            out[name]["median_of_repeats"] = pct(np.median(ms[j], axis=0))
    return out

"""Class-mix drift: has the mix of request classes moved away from the reference?

A placement is solved for a class mix (each class's weight in the workload profile).
When the mix of arriving (or finished) requests changes, the placement's assumptions no
longer hold and re-placement is due. :class:`ClassMixDrift` keeps the last ``window``
class labels and compares their counts with the reference proportions:

* a chi-square goodness-of-fit test (``scipy.stats.chisquare``), and
* the population stability index ``PSI = sum((q - p) * ln(q / p))`` (proportions
  smoothed by ``smoothing`` pseudo-counts per class so empty classes stay finite).

Drift is flagged when **both** the p-value is below ``p_threshold`` (default 1e-3: the
window is unlikely to come from the reference mix) **and** PSI reaches
``psi_threshold`` (default 0.1, the usual boundary between "no" and "moderate" shift):
the test alone flags tiny shifts once windows are large, the PSI alone is noisy on
small windows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DriftResult:
    """The test of one window: counts [C] in ``classes`` order, and the verdict."""

    n: int
    counts: list[int]
    chi2: float
    p_value: float
    psi: float
    drifted: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ClassMixDrift:
    """Rolling-window class-mix drift detector (see the module docstring).

    Learned: ``classes_`` [C] str and ``reference_`` [C] proportions (smoothed).
    """

    def __init__(
        self,
        *,
        window: int = 500,
        p_threshold: float = 1e-3,
        psi_threshold: float = 0.1,
        smoothing: float = 0.5,
    ) -> None:
        self.window = window
        self.p_threshold = p_threshold
        self.psi_threshold = psi_threshold
        self.smoothing = smoothing

    def get_params(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "p_threshold": self.p_threshold,
            "psi_threshold": self.psi_threshold,
            "smoothing": self.smoothing,
        }

    def fit(
        self, labels: Sequence[Any] | np.ndarray, classes: Sequence[Any] | np.ndarray | None = None
    ) -> ClassMixDrift:
        """Reference proportions from ``labels`` (over ``classes``, default: those seen)."""
        if self.window < 1 or self.smoothing <= 0:
            raise ValueError("window must be >= 1 and smoothing > 0")
        y = np.asarray([str(v) for v in labels])
        names = np.unique(y) if classes is None else np.asarray([str(c) for c in classes])
        if len(names) < 2:
            raise ValueError("class-mix drift needs at least two classes")
        unknown = set(y.tolist()) - set(names.tolist())
        if unknown:
            raise ValueError(f"labels {sorted(unknown)} are not among the classes")
        self.classes_ = names
        self.reference_ = self._proportions(self._counts(y))
        self._recent: deque[str] = deque(maxlen=self.window)
        return self

    def _counts(self, y: Iterable[str]) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes_.tolist())}
        counts = np.zeros(len(index), dtype=np.int64)
        for label in y:
            if label not in index:
                raise ValueError(f"label {label!r} is not among the classes {self.classes_}")
            counts[index[label]] += 1
        return counts

    def _proportions(self, counts: np.ndarray) -> np.ndarray:
        smoothed = counts + self.smoothing
        return smoothed / smoothed.sum()

    def test(self, labels: Sequence[Any] | np.ndarray) -> DriftResult:
        """Test one window of labels against the reference (stateless)."""
        from scipy.stats import chisquare

        counts = self._counts(str(v) for v in labels)
        n = int(counts.sum())
        if n == 0:
            return DriftResult(0, counts.tolist(), 0.0, 1.0, 0.0, False)
        expected = self.reference_ * n
        chi2, p_value = chisquare(counts, expected)
        q = self._proportions(counts)
        psi = float(np.sum((q - self.reference_) * np.log(q / self.reference_)))
        drifted = bool(p_value < self.p_threshold and psi >= self.psi_threshold)
        return DriftResult(n, counts.tolist(), float(chi2), float(p_value), psi, drifted)

    def update(self, labels: Iterable[Any]) -> DriftResult:
        """Add labels to the rolling window (the last ``window`` are kept) and test it."""
        for label in labels:
            self._recent.append(str(label))
        return self.test(list(self._recent))

    # ------------------------------------------------------------------ state

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        params = {**self.get_params(), "classes": self.classes_.tolist()}
        return params, {"reference": self.reference_}

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> ClassMixDrift:
        self = cls(
            window=int(params["window"]),
            p_threshold=float(params["p_threshold"]),
            psi_threshold=float(params["psi_threshold"]),
            smoothing=float(params["smoothing"]),
        )
        self.classes_ = np.asarray([str(c) for c in params["classes"]])
        self.reference_ = arrays["reference"].astype(np.float64)
        if self.reference_.shape != (len(self.classes_),) or not np.isclose(
            self.reference_.sum(), 1.0
        ):
            raise ValueError("drift reference must be proportions over the classes")
        self._recent = deque(maxlen=self.window)
        return self

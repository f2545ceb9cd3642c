"""Workload profiles: per-class expert counts, built from traces, saved and validated.

The JSON contract is docs/profile-format.md's::

    {"model": {...}, "classes": {"<name>": {"weight": w, "decode": [[...]], "prefill": ...}}}

``decode`` / ``prefill`` (and ``mixed``, for traces that do not record the phase) are
[moe_layers, experts] token counts. ``weight`` is the class's share of routed tokens.
Pure except for :func:`save_profile` / :func:`load_profile`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.errors import ConfigError, InputError
from scheduler.jsonio import read_json, write_json_atomic
from scheduler.model_shape import ModelShape
from scheduler.progress import Progress
from scheduler.traces.store import PHASES, TraceBatch, TraceSet

#: Order in which a consumer (the placement solve) picks the phase to use.
PLACEMENT_PHASE_ORDER = ("decode", "prefill", "mixed")
FORMAT = "moe-scheduler-profile"


@dataclass(frozen=True)
class ClassProfile:
    """One request class. counts: phase -> [moe_layers, experts] float64 token counts."""

    weight: float
    counts: dict[str, np.ndarray]
    requests: int = 0
    tokens: dict[str, int] = field(default_factory=dict)
    label_mix: dict[str, int] = field(default_factory=dict)

    def placement_counts(self) -> np.ndarray:
        """[moe_layers, experts]: decode counts if present, else prefill, else mixed."""
        for phase in PLACEMENT_PHASE_ORDER:
            if phase in self.counts:
                return self.counts[phase]
        raise AssertionError("a validated class always has a phase")


@dataclass(frozen=True)
class WorkloadProfile:
    model: ModelShape
    classes: dict[str, ClassProfile]
    source: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        classes = {}
        for name, c in self.classes.items():
            entry: dict[str, Any] = {"weight": c.weight, "requests": c.requests}
            if c.tokens:
                entry["tokens"] = c.tokens
            for phase in ("decode", "prefill", "mixed"):
                if phase in c.counts:
                    entry[phase] = [[_num(v) for v in row] for row in c.counts[phase].tolist()]
            if c.label_mix:
                entry["label_mix"] = c.label_mix
            classes[name] = entry
        return {
            "format": FORMAT,
            "version": 1,
            "model": self.model.to_dict(),
            "source": self.source,
            "classes": classes,
        }


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


# --------------------------------------------------------------------------- building


def request_activation_vectors(batch: TraceBatch) -> np.ndarray:
    """Per-request activation vectors, paper B style.

    For each request, the counts of its decode phase (else prefill, else mixed) are
    normalised per layer to a distribution, flattened over layers, and L2-normalised.
    Returns [n, moe_layers * experts] float32.
    """
    n = len(batch)
    first = next(iter(batch.counts.values()))
    vectors = np.zeros(first.shape, dtype=np.float32)
    chosen = np.zeros(n, dtype=bool)
    for phase in PLACEMENT_PHASE_ORDER:
        if phase not in batch.counts:
            continue
        take = batch.present[phase] & ~chosen
        vectors[take] = batch.counts[phase][take]
        chosen |= take
    sums = vectors.sum(axis=2, keepdims=True)
    np.divide(vectors, sums, out=vectors, where=sums > 0)
    flat = vectors.reshape(n, -1)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    np.divide(flat, norms, out=flat, where=norms > 0)
    return flat


#: k-means is fitted on at most this many bytes of activation vectors (a uniform sample
#: of requests when the set is larger); every request is then assigned to its nearest
#: centre. 256 MiB holds ~4,500 DeepSeek-V3 requests (58 x 256 floats each).
MAX_CLUSTER_SAMPLE_BYTES = 256 << 20


def fit_request_clusters(
    traces: TraceSet, k: int, *, random_state: int = 0, progress: Progress | None = None
) -> Any:
    """Fit k-means (paper B) on request activation vectors; returns the fitted KMeans.

    Fitted on all requests, or on a uniform sample of them when their vectors exceed
    ``MAX_CLUSTER_SAMPLE_BYTES``, so memory is bounded whatever the number of requests.
    """
    from sklearn.cluster import KMeans

    n = traces.num_requests
    if k < 1:
        raise ConfigError(f"--k must be >= 1, got {k}")
    if k > n:
        raise ConfigError(f"--k {k} exceeds the number of requests ({n})")
    dim = traces.model.num_moe_layers * traces.model.num_experts
    size = min(n, max(k, MAX_CLUSTER_SAMPLE_BYTES // (dim * 4)))
    chosen = np.sort(np.random.default_rng(random_state).choice(n, size=size, replace=False))
    sample = np.empty((size, dim), dtype=np.float32)
    start = filled = 0
    for batch in traces.batches():
        rows = chosen[(chosen >= start) & (chosen < start + len(batch))] - start
        if len(rows):
            sample[filled : filled + len(rows)] = request_activation_vectors(batch)[rows]
            filled += len(rows)
        start += len(batch)
    if progress:
        progress(f"clustering: k-means (k={k}) on {size} of {n} requests")
    return KMeans(n_clusters=k, n_init=4, random_state=random_state, copy_x=False).fit(sample)


class _Accumulator:
    def __init__(self, model: ModelShape) -> None:
        self.shape = (model.num_moe_layers, model.num_experts)
        self.counts: dict[str, np.ndarray] = {}
        self.tokens: dict[str, int] = {}
        self.requests = 0
        self.label_mix: dict[str, int] = {}

    def add(self, batch: TraceBatch, rows: np.ndarray) -> None:
        self.requests += int(rows.sum())
        for phase, counts in batch.counts.items():
            take = rows & batch.present[phase]
            if not take.any():
                continue
            acc = self.counts.setdefault(phase, np.zeros(self.shape, dtype=np.int64))
            acc += counts[take].sum(axis=0, dtype=np.int64)
            self.tokens[phase] = self.tokens.get(phase, 0) + int(batch.tokens[phase][take].sum())
        for i in np.flatnonzero(rows):
            label = batch.labels[i]
            if label is not None:
                self.label_mix[label] = self.label_mix.get(label, 0) + 1


def build_profile(
    traces: TraceSet,
    *,
    by: str = "label",
    k: int | None = None,
    random_state: int = 0,
    progress: Progress | None = None,
) -> WorkloadProfile:
    """Aggregate a trace set into a profile.

    Classes come from request labels (``by="label"``), k-means clusters of request
    activation vectors (``by="cluster"``, needs ``k``), or one class ``all`` (``by="all"``).
    """
    if by not in ("label", "cluster", "all"):
        raise ConfigError(f"--by must be 'label', 'cluster' or 'all', got {by!r}")
    if by == "cluster" and k is None:
        raise ConfigError("--by cluster needs --k (the number of clusters)")
    if by == "label" and traces.num_labelled < traces.num_requests:
        raise InputError(
            traces.path,
            f"{traces.num_requests - traces.num_labelled} of {traces.num_requests} records "
            "have no label; use --by cluster --k K or --by all",
        )
    accumulators: dict[str, _Accumulator] = {}
    clusters = (
        fit_request_clusters(traces, k, random_state=random_state, progress=progress)
        if by == "cluster" and k is not None
        else None
    )
    done = 0
    for batch in traces.batches():
        if clusters is not None:
            ids = clusters.predict(request_activation_vectors(batch))
            names = np.array([f"cluster-{c}" for c in ids])
        elif by == "all":
            names = np.full(len(batch), "all")
        else:
            names = np.array(batch.labels, dtype=str)
        for name in np.unique(names):
            acc = accumulators.setdefault(str(name), _Accumulator(traces.model))
            acc.add(batch, names == name)
        done += len(batch)
        if progress:
            progress(f"profile: aggregated {done}/{traces.num_requests} requests")
    total_tokens = sum(sum(a.tokens.values()) for a in accumulators.values())
    classes = {
        name: ClassProfile(
            weight=sum(a.tokens.values()) / total_tokens if total_tokens else 1 / len(accumulators),
            counts={p: a.counts[p].astype(np.float64) for p in PHASES if p in a.counts},
            requests=a.requests,
            tokens=a.tokens,
            label_mix=a.label_mix if by == "cluster" else {},
        )
        for name, a in sorted(accumulators.items())
    }
    source = {
        "traces": str(traces.path),
        "trace_source": traces.source,
        "granularity": traces.granularity,
        "num_requests": traces.num_requests,
        "classes_by": f"cluster (k-means, k={k}, seed={random_state})" if by == "cluster" else by,
    }
    return WorkloadProfile(model=traces.model, classes=classes, source=source)


# --------------------------------------------------------------------------- file I/O


def save_profile(profile: WorkloadProfile, path: Path) -> None:
    """Write atomically: a temporary file beside ``path`` replaces it when complete."""
    write_json_atomic(path, profile.to_json())


def _counts_array(path: Path, where: str, value: Any, shape: tuple[int, int]) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(path, f"{where} is not a numeric matrix") from None
    if arr.shape != shape:
        raise InputError(
            path, f"{where} has shape {arr.shape}, model needs {shape} (MoE layers x experts)"
        )
    if not np.all(np.isfinite(arr)):
        raise InputError(path, f"{where} has non-finite values")
    if arr.min() < 0:
        raise InputError(path, f"{where} has negative counts")
    return arr


def parse_profile(data: Any, path: Path) -> WorkloadProfile:
    """Validate decoded profile JSON; every problem is an InputError naming the field."""
    if not isinstance(data, dict):
        raise InputError(path, "a profile must be a JSON object")
    for key in ("model", "classes"):
        if key not in data:
            raise InputError(path, f"missing top-level key {key!r} (is this a profile?)")
    model = ModelShape.from_dict(data["model"], path)
    shape = (model.num_moe_layers, model.num_experts)
    raw = data["classes"]
    if not isinstance(raw, dict) or not raw:
        raise InputError(path, "'classes' must be a non-empty object")
    classes = {}
    for name, c in raw.items():
        where = f"class {name!r}"
        if not isinstance(c, dict):
            raise InputError(path, f"{where} must be an object")
        weight = c.get("weight")
        if (
            not isinstance(weight, int | float)
            or isinstance(weight, bool)
            or not (math.isfinite(weight) and 0 <= weight <= 1)
        ):
            raise InputError(path, f"{where}: weight must be a number in [0, 1], got {weight!r}")
        counts = {
            phase: _counts_array(path, f"{where} {phase}", c[phase], shape)
            for phase in ("decode", "prefill", "mixed")
            if phase in c
        }
        if not counts:
            raise InputError(path, f"{where} has no decode, prefill or mixed counts")
        if all(arr.sum() == 0 for arr in counts.values()):
            raise InputError(path, f"{where} is empty (all counts are zero)")
        classes[str(name)] = ClassProfile(
            weight=float(weight),
            counts=counts,
            requests=int(c.get("requests", 0)),
            tokens={str(p): int(t) for p, t in c.get("tokens", {}).items()},
            label_mix={str(lbl): int(n) for lbl, n in c.get("label_mix", {}).items()},
        )
    total = sum(c.weight for c in classes.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise InputError(path, f"class weights sum to {total:.6g}, not 1")
    return WorkloadProfile(model=model, classes=classes, source=dict(data.get("source", {})))


def load_profile(path: Path) -> WorkloadProfile:
    return parse_profile(read_json(path), path)

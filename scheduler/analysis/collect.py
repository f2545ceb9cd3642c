"""Gather the statistics of one dataset (a trace set or a profile) for the report.

Traces are streamed: one pass builds the per-class profile, a second samples requests
for the request-level statistics (class-from-activation accuracy, per-request
prefill-decode correlation, co-activation), with caps that bound memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scheduler.analysis import stats
from scheduler.model_shape import ModelShape
from scheduler.profile import PLACEMENT_PHASE_ORDER, WorkloadProfile, build_profile
from scheduler.progress import Progress
from scheduler.traces.store import PHASES, TraceSet

#: Requests sampled for the request-level statistics, and tokens for co-activation.
MAX_REQUESTS = 5000
MAX_COACT_TOKENS = 200_000
#: Fewer requests than this in any class and the class-prediction accuracy is not reported.
MIN_REQUESTS_PER_CLASS = 5


@dataclass
class DatasetStats:
    """Everything the report shows for one dataset. ``notes`` say why a part is missing."""

    name: str
    model: ModelShape
    kind: str  # "traces" or "profile"
    granularity: str
    num_requests: int
    class_counts: dict[str, dict[str, np.ndarray]]  # class -> phase -> [layers, experts]
    class_requests: dict[str, int]
    class_weights: dict[str, float]
    source: dict[str, Any] = field(default_factory=dict)
    accuracy: np.ndarray | None = None  # [layers]
    accuracy_requests: int = 0
    pd_corr_requests: np.ndarray | None = None  # [requests with both phases, layers]
    coact: np.ndarray | None = None  # [layers, experts, experts]
    coact_tokens: int = 0
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def phases(self) -> list[str]:
        return [p for p in PHASES if any(p in c for c in self.class_counts.values())]

    def total_counts(self, phase: str) -> np.ndarray:
        return sum(c[phase] for c in self.class_counts.values() if phase in c)  # type: ignore[return-value]

    def class_placement_counts(self) -> dict[str, np.ndarray]:
        """class -> counts of the phase a placement would use (decode, prefill, mixed)."""
        out = {}
        for name, by_phase in self.class_counts.items():
            phase = next(p for p in PLACEMENT_PHASE_ORDER if p in by_phase)
            out[name] = by_phase[phase]
        return out


def from_profile(name: str, profile: WorkloadProfile) -> DatasetStats:
    ds = DatasetStats(
        name=name,
        model=profile.model,
        kind="profile",
        granularity=profile.source.get("granularity", "unknown"),
        num_requests=sum(c.requests for c in profile.classes.values()),
        class_counts={n: dict(c.counts) for n, c in profile.classes.items()},
        class_requests={n: c.requests for n, c in profile.classes.items()},
        class_weights={n: c.weight for n, c in profile.classes.items()},
        source=profile.source,
    )
    reason = "needs per-request traces; a profile holds class totals only"
    coact = coactivation_undefined(profile.model) or "needs token-level traces"
    ds.notes.update(accuracy=reason, pd_requests=reason, coact=coact)
    return ds


def coactivation_undefined(model: ModelShape) -> str | None:
    """Why co-activation means nothing for ``model``'s routing, or None when it does."""
    if model.top_k == 1:
        return (
            "co-activation is undefined for top-1 routing: each token activates one routed "
            "expert per layer, so no two experts are ever activated together"
        )
    if model.top_k >= model.num_experts:
        return (
            f"co-activation carries no information when top-k equals the expert count "
            f"({model.num_experts}): every token activates every expert pair"
        )
    return None


def from_traces(
    name: str, traces: TraceSet, *, random_state: int = 0, progress: Progress | None = None
) -> DatasetStats:
    labelled = traces.num_labelled == traces.num_requests
    profile = build_profile(traces, by="label" if labelled else "all", progress=progress)
    ds = from_profile(name, profile)
    ds.kind, ds.granularity, ds.source, ds.notes = "traces", traces.granularity, traces.source, {}
    _request_level(ds, traces, random_state, progress)
    return ds


def _request_level(
    ds: DatasetStats, traces: TraceSet, random_state: int, progress: Progress | None
) -> None:
    rng = np.random.default_rng(random_state)
    keep_p = min(1.0, MAX_REQUESTS / max(traces.num_requests, 1))
    vectors, labels, pd_corr, token_blocks = [], [], [], []
    coact_tokens = 0
    undefined = coactivation_undefined(ds.model)
    for batch in traces.batches():
        keep = rng.random(len(batch)) < keep_p
        phase_of = np.full(len(batch), "", dtype=object)
        for phase in reversed(PLACEMENT_PHASE_ORDER):
            if phase in batch.present:
                phase_of[batch.present[phase]] = phase
        for i in np.flatnonzero(keep):
            vectors.append(batch.counts[phase_of[i]][i].copy())  # do not pin the shard
            labels.append(batch.labels[i] or "all")
            if {"prefill", "decode"} <= batch.counts.keys() and (
                batch.present["prefill"][i] and batch.present["decode"][i]
            ):
                pd_corr.append(
                    stats.pearson_per_layer(
                        batch.counts["prefill"][i].astype(np.float64),
                        batch.counts["decode"][i].astype(np.float64),
                    )
                )
        for ids, _ in batch.token_ids.values():
            if undefined is None and coact_tokens < MAX_COACT_TOKENS:
                block = ids[: MAX_COACT_TOKENS - coact_tokens].copy()
                token_blocks.append(block)
                coact_tokens += len(block)
    if progress:
        progress(f"{ds.name}: request-level statistics over {len(vectors)} sampled requests")

    classes, per_class = np.unique(np.array(labels, dtype=str), return_counts=True)
    if traces.granularity != "request":
        ds.notes["accuracy"] = "records are aggregates over many requests, not requests"
    elif traces.num_labelled < traces.num_requests:
        ds.notes["accuracy"] = (
            f"needs every request labelled ({traces.num_labelled} of {traces.num_requests} are)"
        )
    elif len(classes) < 2:
        ds.notes["accuracy"] = "needs at least two labelled classes"
    elif per_class.min() < MIN_REQUESTS_PER_CLASS:
        ds.notes["accuracy"] = (
            f"too few requests per class (smallest class has {per_class.min()}, "
            f"need {MIN_REQUESTS_PER_CLASS})"
        )
    else:
        ds.accuracy = stats.class_accuracy_per_layer(
            np.stack(vectors), np.array(labels), random_state=random_state
        )
        ds.accuracy_requests = len(vectors)

    if pd_corr:
        ds.pd_corr_requests = np.stack(pd_corr)
    else:
        ds.notes["pd_requests"] = "no record has both prefill and decode routing"

    if undefined is not None:
        ds.notes["coact"] = undefined
    elif token_blocks:
        ids = np.concatenate(token_blocks)
        ds.coact = stats.coactivation(ids, ds.model.num_experts)
        ds.coact_tokens = int((ids >= 0).any(axis=(1, 2)).sum())
    else:
        ds.notes["coact"] = "no token-level expert ids in these traces"

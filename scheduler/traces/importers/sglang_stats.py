"""SGLang expert-distribution statistics: ``{"logical_count": [...]}``.

Reads the JSON files SGLang publishes for EPLB initialisation (``logical_count
[hidden_layers, experts]``, e.g. the DeepSeek-V3 ``prefill_*.json`` / ``decode_*.json``
set) and the recorder's ``stat`` dump (``.pt``, ``logical_count [passes, hidden_layers,
experts]``, summed over passes; needs torch). These are aggregates over a recording
window, not requests: one record per workload, with the phase taken from the file name
prefix (``prefill_`` / ``decode_``; anything else is phase ``mixed``). Files of the same
workload in both phases (``prefill_in1000out1000`` + ``decode_in1000out1000``) become
one record with both phases.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from scheduler.errors import InputError
from scheduler.jsonio import read_json
from scheduler.model_shape import ModelShape
from scheduler.traces.importers.common import TraceSource, require_model
from scheduler.traces.store import RequestTrace


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted([*path.glob("*.json"), *path.glob("*.pt")])
        if not files:
            raise InputError(path, "no .json or .pt statistics files in this directory")
        return files
    return [path]


def split_name(path: Path) -> tuple[str, str]:
    """``prefill_in1024.json`` -> (``prefill``, ``in1024``); unknown prefix -> ``mixed``."""
    stem = path.name.split(".", 1)[0]
    phase, _, rest = stem.partition("_")
    if phase in ("prefill", "decode") and rest:
        return phase, rest
    return "mixed", stem


def load_logical_count(path: Path, model: ModelShape) -> np.ndarray:
    """[moe_layers, experts] int64 counts from one statistics file (dense rows dropped)."""
    if path.name.endswith(".pt"):
        from scheduler.traces.importers.sglang_recorder import load_pt

        data = load_pt(path)
    else:
        data = read_json(path)
    if not isinstance(data, dict) or "logical_count" not in data:
        raise InputError(path, "no 'logical_count' key (not SGLang expert statistics)")
    try:
        counts = np.asarray(data["logical_count"], dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(path, "logical_count is not a numeric array") from None
    if counts.ndim == 3:
        counts = counts.sum(axis=0)
    expected = (model.num_hidden_layers, model.num_experts)
    if counts.shape != expected:
        raise InputError(
            path,
            f"logical_count has shape {counts.shape}, model {model.name} needs "
            f"{expected} (hidden layers x experts) or [passes, *that]",
        )
    if not np.all(np.isfinite(counts)) or counts.min() < 0:
        raise InputError(path, "logical_count has negative or non-finite values")
    if not np.all(counts == np.round(counts)):
        raise InputError(path, "logical_count has non-integer values")
    return counts[list(model.moe_layer_ids)].astype(np.int64)


def _records(files: list[Path], model: ModelShape) -> Iterator[RequestTrace]:
    workloads: dict[str, dict[str, Path]] = {}
    for f in files:
        phase, workload = split_name(f)
        if phase in workloads.setdefault(workload, {}):
            raise InputError(f, f"second {phase} file for workload {workload!r}")
        workloads[workload][phase] = f
    for workload, by_phase in workloads.items():
        counts = {phase: load_logical_count(f, model) for phase, f in by_phase.items()}
        # Every token is routed to top_k experts, so tokens = assignments / top_k; layers
        # may differ slightly (seen upstream), so take the mean over MoE layers.
        tokens = {p: int(round(c.sum(axis=1).mean() / model.top_k)) for p, c in counts.items()}
        yield RequestTrace(request_id=workload, counts=counts, tokens=tokens, label=workload)


def read(path: Path, model: ModelShape | None) -> TraceSource:
    model = require_model(model, "deepseek-v3")
    files = _files(path)
    return TraceSource(
        model=model,
        granularity="aggregate",
        records=_records(files, model),
        provenance={
            "importer": "sglang-stats",
            "path": str(path),
            "files": [f.name for f in files],
            "note": "aggregate statistics: one record per workload, each summing many "
            "requests; prefill and decode come from separate recordings, so their "
            "correlation is per workload, not per request",
        },
    )

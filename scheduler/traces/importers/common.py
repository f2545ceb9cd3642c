"""Shared pieces of the importers: the TraceSource they return, and input helpers."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.errors import InputError
from scheduler.model_shape import ModelShape
from scheduler.traces.store import RequestTrace


@dataclass
class TraceSource:
    """What an importer found: the model, granularity, provenance and a record stream.

    ``records`` may be a generator that raises :class:`InputError` part-way; the writer
    then discards everything, so no partial store is left.
    """

    model: ModelShape
    granularity: str
    records: Iterable[RequestTrace]
    provenance: dict[str, Any] = field(default_factory=dict)


def check_expert_ids(path: Path | str, ids: np.ndarray, num_experts: int, where: str) -> None:
    """Raise InputError if any id is outside ``[-1, num_experts)`` (-1 = not recorded)."""
    if ids.size == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < -1 or hi >= num_experts:
        bad = lo if lo < -1 else hi
        raise InputError(path, f"{where}: expert id {bad} out of range [0, {num_experts})")


def require_model(model: ModelShape | None, default: str) -> ModelShape:
    from scheduler.model_shape import PRESETS

    return model if model is not None else PRESETS[default]

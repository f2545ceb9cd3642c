"""Shared pieces of the importers: the TraceSource they return, and input helpers."""

from __future__ import annotations

import gzip
import io
import json
import lzma
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

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


def open_text(path: Path) -> IO[str]:
    """Open a text file, transparently decompressing ``.gz`` and ``.xz``."""
    try:
        if path.name.endswith(".gz"):
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
        if path.name.endswith(".xz"):
            return io.TextIOWrapper(lzma.open(path, "rb"), encoding="utf-8")
        return open(path, encoding="utf-8")
    except OSError as e:
        raise InputError(path, f"cannot open ({e.strerror or e})") from e


#: Exceptions that mean "this compressed or text file is damaged".
READ_ERRORS = (OSError, EOFError, lzma.LZMAError, UnicodeDecodeError)


def read_json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, decoded JSON value) for every non-blank line of a JSON-lines file.

    Bad JSON or a damaged file raises InputError naming the file and the line.
    """
    n = 0
    with open_text(path) as f:
        try:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(
                        path, f"line {n}: not valid JSON ({e.msg} at column {e.colno})"
                    ) from e
        except READ_ERRORS as e:
            raise InputError(path, f"line {n + 1}: cannot read ({e})") from e


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

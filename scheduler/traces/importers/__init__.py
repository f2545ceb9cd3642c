"""Importers: every routing-trace format we read, turned into :class:`RequestTrace` records.

Each importer module exposes ``read(path, model, **options) -> TraceSource``. The registry
below maps format names (``--format``) to them; :func:`detect_format` guesses the format
of a path; :func:`open_traces` returns a :class:`TraceSet` for a store or, for anything
else, imports it into a temporary store first.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from scheduler.errors import ConfigError, InputError
from scheduler.model_shape import ModelShape
from scheduler.traces.importers import (
    esft,
    mixtral_jsonl,
    sglang_generate,
    sglang_recorder,
    sglang_stats,
)
from scheduler.traces.importers.common import TraceSource
from scheduler.traces.store import MANIFEST, TraceSet, TraceWriter

#: format name -> (reader module, one-line description)
FORMATS = {
    "store": (None, "a moe-scheduler trace store directory (manifest.json + shards)"),
    "esft": (esft, "ESFT routing .npz (one file per domain, or a directory of them)"),
    "sglang-stats": (
        sglang_stats,
        "SGLang logical_count statistics: .json files (prefill_*/decode_*) or a recorder "
        "stat dump (.pt)",
    ),
    "sglang-recorder": (
        sglang_recorder,
        "SGLang expert-distribution recorder per_token/per_pass dump (.pt, needs torch)",
    ),
    "sglang-generate": (
        sglang_generate,
        "SGLang /generate responses with meta_info.routed_experts, one JSON per line",
    ),
    "mixtral-jsonl": (
        mixtral_jsonl,
        "per-token routing JSON lines (the Mixtral HumanEval/GSM8K sample format)",
    ),
}


def detect_format(path: Path) -> str:
    """Guess the format of ``path`` from its layout and names; raise ConfigError if unsure."""
    if not path.exists():
        raise InputError(path, "does not exist")
    if path.is_dir():
        names = [p.name for p in path.iterdir()]
        if MANIFEST in names:
            return "store"
        if any(n.startswith("esft_") and n.endswith(".npz") for n in names):
            return "esft"
        if any(n.endswith(".json") and n.split("_", 1)[0] in ("prefill", "decode") for n in names):
            return "sglang-stats"
        if any("_routing" in n and ".jsonl" in n for n in names):
            return "mixtral-jsonl"
        if any(n.endswith(".pt") for n in names):
            return "sglang-recorder"
    else:
        name = path.name
        if name.endswith(".npz"):
            return "esft"
        if name.endswith(".pt"):
            return sglang_recorder.detect_pt_kind(path)
        if name.endswith(".json"):
            return _sniff_json(path)
        if ".jsonl" in name:
            return mixtral_jsonl.sniff(path) or "sglang-generate"
    raise ConfigError(
        f"cannot tell the format of {path}; pass --format (one of: {', '.join(FORMATS)})"
    )


def _sniff_json(path: Path) -> str:
    """``sglang-generate`` if the file's head mentions ``meta_info``, else ``sglang-stats``."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError as e:
        raise InputError(path, f"cannot read ({e.strerror or e})") from e
    if '"meta_info"' in head and '"logical_count"' not in head:
        return "sglang-generate"
    return "sglang-stats"


def read_source(path: Path, fmt: str | None, model: ModelShape | None) -> TraceSource:
    """Open a non-store input with its importer (format detected when ``fmt`` is None)."""
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ConfigError(f"unknown --format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    module = FORMATS[fmt][0]
    if module is None:
        raise ConfigError(f"{path} is already a trace store; nothing to import")
    return module.read(path, model)


def import_traces(
    path: Path,
    out: Path,
    *,
    fmt: str | None = None,
    model: ModelShape | None = None,
    keep_token_ids: bool = True,
    overwrite: bool = False,
    compress: bool = True,
    progress: Callable[[str], None] | None = None,
) -> TraceSet:
    """Import ``path`` into a new trace store at ``out`` and open it."""
    source = read_source(path, fmt, model)
    with TraceWriter(
        out,
        source.model,
        granularity=source.granularity,
        source=source.provenance,
        source_path=path,
        overwrite=overwrite,
        compress=compress,
    ) as writer:
        for record in source.records:
            if not keep_token_ids:
                record.token_ids, record.gate_weights = {}, {}
            writer.add(record)
            if progress:
                progress(f"import: {writer.num_requests} records")
    return TraceSet(out)


def open_traces(
    path: Path,
    workdir: Path,
    *,
    fmt: str | None = None,
    model: ModelShape | None = None,
    progress: Callable[[str], None] | None = None,
) -> TraceSet:
    """A TraceSet for ``path``: the store itself, or an import of it into ``workdir``.

    The caller owns ``workdir`` (typically a temporary directory) and removes it.
    """
    if (fmt or detect_format(path)) == "store":
        trace_set = TraceSet(path)
        if model is not None and model != trace_set.model:
            raise ConfigError(
                f"--model {model.name} does not match the store's model {trace_set.model.name}"
            )
        return trace_set
    return import_traces(path, workdir / "traces", fmt=fmt, model=model, progress=progress)


def looks_like_profile(path: Path) -> bool:
    """True for a JSON file whose top level has ``classes`` and ``model`` (a profile)."""
    if not (path.is_file() and path.name.endswith(".json")):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(1 << 16)
        data = json.loads(head) if len(head) < (1 << 16) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if data is None:  # large file: look at the keys near the top instead of parsing it all
        return '"classes"' in head and '"model"' in head and '"logical_count"' not in head
    return isinstance(data, dict) and "classes" in data and "model" in data


__all__ = [
    "FORMATS",
    "TraceSource",
    "detect_format",
    "import_traces",
    "looks_like_profile",
    "open_traces",
    "read_source",
]

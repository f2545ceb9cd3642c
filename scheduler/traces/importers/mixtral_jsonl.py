"""Per-token routing logged as JSON lines (the Mixtral HumanEval/GSM8K sample's format).

Each line: ``{"dataset", "problem_id", "layer", "experts": [k ids], "gating_probs",
"token_pos" | "token_idx"}``. Two layouts exist:

* **prefill + decode** (``token_pos``): the prompt's forward pass first (all layers, rows
  with rising ``token_pos``), then decode steps, each logging layers in rising order with
  ``token_pos == 0``. A decode step starts whenever the layer number stops rising, so
  steps stay aligned across layers even where the logger dropped rows.
* **decode only** (``token_idx``): generated-token position per layer. The original
  logger dropped rows whose weights were exactly [0.5, 0.5] and the positions were
  re-indexed afterwards, so after a dropped row a layer's later tokens sit one position
  early; per-layer counts are exact.

Missing cells are ``-1``. Labels: ``humaneval`` -> ``code``, ``gsm8k`` -> ``math``, other
datasets keep their name. Prompt text is taken from ``<dataset>_*_outputs.jsonl[.xz]``
next to the routing files when present.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.errors import InputError
from scheduler.jsonio import READ_ERRORS, open_text, read_json_lines
from scheduler.model_shape import ModelShape
from scheduler.traces.importers.common import TraceSource, check_expert_ids, require_model
from scheduler.traces.store import RequestTrace

DATASET_LABELS = {"humaneval": "code", "gsm8k": "math"}


def sniff(path: Path) -> str | None:
    """``"mixtral-jsonl"`` if the first line looks like this format, else None."""
    try:
        with open_text(path) as f:
            first = json.loads(f.readline())
    except (*READ_ERRORS, json.JSONDecodeError, InputError):
        return None
    if isinstance(first, dict) and "layer" in first and "experts" in first:
        return "mixtral-jsonl"
    return None


def _routing_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if "_routing" in p.name and ".jsonl" in p.name)
        if not files:
            raise InputError(path, "no *_routing*.jsonl[.xz] files in this directory")
        return files
    return [path]


def _read_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for n, row in read_json_lines(path):
        if not isinstance(row, dict):
            raise InputError(path, f"line {n}: expected a JSON object")
        yield n, row


def _prompts(directory: Path) -> dict[tuple[str, int], str]:
    prompts: dict[tuple[str, int], str] = {}
    for f in sorted(directory.glob("*_outputs.jsonl*")):
        dataset = f.name.split("_", 1)[0]
        for _, row in _read_lines(f):
            if "problem_id" in row and "prompt" in row:
                prompts[(dataset, int(row["problem_id"]))] = str(row["prompt"])
    return prompts


class _Request:
    """Rows of one (file, dataset, problem) as they arrive: phase -> [(pos, layer, ids, w)]."""

    def __init__(self) -> None:
        self.rows: dict[str, list[tuple[int, int, list[int], list[float]]]] = defaultdict(list)
        self.last_layer = -1
        self.last_pos: dict[int, int] = {}
        self.step = -1


def _collect(path: Path, model: ModelShape) -> dict[tuple[str, int], _Request]:
    requests: dict[tuple[str, int], _Request] = {}
    for n, row in _read_lines(path):
        try:
            key = (str(row["dataset"]), int(row["problem_id"]))
            layer, experts = int(row["layer"]), [int(e) for e in row["experts"]]
            weights = [float(w) for w in row.get("gating_probs", [np.nan] * len(experts))]
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(path, f"line {n}: missing or malformed field ({e})") from e
        if not 0 <= layer < model.num_moe_layers:
            raise InputError(
                path, f"line {n}: layer {layer} out of range [0, {model.num_moe_layers})"
            )
        if len(experts) != model.top_k or len(weights) != model.top_k:
            raise InputError(
                path, f"line {n}: {len(experts)} experts, model top_k is {model.top_k}"
            )
        check_expert_ids(path, np.array(experts), model.num_experts, f"line {n}")
        req = requests.setdefault(key, _Request())
        if "token_idx" in row:
            req.rows["decode"].append((int(row["token_idx"]), layer, experts, weights))
            continue
        if "token_pos" not in row:
            raise InputError(path, f"line {n}: neither token_pos nor token_idx")
        pos = int(row["token_pos"])
        in_prefill = not req.rows["decode"] and pos > req.last_pos.get(layer, -1)
        req.last_pos[layer] = pos
        if in_prefill:
            req.rows["prefill"].append((pos, layer, experts, weights))
            continue
        if layer <= req.last_layer or req.step < 0:
            req.step += 1
        req.last_layer = layer
        req.rows["decode"].append((req.step, layer, experts, weights))
    return requests


def _to_arrays(
    rows: list[tuple[int, int, list[int], list[float]]], model: ModelShape
) -> tuple[np.ndarray, np.ndarray]:
    length = max(pos for pos, *_ in rows) + 1
    ids = np.full((length, model.num_moe_layers, model.top_k), -1, dtype=np.int16)
    weights = np.full(ids.shape, np.nan, dtype=np.float32)
    for pos, layer, experts, w in rows:
        ids[pos, layer] = experts
        weights[pos, layer] = w
    return ids, weights


def _records(
    files: list[Path], model: ModelShape, prompts: dict[tuple[str, int], str]
) -> Iterator[RequestTrace]:
    for path in files:
        for (dataset, problem), req in _collect(path, model).items():
            arrays = {phase: _to_arrays(rows, model) for phase, rows in req.rows.items() if rows}
            suffix = "/prefill+decode" if "prefill" in arrays else ""
            yield RequestTrace.from_token_ids(
                f"{dataset}/{problem}{suffix}",
                {phase: ids for phase, (ids, _) in arrays.items()},
                model.num_experts,
                gate_weights={phase: w for phase, (_, w) in arrays.items()},
                label=DATASET_LABELS.get(dataset, dataset),
                prompt=prompts.get((dataset, problem)),
            )


def read(path: Path, model: ModelShape | None) -> TraceSource:
    model = require_model(model, "mixtral-8x7b")
    files = _routing_files(path)
    prompts = _prompts(path if path.is_dir() else path.parent)
    return TraceSource(
        model=model,
        granularity="request",
        records=_records(files, model, prompts),
        provenance={
            "importer": "mixtral-jsonl",
            "path": str(path),
            "files": [f.name for f in files],
            "note": "the logger dropped rows with weights exactly [0.5, 0.5]: per-layer "
            "counts miss those tokens, and decode-only positions after a drop shift by one",
        },
    )

"""ESFT routing traces (deepseek-ai/ESFT ``expert_scores``, re-packaged as ``.npz``).

Input: ``esft_<domain>.npz`` with ``expert_ids [T, moe_layers, top_k]`` (int8),
``gate_weights`` (same shape, float32), ``seq_offsets [S+1]`` and ``moe_layer_ids``; or a
directory of them. One record per sequence, labelled with the domain. Each sequence was
one teacher-forced forward pass over prompt + answer (no generation), i.e. a prefill
pass, so its routing is stored under phase ``prefill`` (the prompt/answer boundary is not
recorded).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from scheduler.errors import InputError
from scheduler.model_shape import ModelShape
from scheduler.traces.importers.common import TraceSource, check_expert_ids, require_model
from scheduler.traces.store import RequestTrace


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(path.glob("esft_*.npz"))
        if not files:
            raise InputError(path, "no esft_<domain>.npz files in this directory")
        return files
    return [path]


def _domain(path: Path) -> str:
    stem = path.name.removesuffix(".npz")
    return stem.removeprefix("esft_")


def _load(path: Path, model: ModelShape) -> dict[str, np.ndarray]:
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            data = {k: z[k] for k in ("expert_ids", "seq_offsets", "moe_layer_ids") if k in z}
            if "gate_weights" in z:
                data["gate_weights"] = z["gate_weights"]
    except FileNotFoundError:
        raise InputError(path, "does not exist") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(path, f"not a readable .npz file ({e})") from e
    for key in ("expert_ids", "seq_offsets"):
        if key not in data:
            raise InputError(path, f"missing array {key!r} (is this an ESFT trace?)")
    ids, offsets = data["expert_ids"], data["seq_offsets"]
    expected = (model.num_moe_layers, model.top_k)
    if ids.ndim != 3 or ids.shape[1:] != expected:
        raise InputError(
            path,
            f"expert_ids has shape {ids.shape}, model {model.name} needs "
            f"[tokens, {expected[0]}, {expected[1]}]",
        )
    if "gate_weights" in data and data["gate_weights"].shape != ids.shape:
        raise InputError(path, f"gate_weights shape {data['gate_weights'].shape} != {ids.shape}")
    if "moe_layer_ids" in data and tuple(data["moe_layer_ids"].tolist()) != model.moe_layer_ids:
        raise InputError(
            path,
            f"moe_layer_ids {data['moe_layer_ids'].tolist()} differ from model "
            f"{model.name}'s {list(model.moe_layer_ids)}",
        )
    if (
        offsets.ndim != 1
        or len(offsets) < 2
        or offsets[0] != 0
        or offsets[-1] != len(ids)
        or np.any(np.diff(offsets) <= 0)
    ):
        raise InputError(path, f"seq_offsets must rise strictly from 0 to {len(ids)}")
    check_expert_ids(path, ids, model.num_experts, "expert_ids")
    return data


def _records(files: list[Path], model: ModelShape) -> Iterator[RequestTrace]:
    for path in files:
        data = _load(path, model)
        domain = _domain(path)
        ids, offsets = data["expert_ids"], data["seq_offsets"]
        weights = data.get("gate_weights")
        for s in range(len(offsets) - 1):
            span = slice(int(offsets[s]), int(offsets[s + 1]))
            yield RequestTrace.from_token_ids(
                f"{domain}/{s}",
                {"prefill": ids[span]},
                model.num_experts,
                gate_weights=None if weights is None else {"prefill": weights[span]},
                label=domain,
            )


def read(path: Path, model: ModelShape | None) -> TraceSource:
    model = require_model(model, "deepseek-v2-lite")
    files = _files(path)
    return TraceSource(
        model=model,
        granularity="request",
        records=_records(files, model),
        provenance={
            "importer": "esft",
            "path": str(path),
            "files": [f.name for f in files],
            "note": "teacher-forced prompt+answer forward passes, stored as phase prefill",
        },
    )

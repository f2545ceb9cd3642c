"""SGLang expert-distribution recorder dumps (``.pt``) in ``per_token`` or ``per_pass`` mode.

With ``--expert-distribution-recorder-mode per_token`` (or ``per_pass``) every rank writes
``expert_distribution_recorder_{time}_{rank}.pt``: a ``torch.save`` dict with

* ``records``: one dict per forward pass with ``forward_pass_id``, ``rank`` and
  ``global_physical_count`` ``[num_layers, num_physical_experts]``; ``per_token`` adds
  ``forward_mode`` (1 EXTEND, 2 DECODE, 3 MIXED, 4 IDLE, ...), ``extend_seq_lens`` and
  ``topk_ids_of_layer`` int32 ``[num_layers, num_tokens, 8]`` of **physical** ids
  (``-1`` = not recorded, e.g. dense layers).
* ``last_physical_to_logical_map``: ``[num_layers, num_physical_experts]`` logical id of
  every physical slot, as it was when the dump was written. A rebalance during recording
  changes the map, so passes before it are attributed with the later map.

The dumps have no request ids, so each file becomes ONE aggregate record named after the
file: per_token passes are split into phases by forward mode (EXTEND -> prefill,
DECODE -> decode, anything else -> mixed; IDLE passes hold no tokens) and keep their token
ids; per_pass dumps have only counts, all in phase ``mixed``. ``num_layers`` is the
model's ``num_hidden_layers``; dense layers are dropped by index.

The ``stat`` mode dump (``logical_count``) is read by :mod:`sglang_stats`. Reading any
``.pt`` needs torch (the ``torch`` extra); it is imported only when a dump is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from scheduler.errors import InputError, MissingDependencyError
from scheduler.model_shape import ModelShape
from scheduler.traces.importers.common import TraceSource, check_expert_ids, require_model
from scheduler.traces.store import RequestTrace

DEFAULT_MODEL = "deepseek-v3"

TORCH_MISSING = (
    "reading SGLang .pt dumps needs torch: pip install -e '.[torch]' "
    "(CPU wheel: pip install torch==2.13.0)"
)

#: SGLang ``ForwardMode`` values -> our phases. Other modes (MIXED, TARGET_VERIFY, ...)
#: are "mixed"; IDLE passes carry no tokens and are skipped.
_PHASE_OF_MODE = {1: "prefill", 2: "decode"}
_IDLE = 4


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingDependencyError(TORCH_MISSING) from None
    return torch


def load_pt(path: Path) -> dict[str, Any]:
    """Load a ``torch.save`` dict safely (``weights_only``) with every tensor as numpy."""
    torch = _import_torch()
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises many types for damaged or foreign files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(path, f"not a readable torch file ({first_line})") from e
    if not isinstance(data, dict):
        raise InputError(path, f"expected a dict saved with torch.save, got {type(data).__name__}")

    def to_numpy(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
        if isinstance(value, dict):
            return {k: to_numpy(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(to_numpy(v) for v in value)
        return value

    return to_numpy(data)


def detect_pt_kind(path: Path) -> str:
    """``"sglang-stats"`` for a ``stat`` dump, ``"sglang-recorder"`` for per_token/per_pass."""
    data = load_pt(path)
    if "logical_count" in data:
        return "sglang-stats"
    if "records" in data:
        return "sglang-recorder"
    raise InputError(
        path, "not an SGLang expert-distribution dump (no 'logical_count' or 'records')"
    )


def read(path: Path, model: ModelShape | None) -> TraceSource:
    """One aggregate record per dump: ``path`` is a ``.pt`` file or a directory of them."""
    model = require_model(model, DEFAULT_MODEL)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.endswith(".pt") and p.is_file())
        if not files:
            raise InputError(path, "no .pt files in this directory")
    elif path.is_file():
        files = [path]
    else:
        raise InputError(path, "does not exist")
    _import_torch()  # fail before any work, not part-way through the records
    return TraceSource(
        model=model,
        granularity="aggregate",
        records=(read_dump(f, model) for f in files),
        provenance={"importer": "sglang-recorder", "path": str(path)},
    )


def read_dump(path: Path, model: ModelShape) -> RequestTrace:
    """The aggregate record of one rank's dump, named after the file."""
    data = load_pt(path)
    records = data.get("records")
    if records is None:
        if "logical_count" in data:
            raise InputError(path, "a 'stat' mode dump; import it with --format sglang-stats")
        raise InputError(path, "no 'records' (not a per_token/per_pass recorder dump)")
    if not isinstance(records, list) or not records:
        raise InputError(path, "'records' must be a non-empty list of forward passes")
    if not all(isinstance(r, dict) for r in records):
        raise InputError(path, "every entry of 'records' must be a dict")
    p2l = _physical_to_logical(path, data.get("last_physical_to_logical_map"), model)

    per_token = ["topk_ids_of_layer" in r for r in records]
    if all(per_token):
        return _per_token_record(path, records, p2l, model)
    if not any(per_token):
        return _per_pass_record(path, records, p2l, model)
    raise InputError(path, "mixes per_token records (with topk_ids_of_layer) and per_pass ones")


def _physical_to_logical(path: Path, p2l: Any, model: ModelShape) -> np.ndarray:
    """Validated map, MoE layers only: [moe_layers, num_physical] logical ids (-1 = none)."""
    where = "last_physical_to_logical_map"
    if p2l is None:
        raise InputError(path, f"{where} is missing")
    if not _is_int_array(p2l, ndim=2):
        raise InputError(path, f"{where} must be an integer tensor [layers, physical experts]")
    if p2l.shape[0] != model.num_hidden_layers:
        raise InputError(
            path,
            f"{where} has {p2l.shape[0]} layers, model {model.name!r} has "
            f"{model.num_hidden_layers} (is the model right?)",
        )
    moe = p2l[list(model.moe_layer_ids)].astype(np.int64)
    check_expert_ids(path, moe, model.num_experts, where)
    return moe


def _per_token_record(
    path: Path, records: list[dict[str, Any]], p2l: np.ndarray, model: ModelShape
) -> RequestTrace:
    num_physical = p2l.shape[1]
    moe_layers = list(model.moe_layer_ids)
    rows: dict[str, list[np.ndarray]] = {}
    for i, record in enumerate(records):
        where = f"record {i} (forward_pass_id {record.get('forward_pass_id')})"
        mode = record.get("forward_mode")
        if not isinstance(mode, int | np.integer) or isinstance(mode, bool):
            raise InputError(path, f"{where}: forward_mode must be an integer, got {mode!r}")
        if mode == _IDLE:
            continue
        topk = record["topk_ids_of_layer"]
        if not _is_int_array(topk, ndim=3):
            raise InputError(
                path, f"{where}: topk_ids_of_layer must be an integer tensor [layers, tokens, k]"
            )
        if topk.shape[0] != model.num_hidden_layers or topk.shape[2] < model.top_k:
            raise InputError(
                path,
                f"{where}: topk_ids_of_layer has shape {topk.shape}, model "
                f"{model.name!r} needs [{model.num_hidden_layers}, tokens, >= {model.top_k}]",
            )
        physical = topk[moe_layers, :, : model.top_k].astype(np.int64)
        if physical.size and (physical.min() < -1 or physical.max() >= num_physical):
            bad = int(physical.min()) if physical.min() < -1 else int(physical.max())
            raise InputError(
                path, f"{where}: physical expert id {bad} out of range [0, {num_physical})"
            )
        logical = _to_logical(physical, p2l)  # [moe_layers, tokens, top_k]
        phase = _PHASE_OF_MODE.get(int(mode), "mixed")
        rows.setdefault(phase, []).append(logical.transpose(1, 0, 2).astype(_id_dtype(model)))
    token_ids = {
        phase: np.concatenate(parts) for phase, parts in rows.items() if sum(len(p) for p in parts)
    }
    if not token_ids:
        raise InputError(path, "no routed tokens in any forward pass")
    return RequestTrace.from_token_ids(path.stem, token_ids, model.num_experts)


def _to_logical(physical: np.ndarray, p2l: np.ndarray) -> np.ndarray:
    """Map [layers, tokens, k] physical ids through p2l [layers, physical]; -1 stays -1."""
    layers, tokens, k = physical.shape
    flat = np.take_along_axis(p2l, np.maximum(physical, 0).reshape(layers, -1), axis=1)
    return np.where(physical >= 0, flat.reshape(layers, tokens, k), -1)


def _per_pass_record(
    path: Path, records: list[dict[str, Any]], p2l: np.ndarray, model: ModelShape
) -> RequestTrace:
    expected = (model.num_hidden_layers, p2l.shape[1])
    physical = np.zeros(expected, dtype=np.int64)
    for i, record in enumerate(records):
        where = f"record {i} (forward_pass_id {record.get('forward_pass_id')})"
        count = record.get("global_physical_count")
        if not _is_int_array(count, ndim=2):
            raise InputError(path, f"{where}: global_physical_count must be an integer tensor")
        if count.shape != expected:
            raise InputError(
                path,
                f"{where}: global_physical_count has shape {count.shape}, expected "
                f"{expected} (layers x physical experts of last_physical_to_logical_map)",
            )
        if count.size and count.min() < 0:
            raise InputError(path, f"{where}: global_physical_count is negative")
        physical += count
    counts = np.zeros((model.num_moe_layers, model.num_experts), dtype=np.int64)
    for j, layer in enumerate(model.moe_layer_ids):
        mapped = p2l[j] >= 0  # slots without a logical expert cannot have routed tokens
        np.add.at(counts[j], p2l[j][mapped], physical[layer][mapped])
    tokens = round(int(counts[0].sum()) / model.top_k)
    return RequestTrace(request_id=path.stem, counts={"mixed": counts}, tokens={"mixed": tokens})


def _id_dtype(model: ModelShape) -> type[np.signedinteger]:
    return np.int16 if model.num_experts <= np.iinfo(np.int16).max else np.int32


def _is_int_array(value: Any, ndim: int) -> TypeGuard[np.ndarray]:
    return (
        isinstance(value, np.ndarray)
        and value.ndim == ndim
        and np.issubdtype(value.dtype, np.integer)
    )

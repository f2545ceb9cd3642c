"""SGLang ``/generate`` responses carrying per-request routed experts.

A server started with ``--enable-return-routed-experts`` answers a request sent with
``return_routed_experts=true`` with ``meta_info.routed_experts``: a base64 string of
little-endian int32 **logical** expert ids, shaped
``[prompt_tokens + completion_tokens - 1 - start_len, num_hidden_layers, top_k]``. Rows
cover token positions ``[start_len, seqlen - 1)`` (the last sampled token never runs a
forward pass). Dense layers are present with rows of zeros, which look like expert 0, so
they are dropped by layer index.

Input: JSON lines (``.jsonl``, optionally ``.gz``/``.xz``), one response object per line,
or a JSON array of them per line (a batch ``/generate``); or a ``.json`` file holding
one response object or an array. Besides SGLang's fields a response may carry our own
top-level keys ``prompt``, ``label``, ``routed_experts_start_len`` (default 0),
``arrival_s`` and ``finish_s``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.errors import InputError
from scheduler.jsonio import READ_ERRORS, open_text, read_json_lines
from scheduler.model_shape import ModelShape
from scheduler.traces.importers.common import TraceSource, check_expert_ids, require_model
from scheduler.traces.store import RequestTrace

DEFAULT_MODEL = "deepseek-v3"

#: Builds the InputError for a problem at the current response.
_Fail = Callable[[str], InputError]

_MISSING_ROUTING = (
    "meta_info.routed_experts is missing (start the server with "
    "--enable-return-routed-experts and send return_routed_experts=true)"
)


def read(path: Path, model: ModelShape | None) -> TraceSource:
    """Open a file of ``/generate`` responses; records are parsed lazily, one per response."""
    model = require_model(model, DEFAULT_MODEL)
    if not path.is_file():
        raise InputError(path, "does not exist" if not path.exists() else "is not a file")
    return TraceSource(
        model=model,
        granularity="request",
        records=_records(path, model),
        provenance={"importer": "sglang-generate", "path": str(path)},
    )


def encode_routed_experts(ids: np.ndarray) -> str:
    """The ``meta_info.routed_experts`` string of ``ids`` ([tokens, hidden_layers, top_k])."""
    ids = np.asarray(ids)
    if ids.ndim != 3:
        raise ValueError(f"ids must be [tokens, hidden_layers, top_k], got shape {ids.shape}")
    if ids.size and (ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max):
        raise ValueError("ids do not fit in int32")
    return base64.b64encode(np.ascontiguousarray(ids, dtype="<i4").tobytes()).decode("ascii")


def decode_routed_experts(encoded: str | bytes, model: ModelShape) -> np.ndarray:
    """``meta_info.routed_experts`` -> int32 [tokens, hidden_layers, top_k] (all layers).

    Raises ValueError (with the reason) for bad base64 or a size that is not a whole
    number of rows.
    """
    try:
        raw = base64.b64decode(encoded, validate=True)
    except ValueError as e:  # binascii.Error, or non-ASCII characters
        raise ValueError(f"meta_info.routed_experts is not valid base64 ({e})") from e
    row_bytes = 4 * model.num_hidden_layers * model.top_k
    if len(raw) % row_bytes:
        raise ValueError(
            f"meta_info.routed_experts holds {len(raw)} bytes, not a whole number of rows of "
            f"{model.num_hidden_layers} layers x top-{model.top_k} int32 ids "
            f"(does the model {model.name!r} match the server's?)"
        )
    return np.frombuffer(raw, dtype="<i4").reshape(-1, model.num_hidden_layers, model.top_k)


def _records(path: Path, model: ModelShape) -> Iterator[RequestTrace]:
    seen: set[str] = set()
    for where, default_id, response in _responses(path):
        record = _parse_response(path, where, default_id, response, model)
        if record.request_id in seen:
            raise InputError(path, f"{where}: duplicate request id {record.request_id!r}")
        seen.add(record.request_id)
        yield record


def _responses(path: Path) -> Iterator[tuple[str, str, Any]]:
    """Yield (location for messages, fallback request id, response) for every response."""
    name = path.name.removesuffix(".gz").removesuffix(".xz")
    if name.endswith(".json"):
        with open_text(path) as f:
            try:
                document = json.load(f)
            except json.JSONDecodeError as e:
                raise InputError(
                    path,
                    f"not JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                    "put one response per line in a .jsonl file",
                ) from e
            except READ_ERRORS as e:
                raise InputError(path, f"cannot read ({e})") from e
        if isinstance(document, list):
            for i, item in enumerate(document, 1):
                yield f"response {i}", f"response{i}", item
        else:
            yield "response", "response1", document
        return
    for n, value in read_json_lines(path):
        if isinstance(value, list):
            for i, item in enumerate(value, 1):
                yield f"line {n}, item {i}", f"line{n}-{i}", item
        else:
            yield f"line {n}", f"line{n}", value


def _parse_response(
    path: Path, where: str, default_id: str, response: Any, model: ModelShape
) -> RequestTrace:
    def fail(problem: str) -> InputError:
        return InputError(path, f"{where}: {problem}")

    if not isinstance(response, dict):
        raise fail(f"expected a /generate response object, got {type(response).__name__}")
    meta = response.get("meta_info")
    if not isinstance(meta, dict):
        raise fail("meta_info is missing" if meta is None else "meta_info must be an object")
    encoded = meta.get("routed_experts")
    if encoded is None:
        raise fail(_MISSING_ROUTING)
    if not isinstance(encoded, str):
        kind = type(encoded).__name__
        raise fail(f"meta_info.routed_experts must be a base64 string, got {kind}")

    prompt_tokens = _required_int(meta, "prompt_tokens", fail, prefix="meta_info.")
    completion_tokens = _required_int(meta, "completion_tokens", fail, prefix="meta_info.")
    start_len = _optional_int(response, "routed_experts_start_len", fail) or 0
    if not 0 <= start_len <= prompt_tokens:
        raise fail(f"routed_experts_start_len {start_len} is outside [0, {prompt_tokens}]")
    num_rows = prompt_tokens + completion_tokens - 1 - start_len
    if num_rows < 1:
        raise fail(
            f"no routed tokens (prompt_tokens {prompt_tokens}, completion_tokens "
            f"{completion_tokens}, routed_experts_start_len {start_len})"
        )

    try:
        all_layers = decode_routed_experts(encoded, model)
    except ValueError as e:
        raise fail(str(e)) from e
    if len(all_layers) != num_rows:
        raise fail(
            f"meta_info.routed_experts has {len(all_layers)} rows, expected {num_rows} "
            f"(prompt_tokens {prompt_tokens} + completion_tokens {completion_tokens} - 1 "
            f"- routed_experts_start_len {start_len})"
        )
    ids = all_layers[:, list(model.moe_layer_ids), :]
    check_expert_ids(path, ids, model.num_experts, where)
    # int16 halves the memory of buffered records; every id was just checked to fit.
    ids = ids.astype(np.int16 if model.num_experts <= np.iinfo(np.int16).max else np.int32)

    num_prefill = min(prompt_tokens - start_len, num_rows)
    phases = {"prefill": ids[:num_prefill], "decode": ids[num_prefill:]}
    request_id = meta.get("id")
    return RequestTrace.from_token_ids(
        default_id if request_id is None else str(request_id),
        {phase: rows for phase, rows in phases.items() if len(rows)},
        model.num_experts,
        label=_label(response, fail),
        prompt=_str(response, "prompt", fail),
        dp_rank=_optional_int(meta, "dp_rank", fail, prefix="meta_info."),
        arrival_s=_float(response, "arrival_s", fail),
        finish_s=_float(response, "finish_s", fail),
    )


def _optional_int(obj: dict[str, Any], key: str, fail: _Fail, *, prefix: str = "") -> int | None:
    """A non-negative integer field, or None when absent or null."""
    value = obj.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise fail(f"{prefix}{key} must be a non-negative integer, got {value!r}")
    return value


def _required_int(obj: dict[str, Any], key: str, fail: _Fail, *, prefix: str = "") -> int:
    value = _optional_int(obj, key, fail, prefix=prefix)
    if value is None:
        raise fail(f"{prefix}{key} is missing")
    return value


def _float(obj: dict[str, Any], key: str, fail: _Fail) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise fail(f"{key} must be a number, got {value!r}")
    return float(value)


def _str(obj: dict[str, Any], key: str, fail: _Fail) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise fail(f"{key} must be a string, got {type(value).__name__}")
    return value


def _label(obj: dict[str, Any], fail: _Fail) -> str | None:
    value = obj.get("label")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise fail(f"label must be a string or an integer, got {value!r}")

"""(prompt, measured routing) rows of the server's feedback buffer, and reading them back
as training pairs for ``moe-scheduler fit --pairs``.

A row of ``buffer.jsonl`` is ``{"prompt", "class", "routing"}``: ``class`` is the plan
class the request was *predicted* to be (routed as), and ``routing`` what SGLang's
routed experts *measured* for it, compactly:

* ``phase``: ``"decode"`` (the generated tokens' routing; the prompt's when the request
  generated none on this leg: ``"prefill"``);
* ``layers`` / ``experts``: the MoE shape the counts are for;
* ``pairs``: routed (token, expert) pairs per MoE layer (tokens x top-k);
* ``u8z``: base64 of the zlib-compressed [layers, experts] uint8 array
  ``q = round(255 * count / max count of the layer)``, every non-zero count kept at
  least 1 (the set of used experts is exact).

Decoding gives ``pairs * q / sum(q)`` per layer: each count within 1/510 of its layer's
largest. Clusters are assigned from per-layer shares, so this is all they need.
Size: at most ``layers * experts`` bytes before compression (DeepSeek-V3: 58 x 256 =
14,848); ``benchmarks/predictors_text_routing.py`` measures it.
"""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.errors import InputError
from scheduler.model_shape import ModelShape


def encode_routing(counts: np.ndarray, phase: str) -> dict[str, Any]:
    """[layers, experts] counts -> the ``routing`` value of a buffer row."""
    counts = np.asarray(counts, dtype=np.float64)
    top = counts.max(axis=1, keepdims=True)
    q = np.divide(255.0 * counts, top, out=np.zeros_like(counts), where=top > 0)
    q = np.where(counts > 0, np.maximum(np.rint(q), 1), 0).astype(np.uint8)
    pairs = float(counts.sum(axis=1).mean()) if counts.size else 0.0
    return {
        "phase": phase,
        "layers": int(counts.shape[0]),
        "experts": int(counts.shape[1]),
        "pairs": round(pairs, 3),
        "u8z": base64.b64encode(zlib.compress(q.tobytes(), 6)).decode("ascii"),
    }


def decode_routing(routing: Any, model: ModelShape) -> np.ndarray:
    """The ``routing`` value of a buffer row -> [layers, experts] float64 counts;
    ValueError saying why when it is malformed or for another model shape."""
    if not isinstance(routing, dict):
        raise ValueError("'routing' must be an object")
    shape = (model.num_moe_layers, model.num_experts)
    if (routing.get("layers"), routing.get("experts")) != shape:
        raise ValueError(
            f"routing is for {routing.get('layers')} MoE layers x {routing.get('experts')} "
            f"experts, the model {model.name} has {shape[0]} x {shape[1]}"
        )
    pairs = routing.get("pairs")
    if not isinstance(pairs, int | float) or not np.isfinite(pairs) or pairs < 0:
        raise ValueError("routing 'pairs' must be a non-negative number")
    try:
        raw = zlib.decompress(base64.b64decode(str(routing.get("u8z", "")), validate=True))
    except (ValueError, zlib.error) as e:
        raise ValueError(f"routing 'u8z' is not base64 zlib data ({e})") from None
    if len(raw) != shape[0] * shape[1]:
        raise ValueError(f"routing 'u8z' holds {len(raw)} bytes, expected {shape[0] * shape[1]}")
    q = np.frombuffer(raw, dtype=np.uint8).reshape(shape).astype(np.float64)
    sums = q.sum(axis=1, keepdims=True)
    return np.divide(q, sums, out=np.zeros_like(q), where=sums > 0) * float(pairs)


def read_pairs(path: Path, model: ModelShape) -> tuple[list[str], list[str], np.ndarray]:
    """(prompts, phases, counts [n, layers, experts]) of the buffer rows at ``path`` that
    carry a prompt and measured routing; rows without routing (written before it was
    recorded) are skipped. InputError (path and line) on a malformed row."""
    from scheduler.jsonio import read_json_lines

    if not path.is_file():
        raise InputError(path, "does not exist")
    prompts: list[str] = []
    phases: list[str] = []
    counts: list[np.ndarray] = []
    for n, row in read_json_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise InputError(path, f"line {n}: expected an object with a string 'prompt'")
        if row.get("routing") is None or not row["prompt"].strip():
            continue
        try:
            counts.append(decode_routing(row["routing"], model))
        except ValueError as e:
            raise InputError(path, f"line {n}: {e}") from None
        prompts.append(row["prompt"])
        phases.append(str(row["routing"].get("phase", "decode")))
    if not counts:
        raise InputError(path, "no rows with a prompt and measured routing")
    return prompts, phases, np.stack(counts)


def row_bytes(row: dict[str, Any]) -> int:
    """UTF-8 size of one buffer line (for reporting)."""
    return len((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))

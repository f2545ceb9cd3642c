"""The trace store: per-request routing traces on disk, written and read in shards.

A store is a directory::

    manifest.json        format, version, model shape, provenance, shard list
    shard-00000.npz      up to ``shard_size`` requests (see docs/trace-format.md)
    shard-00001.npz
    ...

The working representation is the per-request, per-MoE-layer expert **count**
(``[requests, layers, experts]``, the smallest unsigned dtype that holds it), kept
separately per phase (``prefill``, ``decode``, and ``mixed`` for tokens whose phase the
source does not record). Token-level expert ids (``[tokens, layers, top_k]``, int8/int16,
``-1`` = not recorded) and gate weights are optional. Readers stream shard by shard, so
memory is bounded by one shard whatever the number of requests.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.errors import InputError
from scheduler.model_shape import ModelShape

FORMAT = "moe-scheduler-traces"
VERSION = 1
MANIFEST = "manifest.json"
#: ``prefill`` and ``decode`` when the source separates them; ``mixed`` when it does not.
PHASES = ("prefill", "decode", "mixed")
#: ``request``: one record per real request. ``aggregate``: one record per recording
#: window or workload (e.g. SGLang's ``logical_count`` statistics), not per request.
GRANULARITIES = ("request", "aggregate")
#: A shard is also closed once its buffered token-level arrays reach this size, so long
#: requests with token ids do not make one shard (and the writer's memory) huge.
MAX_SHARD_TOKEN_BYTES = 256 << 20


def expert_counts(token_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Per-layer expert counts of token-level routing.

    token_ids: [tokens, layers, top_k] integer expert ids, ``-1`` = not recorded.
    Returns [layers, num_experts] int64.
    """
    _, layers, _ = token_ids.shape
    if token_ids.size and int(token_ids.max()) >= num_experts:
        raise ValueError(f"expert id {int(token_ids.max())} >= num_experts {num_experts}")
    offset = (np.arange(layers, dtype=np.int64) * num_experts)[None, :, None]
    flat = (token_ids.astype(np.int64) + offset)[token_ids >= 0]
    return np.bincount(flat, minlength=layers * num_experts).reshape(layers, num_experts)


@dataclass
class RequestTrace:
    """One request's routing (or one aggregate record's, see ``granularity``).

    counts: phase -> [layers, experts] non-negative integer counts of (token, slot)
        assignments. tokens: phase -> tokens routed in that phase.
    token_ids / gate_weights (optional): phase -> [tokens, layers, top_k].
    """

    request_id: str
    counts: dict[str, np.ndarray]
    tokens: dict[str, int]
    label: str | None = None
    prompt: str | None = None
    token_ids: dict[str, np.ndarray] = field(default_factory=dict)
    gate_weights: dict[str, np.ndarray] = field(default_factory=dict)
    dp_rank: int | None = None
    arrival_s: float | None = None
    finish_s: float | None = None

    @classmethod
    def from_token_ids(
        cls,
        request_id: str,
        token_ids: dict[str, np.ndarray],
        num_experts: int,
        *,
        gate_weights: dict[str, np.ndarray] | None = None,
        keep_token_ids: bool = True,
        **meta: Any,
    ) -> RequestTrace:
        """Counts from token-level ids ([tokens, layers, top_k] per phase).

        A token counts towards ``tokens`` if any of its slots was recorded.
        """
        counts = {p: expert_counts(ids, num_experts) for p, ids in token_ids.items()}
        tokens = {p: int((ids >= 0).any(axis=(1, 2)).sum()) for p, ids in token_ids.items()}
        return cls(
            request_id=request_id,
            counts=counts,
            tokens=tokens,
            token_ids=dict(token_ids) if keep_token_ids else {},
            gate_weights=dict(gate_weights or {}) if keep_token_ids else {},
            **meta,
        )


def _uint_dtype(max_value: int) -> np.dtype:
    for dt in (np.uint16, np.uint32, np.uint64):
        if max_value <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"count {max_value} does not fit in uint64")


def _pack_text(values: list[str | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Strings -> (utf-8 bytes [total] uint8, offsets [n+1] int64, present [n] bool)."""
    encoded = [(v or "").encode("utf-8") for v in values]
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return data, offsets, np.array([v is not None for v in values], dtype=bool)


def _unpack_text(data: np.ndarray, offsets: np.ndarray, present: np.ndarray) -> list[str | None]:
    raw = data.tobytes()
    return [
        raw[offsets[i] : offsets[i + 1]].decode("utf-8") if present[i] else None
        for i in range(len(present))
    ]


class TraceWriter:
    """Writes a trace store; use as a context manager.

    Records go to a temporary directory beside ``path`` which replaces ``path`` only when
    the block exits cleanly, so a failed import never leaves a partial store behind.
    ``source`` is free-form provenance (importer, input path, notes) kept in the manifest;
    ``source_path`` names the input in error messages.
    """

    def __init__(
        self,
        path: str | Path,
        model: ModelShape,
        *,
        granularity: str = "request",
        source: dict[str, Any] | None = None,
        source_path: str | Path | None = None,
        shard_size: int = 1024,
        compress: bool = True,
        overwrite: bool = False,
    ) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.path = Path(path)
        self.model = model
        self.granularity = granularity
        self.source = dict(source or {})
        self.source_path = source_path
        self.shard_size = shard_size
        self.compress = compress
        self.overwrite = overwrite
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._buffer: list[RequestTrace] = []
        self._buffer_bytes = 0
        self._shards: list[dict[str, Any]] = []
        self._ids: set[str] = set()
        self._phases: set[str] = set()
        self.num_requests = 0
        self.num_labelled = 0

    def __enter__(self) -> TraceWriter:
        if self.path.exists() and not self.overwrite:
            raise InputError(
                self.path, "already exists (choose another path, or replace it with --force)"
            )
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(parents=True)
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            return
        try:
            self._finish()
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise

    def add(self, record: RequestTrace) -> None:
        """Validate one record and buffer it; a full buffer is written as a shard."""
        self._validate(record)
        self._ids.add(record.request_id)
        self._phases.update(record.counts)
        self._buffer.append(record)
        self._buffer_bytes += sum(a.nbytes for a in record.token_ids.values()) + sum(
            a.nbytes for a in record.gate_weights.values()
        )
        self.num_requests += 1
        self.num_labelled += record.label is not None
        if len(self._buffer) >= self.shard_size or self._buffer_bytes >= MAX_SHARD_TOKEN_BYTES:
            self._flush()

    def _fail(self, record: RequestTrace, problem: str) -> InputError:
        return InputError(self.source_path, f"request {record.request_id!r}: {problem}")

    def _validate(self, r: RequestTrace) -> None:
        m = self.model
        shape = (m.num_moe_layers, m.num_experts)
        if r.request_id in self._ids:
            raise self._fail(r, "duplicate request id")
        if not r.counts:
            raise self._fail(r, "no routing in any phase")
        for phase, counts in r.counts.items():
            if phase not in PHASES:
                raise self._fail(r, f"unknown phase {phase!r} (expected one of {PHASES})")
            if counts.shape != shape:
                raise self._fail(
                    r,
                    f"{phase} counts have shape {counts.shape}, model needs {shape} "
                    "(MoE layers x experts)",
                )
            if not np.issubdtype(counts.dtype, np.integer):
                raise self._fail(r, f"{phase} counts must be integers, got {counts.dtype}")
            if counts.size and counts.min() < 0:
                raise self._fail(r, f"{phase} counts are negative")
            if phase not in r.tokens or r.tokens[phase] < 0:
                raise self._fail(r, f"{phase} token count missing or negative")
        for phase, ids in r.token_ids.items():
            if phase not in r.counts:
                raise self._fail(r, f"token ids for phase {phase!r} without counts")
            if ids.ndim != 3 or ids.shape[1:] != (m.num_moe_layers, m.top_k):
                raise self._fail(
                    r,
                    f"{phase} token ids have shape {ids.shape}, model needs "
                    f"[tokens, {m.num_moe_layers}, {m.top_k}]",
                )
            if ids.size and (ids.min() < -1 or ids.max() >= m.num_experts):
                raise self._fail(
                    r,
                    f"{phase} expert id out of range [0, {m.num_experts}): "
                    f"{int(ids.min()) if ids.min() < -1 else int(ids.max())}",
                )
            weights = r.gate_weights.get(phase)
            if weights is not None and weights.shape != ids.shape:
                raise self._fail(r, f"{phase} gate weights shape {weights.shape} != ids shape")

    def _flush(self) -> None:
        if not self._buffer:
            return
        buf, self._buffer, self._buffer_bytes = self._buffer, [], 0
        m = self.model
        arrays: dict[str, np.ndarray] = {}
        text_columns: tuple[tuple[str, list[str | None]], ...] = (
            ("request_id", [r.request_id for r in buf]),
            ("label", [r.label for r in buf]),
            ("prompt", [r.prompt for r in buf]),
        )
        for name, values in text_columns:
            arrays[f"{name}_utf8"], arrays[f"{name}_offsets"], arrays[f"{name}_present"] = (
                _pack_text(values)
            )
        arrays["dp_rank"] = np.array(
            [-1 if r.dp_rank is None else r.dp_rank for r in buf], dtype=np.int32
        )
        for key in ("arrival_s", "finish_s"):
            arrays[key] = np.array(
                [math.nan if getattr(r, key) is None else getattr(r, key) for r in buf],
                dtype=np.float64,
            )
        token_phases = []
        for phase in PHASES:
            present = np.array([phase in r.counts for r in buf], dtype=bool)
            if not present.any():
                continue
            zeros = np.zeros((m.num_moe_layers, m.num_experts), dtype=np.int64)
            counts = np.stack([r.counts.get(phase, zeros) for r in buf])
            arrays[f"{phase}_counts"] = counts.astype(_uint_dtype(int(counts.max(initial=0))))
            arrays[f"{phase}_tokens"] = np.array([r.tokens.get(phase, 0) for r in buf], np.int64)
            arrays[f"{phase}_present"] = present
            if any(phase in r.token_ids for r in buf):
                token_phases.append(phase)
                self._pack_tokens(arrays, phase, buf)
        name = f"shard-{len(self._shards):05d}.npz"
        with open(self._tmp / name, "wb") as f:
            if self.compress:
                np.savez_compressed(f, **arrays)  # type: ignore[arg-type]
            else:
                np.savez(f, **arrays)  # type: ignore[arg-type]
        self._shards.append({"file": name, "num_requests": len(buf), "token_ids": token_phases})

    def _pack_tokens(
        self, arrays: dict[str, np.ndarray], phase: str, buf: list[RequestTrace]
    ) -> None:
        m = self.model
        id_dtype = np.int8 if m.num_experts <= 127 else np.int16
        empty = np.zeros((0, m.num_moe_layers, m.top_k), dtype=id_dtype)
        ids = [r.token_ids.get(phase, empty) for r in buf]
        offsets = np.zeros(len(buf) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in ids], out=offsets[1:])
        arrays[f"{phase}_token_ids"] = np.concatenate(ids).astype(id_dtype)
        arrays[f"{phase}_token_offsets"] = offsets
        if any(phase in r.gate_weights for r in buf):
            arrays[f"{phase}_gate_weights"] = np.concatenate(
                [
                    r.gate_weights[phase].astype(np.float32)
                    if phase in r.gate_weights
                    else np.full(x.shape, np.nan, np.float32)
                    for r, x in zip(buf, ids, strict=True)
                ]
            )

    def _finish(self) -> None:
        self._flush()
        if self.num_requests == 0:
            raise InputError(self.source_path, "no requests found")
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "model": self.model.to_dict(),
            "granularity": self.granularity,
            "phases": [p for p in PHASES if p in self._phases],
            "num_requests": self.num_requests,
            "num_labelled": self.num_labelled,
            "source": self.source,
            "shards": self._shards,
        }
        (self._tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
        if self.path.exists():
            self.path.rename(old)
        self._tmp.rename(self.path)
        shutil.rmtree(old, ignore_errors=True)


@dataclass
class TraceBatch:
    """One shard's requests. Arrays are [requests, ...] in the shard's order.

    counts: phase -> [n, layers, experts]; tokens / present: phase -> [n];
    token_ids: phase -> ([total_tokens, layers, top_k], offsets [n+1]) when stored.
    """

    request_ids: list[str]
    labels: list[str | None]
    prompts: list[str | None]
    counts: dict[str, np.ndarray]
    tokens: dict[str, np.ndarray]
    present: dict[str, np.ndarray]
    token_ids: dict[str, tuple[np.ndarray, np.ndarray]]
    gate_weights: dict[str, np.ndarray]
    dp_rank: np.ndarray
    arrival_s: np.ndarray
    finish_s: np.ndarray

    def __len__(self) -> int:
        return len(self.request_ids)

    def record(self, i: int) -> RequestTrace:
        """Request ``i`` of this batch as a :class:`RequestTrace`."""

        def tokens_of(phase: str) -> np.ndarray:
            ids, off = self.token_ids[phase]
            return ids[off[i] : off[i + 1]]

        def weights_of(phase: str) -> np.ndarray | None:
            if phase not in self.gate_weights:
                return None
            off = self.token_ids[phase][1]
            w = self.gate_weights[phase][off[i] : off[i + 1]]
            return None if w.size and np.isnan(w).all() else w  # NaN = none stored

        phases = [p for p in self.counts if self.present[p][i]]
        weights = {p: weights_of(p) for p in phases}
        return RequestTrace(
            request_id=self.request_ids[i],
            counts={p: self.counts[p][i] for p in phases},
            tokens={p: int(self.tokens[p][i]) for p in phases},
            label=self.labels[i],
            prompt=self.prompts[i],
            token_ids={p: tokens_of(p) for p in phases if p in self.token_ids},
            gate_weights={p: w for p, w in weights.items() if w is not None},
            dp_rank=None if self.dp_rank[i] < 0 else int(self.dp_rank[i]),
            arrival_s=None if math.isnan(self.arrival_s[i]) else float(self.arrival_s[i]),
            finish_s=None if math.isnan(self.finish_s[i]) else float(self.finish_s[i]),
        )


class TraceSet:
    """A trace store opened for reading. Cheap to open; data is read per shard."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError:
            raise InputError(self.path, f"not a trace store (no {MANIFEST})") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(manifest_path, f"unreadable manifest ({e})") from e
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise InputError(manifest_path, f"not a {FORMAT} manifest")
        if manifest.get("version") != VERSION:
            raise InputError(
                manifest_path,
                f"unsupported version {manifest.get('version')!r} "
                f"(this build reads version {VERSION})",
            )
        self.model = ModelShape.from_dict(manifest.get("model"), manifest_path)
        self.granularity: str = manifest.get("granularity", "request")
        self.phases: list[str] = list(manifest.get("phases", []))
        self.source: dict[str, Any] = manifest.get("source", {})
        self.shards: list[dict[str, Any]] = list(manifest.get("shards", []))
        self.num_requests: int = int(manifest.get("num_requests", 0))
        labelled = manifest.get("num_labelled")
        self._num_labelled = None if labelled is None else int(labelled)
        if sum(s.get("num_requests", 0) for s in self.shards) != self.num_requests:
            raise InputError(manifest_path, "shard request counts do not add up to num_requests")

    @property
    def num_labelled(self) -> int:
        """Records with a label (counted by scanning the shards if the manifest lacks it)."""
        if self._num_labelled is None:
            self._num_labelled = sum(
                label is not None for batch in self.batches() for label in batch.labels
            )
        return self._num_labelled

    @property
    def has_token_ids(self) -> bool:
        return any(s.get("token_ids") for s in self.shards)

    def batches(self) -> Iterator[TraceBatch]:
        """Yield one :class:`TraceBatch` per shard, in order."""
        for shard in self.shards:
            yield self._read_shard(shard)

    def records(self) -> Iterator[RequestTrace]:
        """Yield every request as a :class:`RequestTrace` (streams shard by shard)."""
        for batch in self.batches():
            for i in range(len(batch)):
                yield batch.record(i)

    def _read_shard(self, shard: dict[str, Any]) -> TraceBatch:
        path = self.path / shard["file"]
        n = int(shard["num_requests"])
        m = self.model
        try:
            with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
                a = {key: z[key] for key in z.files}
        except FileNotFoundError:
            raise InputError(path, "shard listed in the manifest is missing") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise InputError(path, f"corrupt shard ({e})") from e

        def need(key: str) -> np.ndarray:
            if key not in a:
                raise InputError(path, f"corrupt shard (array {key!r} missing)")
            return a[key]

        def text(name: str) -> list[str | None]:
            values = _unpack_text(
                need(f"{name}_utf8"), need(f"{name}_offsets"), need(f"{name}_present")
            )
            if len(values) != n:
                raise InputError(path, f"corrupt shard ({name} has {len(values)} rows, not {n})")
            return values

        counts, tokens, present, token_ids, weights = {}, {}, {}, {}, {}
        for phase in PHASES:
            if f"{phase}_counts" not in a:
                continue
            counts[phase] = a[f"{phase}_counts"]
            if counts[phase].shape != (n, m.num_moe_layers, m.num_experts):
                raise InputError(
                    path,
                    f"corrupt shard ({phase} counts have shape {counts[phase].shape}, "
                    f"expected {(n, m.num_moe_layers, m.num_experts)})",
                )
            tokens[phase] = need(f"{phase}_tokens")
            present[phase] = need(f"{phase}_present")
            if f"{phase}_token_ids" in a:
                token_ids[phase] = (a[f"{phase}_token_ids"], need(f"{phase}_token_offsets"))
                if f"{phase}_gate_weights" in a:
                    weights[phase] = a[f"{phase}_gate_weights"]
        return TraceBatch(
            request_ids=[r or "" for r in text("request_id")],
            labels=text("label"),
            prompts=text("prompt"),
            counts=counts,
            tokens=tokens,
            present=present,
            token_ids=token_ids,
            gate_weights=weights,
            dp_rank=need("dp_rank"),
            arrival_s=need("arrival_s"),
            finish_s=need("finish_s"),
        )

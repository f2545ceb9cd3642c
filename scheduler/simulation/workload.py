"""Simulator requests from a trace store: real routed expert ids per request and phase."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scheduler.errors import InputError
from scheduler.traces.store import TraceSet, expert_counts


@dataclass(frozen=True)
class Workload:
    """Requests to replay, their tokens packed back to back.

    ``token_ids [tokens, moe_layers, top_k]``: request i's prefill tokens at
    ``offset[i] : offset[i] + prefill[i]``, then its decode tokens (``decode[i]`` of them).
    ``labels``: the trace label (None if unlabelled); ``arrival_s [requests]``: the trace
    timestamps (nan where absent). ``histogram [requests, layers, experts]``: counts of
    each request's prefill tokens (its decode tokens when it has no prefill), what a
    predictor would see at routing time. ``split_phase``: requests whose single recorded
    phase was split in two (see :func:`load_workload`).
    """

    request_ids: list[str]
    labels: list[str | None]
    token_ids: np.ndarray
    offset: np.ndarray
    prefill: np.ndarray
    decode: np.ndarray
    arrival_s: np.ndarray
    histogram: np.ndarray
    split_phase: int

    def __len__(self) -> int:
        return len(self.request_ids)

    def select(self, index: np.ndarray) -> Workload:
        """The requests ``index [n]`` in that order (tokens re-packed)."""
        index = np.asarray(index, dtype=np.int64)
        lengths = self.prefill[index] + self.decode[index]
        starts = self.offset[index]
        offset = np.concatenate([[0], np.cumsum(lengths)])[:-1]
        gather = np.repeat(starts - offset, lengths) + np.arange(int(lengths.sum()))
        return Workload(
            [self.request_ids[i] for i in index],
            [self.labels[i] for i in index],
            self.token_ids[gather],
            offset,
            self.prefill[index],
            self.decode[index],
            self.arrival_s[index],
            self.histogram[index],
            self.split_phase,
        )


def load_workload(traces: TraceSet, *, split_one_phase: bool = True) -> Workload:
    """Every request of ``traces`` that has token-level expert ids.

    A request with both ``prefill`` and ``decode`` ids replays them as recorded. A request
    with one phase only (e.g. ESFT's teacher-forced sequences, stored as ``prefill`` with
    the prompt/answer boundary unmarked) is split when ``split_one_phase``: its first ``ceil(n /
    2)`` tokens are the prefill, the rest its decode steps. That split is a proxy, not a
    recorded one. Without it all its tokens are its prefill (no decode).
    """
    if not traces.has_token_ids:
        raise InputError(traces.path, "no token-level expert ids; the simulator needs them")
    ids: list[np.ndarray] = []
    request_ids: list[str] = []
    labels: list[str | None] = []
    prefill: list[int] = []
    decode: list[int] = []
    arrival: list[float] = []
    split = 0
    for record in traces.records():
        phases = {k: v for k, v in record.token_ids.items() if len(v)}
        if not phases:
            continue
        if "prefill" in phases and "decode" in phases:
            pre, dec = phases["prefill"], phases["decode"]
        elif not split_one_phase:
            pre = np.concatenate(list(phases.values()))
            dec = pre[:0]
        else:
            only = np.concatenate(list(phases.values()))
            cut = (len(only) + 1) // 2
            pre, dec = only[:cut], only[cut:]
            split += 1
        ids += [pre, dec]
        request_ids.append(record.request_id)
        labels.append(record.label)
        prefill.append(len(pre))
        decode.append(len(dec))
        arrival.append(np.nan if record.arrival_s is None else float(record.arrival_s))
    if not request_ids:
        raise InputError(traces.path, "no request has token-level expert ids")
    pre_n, dec_n = np.array(prefill, dtype=np.int64), np.array(decode, dtype=np.int64)
    token_ids = np.concatenate(ids).astype(np.int16)
    offset = np.concatenate([[0], np.cumsum(pre_n + dec_n)])[:-1]
    experts = traces.model.num_experts
    histogram = np.stack(
        [
            expert_counts(token_ids[o : o + (p if p else d)], experts)
            for o, p, d in zip(offset, pre_n, dec_n, strict=True)
        ]
    )
    return Workload(
        request_ids,
        labels,
        token_ids,
        offset,
        pre_n,
        dec_n,
        np.array(arrival, dtype=np.float64),
        histogram,
        split,
    )

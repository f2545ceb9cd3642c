"""Feedback from finished requests: the observations the telemetry worker measured from
SGLang's routed experts (``telemetry.py``) summed into locality totals, a per-class
workload profile for the next placement, and (prompt, predicted class, measured
routing) rows for the predictors' training (``fit --pairs``; the row format is
:mod:`scheduler.prediction.pair_buffer`).

Pure except :func:`write`, which writes ``profile.json`` and ``buffer.jsonl``
(owner-only: the buffer holds users' prompts).
"""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from scheduler.jsonio import write_json_atomic
from scheduler.prediction.pair_buffer import encode_routing
from scheduler.profile import ClassProfile, WorkloadProfile
from scheduler.server.cluster import ClusterState
from scheduler.server.telemetry import Observation

#: Class name for requests routed without a predicted class.
UNCLASSIFIED = "unclassified"


class Feedback:
    def __init__(self, cluster: ClusterState, buffer_size: int = 10_000) -> None:
        self.cluster = cluster
        self.token_layers = 0
        self.remote_hits = 0
        self.inter_node_bytes = 0
        self.tokens = 0
        self.prediction_checks = 0
        self.prediction_hits = 0
        self._counts: dict[str, dict[str, np.ndarray]] = {}
        self._requests: dict[str, int] = {}
        self._tokens: dict[str, dict[str, int]] = {}
        self.buffer: deque[dict[str, Any]] = deque(maxlen=buffer_size)

    def record(
        self,
        obs: Observation,
        cls: str | None,
        rank: int,
        prompt: str,
        predicted: bool,
        count_request: bool = True,
    ) -> None:
        """Add ``obs`` of a request of class ``cls`` run on fleet rank ``rank``;
        ``predicted``: the rank was chosen from a prediction (counts towards the hit
        rate); ``count_request``: False for the second leg of a disaggregated request."""
        self.token_layers += obs.token_layers
        self.remote_hits += obs.remote_hits
        self.inter_node_bytes += obs.inter_node_bytes
        if predicted:
            self.prediction_checks += 1
            self.prediction_hits += int(
                obs.best_node == rank // self.cluster.topology.gpus_per_node
            )
        name = cls or UNCLASSIFIED
        counts = self._counts.setdefault(name, {})
        tokens = self._tokens.setdefault(name, {})
        for phase, arr in (("prefill", obs.prefill), ("decode", obs.decode)):
            n = int(arr.sum()) // self.cluster.model.top_k // self.cluster.model.num_moe_layers
            if n:
                counts[phase] = counts.get(phase, 0) + arr
                tokens[phase] = tokens.get(phase, 0) + n
                self.tokens += n
        self._requests[name] = self._requests.get(name, 0) + int(count_request)
        if prompt:
            # "class": what the request was routed as (predicted); "routing": what its
            # routed experts measured (the decode side, else the prompt's).
            phase = "decode" if obs.decode.sum() > 0 else "prefill"
            measured = obs.decode if phase == "decode" else obs.prefill
            routing = encode_routing(measured, phase) if measured.sum() > 0 else None
            self.buffer.append({"prompt": prompt, "class": name, "routing": routing})

    @property
    def prediction_hit_rate(self) -> float:
        return self.prediction_hits / self.prediction_checks if self.prediction_checks else 0.0

    def profile(self) -> WorkloadProfile | None:
        """Per-class profile of everything observed (None before the first observation)."""
        total = sum(self._requests.values())
        classes = {
            name: ClassProfile(
                weight=self._requests[name] / total,
                counts={p: np.asarray(a, dtype=np.float64) for p, a in counts.items()},
                requests=self._requests[name],
                tokens=dict(self._tokens[name]),
            )
            for name, counts in self._counts.items()
            if counts
        }
        if not classes:
            return None
        return WorkloadProfile(
            self.cluster.model,
            classes,
            source={
                "generator": "moe-scheduler serve (feedback)",
                "placement_version": self.cluster.version,
                "requests": total,
                "note": "routed experts returned by SGLang for requests this server ran",
            },
        )

    def snapshot(self) -> tuple[WorkloadProfile | None, list[dict[str, Any]]]:
        """What :func:`write` writes, taken at once (cheap: the per-class arrays are
        replaced, never changed in place, so the snapshot stays as it was)."""
        return self.profile(), list(self.buffer)


def write(directory: Path, profile: WorkloadProfile | None, rows: list[dict[str, Any]]) -> None:
    """Write ``profile.json`` and ``buffer.jsonl`` into ``directory`` (atomically; the
    buffer owner-only). Runs in a thread on the server: serialising is the slow part."""
    directory.mkdir(parents=True, exist_ok=True)
    if profile is not None:
        write_json_atomic(directory / "profile.json", profile.to_json())
    else:  # nothing observed under this placement yet: no stale profile of another
        (directory / "profile.json").unlink(missing_ok=True)
    tmp = directory / f".buffer.jsonl.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, directory / "buffer.jsonl")

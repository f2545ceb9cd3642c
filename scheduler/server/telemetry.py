"""The learning path, apart from serving: routed experts decoded and accounted in a
worker process (or thread) behind a bounded queue, asked of SGLang only as often as a
CPU budget allows.

- :func:`measure` is the pure accounting of one request (base64 bytes in, an
  :class:`Observation` out); :class:`TelemetryWorker` runs it off the serving loop.
  When ``max_pending`` requests are already waiting the new one is dropped and counted,
  never the request it came with.
- :class:`RoutedSampler` decides per request whether to ask SGLang for routed experts
  (``return_routed_experts``): the same share of every request, as large as
  ``budget_cores`` (a share of one core) allows at the recent demand, with the cost per
  routed id learned from what the worker measured.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import multiprocessing
import random
import time
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

from scheduler.accounting import account
from scheduler.model_shape import ModelShape
from scheduler.placement.placement import Placement
from scheduler.placement.topology import Topology
from scheduler.traces.importers.sglang_generate import decode_routed_experts

log = logging.getLogger("moe_scheduler.server")

WORKER_KINDS = ("process", "thread")


@dataclass(frozen=True)
class MeasureContext:
    """What the accounting of one request needs (picklable, sent to the worker once)."""

    model: ModelShape
    topology: Topology
    placement: Placement
    dest_gpu: np.ndarray
    node_present: np.ndarray  # [moe_layers * experts, nodes]


@dataclass(frozen=True)
class Observation:
    """One finished request's measured locality."""

    token_layers: int
    remote_hits: int
    inter_node_bytes: int
    local_fraction: float
    best_node: int
    prefill: np.ndarray  # [moe_layers, experts] counts of the prompt's tokens
    decode: np.ndarray  # [moe_layers, experts] counts of generated tokens
    #: CPU seconds the measurement took (thread or process time of the worker).
    cpu_seconds: float = 0.0


#: Which rows of a response's routed experts a measurement keeps: all of them (a mixed
#: instance ran both phases), the prompt's (a prefill instance's leg) or the generated
#: tokens' (a decode instance's leg, whose prompt rows another instance computed).
PHASES = ("all", "prefill", "decode")


def measure(
    ctx: MeasureContext, encoded: bytes | str, rank: int, prompt_tokens: int, phase: str = "all"
) -> Observation:
    """Account one request's routed experts served on fleet rank ``rank`` (the rows of
    ``phase``); ValueError if malformed."""
    started = time.thread_time()
    model = ctx.model
    ids = decode_routed_experts(encoded, model)[:, list(model.moe_layer_ids), :]
    if phase == "prefill":
        ids = ids[:prompt_tokens]
    elif phase == "decode":
        ids, prompt_tokens = ids[prompt_tokens:], 0
    if ids.size and (ids.max() >= model.num_experts or ids.min() < 0):
        raise ValueError("routed_experts holds expert ids outside the model's range")
    acc = account(
        ctx.placement, ctx.topology, model, np.full(len(ids), rank), ids, dest_gpu=ctx.dest_gpu
    )
    layers, experts = model.num_moe_layers, model.num_experts
    flat = ids + (np.arange(layers, dtype=np.int32) * experts)[None, :, None]
    split = min(prompt_tokens, len(ids))
    prefill = np.bincount(flat[:split].ravel(), minlength=layers * experts)
    decode = np.bincount(flat[split:].ravel(), minlength=layers * experts)
    node_hits = (prefill + decode) @ ctx.node_present
    total = float((prefill + decode).sum())
    node = rank // ctx.topology.gpus_per_node
    return Observation(
        token_layers=acc.token_layers,
        remote_hits=acc.remote_hits,
        inter_node_bytes=acc.inter_node_bytes,
        local_fraction=float(node_hits[node] / total) if total else 1.0,
        best_node=int(np.argmax(node_hits)),
        prefill=prefill.reshape(layers, experts),
        decode=decode.reshape(layers, experts),
        cpu_seconds=time.thread_time() - started,
    )


# The worker process's context, set once by its initializer.
_CTX: MeasureContext | None = None


def _init_worker(ctx: MeasureContext) -> None:
    global _CTX
    _CTX = ctx


def _measure_in_worker(encoded: bytes, rank: int, prompt_tokens: int, phase: str) -> Observation:
    assert _CTX is not None, "worker not initialised"
    return measure(_CTX, encoded, rank, prompt_tokens, phase)


class TelemetryWorker:
    """Runs :func:`measure` off the loop; at most ``max_pending`` requests wait."""

    def __init__(self, ctx: MeasureContext, kind: str = "process", max_pending: int = 64) -> None:
        if kind not in WORKER_KINDS:
            raise ValueError(f"worker kind must be one of {WORKER_KINDS}, got {kind!r}")
        self.ctx, self.kind, self.max_pending = ctx, kind, max_pending
        self.pending = 0
        self.dropped = 0
        self.failed = 0
        self.accounted = 0
        self._executor = self._new_executor()

    def _new_executor(self) -> concurrent.futures.Executor:
        if self.kind == "thread":
            return concurrent.futures.ThreadPoolExecutor(1, "telemetry")
        mp = multiprocessing.get_context("forkserver")
        mp.set_forkserver_preload(["scheduler.server.telemetry"])
        return concurrent.futures.ProcessPoolExecutor(
            1, mp_context=mp, initializer=_init_worker, initargs=(self.ctx,)
        )

    def submit(
        self, encoded: bytes, rank: int, prompt_tokens: int, phase: str = "all"
    ) -> asyncio.Future[Any] | None:
        """The future :class:`Observation`, or None when the queue is full (counted)."""
        if self.pending >= self.max_pending:
            self.dropped += 1
            return None
        try:
            if self.kind == "thread":
                future = self._executor.submit(
                    measure, self.ctx, encoded, rank, prompt_tokens, phase
                )
            else:
                future = self._executor.submit(
                    _measure_in_worker, encoded, rank, prompt_tokens, phase
                )
        except (BrokenProcessPool, RuntimeError) as e:
            log.warning("telemetry worker unusable (%s); starting a new one", e)
            self.dropped += 1
            self._restart()
            return None
        self.pending += 1
        wrapped = asyncio.wrap_future(future)
        wrapped.add_done_callback(self._done)
        return wrapped

    def _done(self, future: asyncio.Future[Any]) -> None:
        self.pending -= 1
        if future.cancelled():
            return
        error = future.exception()
        if error is None:
            self.accounted += 1
        elif isinstance(error, ValueError):
            self.failed += 1
        else:
            self.failed += 1
            log.warning("telemetry worker failed (%r); starting a new one", error)
            if isinstance(error, BrokenProcessPool):
                self._restart()

    def _restart(self) -> None:
        old = self._executor
        self._executor = self._new_executor()
        old.shutdown(wait=False, cancel_futures=True)

    def warm(self) -> None:
        """Start the worker now (blocking; call from a thread), not at the first request."""
        self._executor.submit(int).result(timeout=120)

    def close(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=True)


class RoutedSampler:
    """Whether to ask for a request's routed experts, within ``budget_cores`` of CPU.

    The share asked for is the same for every request, whatever its size (a sample
    that favoured cheap requests would bias the statistics towards short ones): at most
    ``fraction``, and at most what the budget allows at the recent demand, the CPU
    seconds per second that accounting every request would take (requests over the last
    second or so, each at its expected cost), computed before the request is seen and
    drawn at random (seeded). ``budget_cores`` 0: no CPU limit.
    """

    #: CPU seconds per routed (token, hidden layer, k) entry before the first measurement
    #: (measured on the development machine: 44-67 ns for a top-1 128-expert model and
    #: DeepSeek-V3 at 2,048-16,384 tokens: decoding, accounting and the histograms).
    INITIAL_COST = 60e-9
    #: Seconds over which the demand is summed (exponential decay).
    WINDOW_S = 1.0

    def __init__(self, budget_cores: float, fraction: float = 1.0, seed: int = 0) -> None:
        self.budget_cores = budget_cores
        self.fraction = fraction
        self.cost_per_entry = self.INITIAL_COST
        self._demand = 0.0
        self._random = random.Random(seed)
        self._last = time.monotonic()
        self.asked = 0
        self.seen = 0

    def want(self, entries: int) -> bool:
        """One request with about ``entries`` routed ids (tokens x layers x top_k)."""
        self.seen += 1
        share = self.fraction
        if self.budget_cores > 0:  # the demand before this request: its size has no say
            now = time.monotonic()
            self._demand *= math.exp(-(now - self._last) / self.WINDOW_S)
            self._last = now
            if self._demand > 0:
                share = min(share, self.budget_cores / self._demand)
            self._demand += entries * self.cost_per_entry / self.WINDOW_S
        if share >= 1.0 or self._random.random() < share:
            self.asked += 1
            return True
        return False

    def observe(self, cpu_seconds: float, entries: int) -> None:
        """What one measurement cost (EWMA of the cost per entry)."""
        if entries > 0 and cpu_seconds > 0:
            self.cost_per_entry = 0.8 * self.cost_per_entry + 0.2 * cpu_seconds / entries

    @property
    def share(self) -> float:
        return self.asked / self.seen if self.seen else 0.0

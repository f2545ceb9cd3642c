"""Discrete-time replay: requests arrive, a routing policy assigns DP ranks under a
per-rank capacity, and every step is accounted and timed with the shared accounting.

One step = one forward pass of every running request: a request's first step processes
all its prompt tokens (prefill), each later step one decode token. Per step, the tokens'
real routed experts and ranks go through :func:`~scheduler.accounting.account`, and the
clock advances by the step's modelled MoE time (``moe_layers x`` the
:meth:`~scheduler.accounting.CostModel.padded_layer_time`: each layer's all-to-all padded
to that layer's busiest rank); attention and dense layers are not modelled, so
latencies are comparable between policies, not absolute.

Admission is the server dispatcher's own routine (:class:`scheduler.policies.Admission`
with ``window_ms`` and ``max_window``): a decision is due when the oldest queued request
has waited ``window_ms`` or ``max_window`` requests are queued (at once with
``window_ms = 0``, the default). With ``window_ms = 0`` the queue is decided head first,
one request at a time through :meth:`~scheduler.policies.RoutingPolicy.choose_rank`,
until the policy answers None (strict FIFO); with ``window_ms > 0`` the first
``max_window`` requests, oldest first, go to
:meth:`~scheduler.policies.RoutingPolicy.choose_ranks` together, and those answered None
stay queued, in order. As in the server, a decision that assigned someone is followed at
once by another while the rest is due, and after one that assigned nobody the next waits
for a change (an arrival or a request finishing). What differs from the server is only
the clock and the backend: the clock is modelled, arrivals join the queue and decisions
are made between steps, and an idle cluster's clock jumps to the next arrival or due
time.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np

from scheduler.accounting import CostModel, LayerTime, account, static_dispatch_table
from scheduler.accounting.metrics import (
    Accounting,
    bytes_per_copy,
    locality_codes,
    max_over_mean,
)
from scheduler.model_shape import ModelShape
from scheduler.placement.placement import Placement
from scheduler.placement.topology import Topology
from scheduler.policies.admission import Admission
from scheduler.policies.base import RankState, RequestInfo, RoutingPolicy
from scheduler.simulation.workload import Workload


@dataclass(frozen=True)
class SimulationConfig:
    """``capacity``: max running requests per rank. ``rate``: Poisson arrivals per second
    (None: the trace's ``arrival_s`` when every request has one, else all at time 0).
    ``seed``: arrival order (shuffled unless trace timestamps are used) and gaps.
    ``window_ms``: scheduling window (0: every request decided alone, FIFO; see the
    module docstring); ``max_window``: the most requests decided together (the server's
    ``policy.max_window``)."""

    capacity: int = 8
    rate: float | None = None
    seed: int = 0
    window_ms: float = 0.0
    max_window: int = 256

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if not (self.window_ms >= 0 and math.isfinite(self.window_ms)):
            raise ValueError(f"window-ms must be >= 0, got {self.window_ms}")
        if self.max_window < 1:
            raise ValueError(f"max-window must be >= 1, got {self.max_window}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")


@dataclass(frozen=True)
class SimulationSummary:
    """What a replay measured. Per token-layer ratios are over all accounted tokens;
    ``*_bytes_*`` are the busiest rank's inter-node bytes per step (dispatch + combine,
    summed over MoE layers); times are modelled (MoE layers only; ``weight_read_us_mean``
    is the busiest GPU's expert weight-read time per layer and step,
    ``distinct_experts_per_gpu_step_mean`` the distinct experts a GPU serves per layer and
    step). ``gpu_load_imbalance_*``:
    per layer, max / mean over GPUs of the (token, expert) pairs of the whole run, mean
    and worst over layers; ``rank_token_imbalance``: max / mean tokens per DP rank over
    the run; ``rank_load_imbalance_mean``: max / mean running requests, mean over steps."""

    policy: str
    arrivals: str
    requests: int
    steps: int
    tokens: int
    token_layers: int
    remote_hits: int
    remote_hits_per_token_layer: float
    node_copies: int
    node_copies_per_token_layer: float
    inter_node_bytes: int
    max_rank_inter_node_bytes_mean: float
    max_rank_inter_node_bytes_p99: float
    step_time_us_mean: float
    moe_layer_time_us_mean: float
    weight_read_us_mean: float
    distinct_experts_per_gpu_step_mean: float
    rank_load_imbalance_mean: float
    rank_token_imbalance: float
    gpu_load_imbalance_mean: float
    gpu_load_imbalance_worst: float
    window_ms: float
    max_window: int
    latency_s_p50: float
    latency_s_p99: float
    queue_wait_s_mean: float
    queue_wait_s_p99: float
    makespan_s: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class SimulationResult:
    """The summary, and per request ``[requests]``: arrival, start and finish times (s),
    rank, tokens accounted and how many times it finished (1 each). ``policy_seconds``:
    wall-clock time spent in the policy's decisions (measured, so not in the summary,
    which is deterministic), over ``decisions`` calls."""

    summary: SimulationSummary
    arrival_s: np.ndarray
    start_s: np.ndarray
    finish_s: np.ndarray
    rank: np.ndarray
    tokens: np.ndarray
    finished: np.ndarray
    policy_seconds: float = 0.0
    decisions: int = 0
    decision_seconds: list[float] = field(default_factory=list)


def arrival_times(
    workload: Workload, config: SimulationConfig
) -> tuple[np.ndarray, str, np.ndarray]:
    """(arrival_s [requests], how, order [requests]): the replay order and its times."""
    n = len(workload)
    rng = np.random.default_rng(config.seed)
    if config.rate is None and n and not np.isnan(workload.arrival_s).any():
        order = np.argsort(workload.arrival_s, kind="stable")
        times = workload.arrival_s[order] - workload.arrival_s[order[0]]
        return times, "trace", order
    order = rng.permutation(n)
    if config.rate is None:
        return np.zeros(n), "all at 0", order
    gaps = rng.exponential(1.0 / config.rate, size=n)
    return np.cumsum(gaps) - gaps[0], f"poisson {config.rate:g}/s", order


def simulate(
    workload: Workload,
    policy: RoutingPolicy,
    placement: Placement,
    topology: Topology,
    model: ModelShape,
    config: SimulationConfig,
    cost: CostModel | None = None,
) -> SimulationResult:
    """Replay ``workload`` (re-ordered by arrival) under ``policy``; see the module doc."""
    replay = _Replay(workload, policy, placement, topology, model, config, cost)
    replay.run()
    return replay.result()


@dataclass
class _StepTotals:
    """What every accounted step adds up: run totals and one entry per step."""

    gpu_load: np.ndarray  # [layers, gpus] (token, expert) pairs
    rank_tokens: np.ndarray  # [ranks]
    remote_hits: int = 0
    node_copies: int = 0
    token_layers: int = 0
    max_rank_bytes: list[float] = field(default_factory=list)
    step_us: list[float] = field(default_factory=list)
    layer_us: list[float] = field(default_factory=list)
    weight_us: list[float] = field(default_factory=list)
    distinct: list[float] = field(default_factory=list)
    rank_imbalance: list[float] = field(default_factory=list)

    def add(self, acc: Accounting, layer: LayerTime, moe_layers: int, running: np.ndarray) -> None:
        """One step: its accounting, its modelled layer time and the running requests."""
        self.remote_hits += acc.remote_hits
        self.node_copies += acc.node_copies
        self.token_layers += acc.token_layers
        self.gpu_load += acc.gpu_load
        self.rank_tokens += acc.rank_tokens
        self.max_rank_bytes.append(float(acc.max_rank_inter_node_bytes))
        self.step_us.append(layer.total_us * moe_layers)
        self.layer_us.append(layer.total_us)
        self.weight_us.append(layer.weight_read_us)
        self.distinct.append(float(acc.gpu_distinct_experts.mean()))
        self.rank_imbalance.append(float(running.max() / running.mean()))


class _Replay:
    """One replay's state, requests in replay (arrival) order: :meth:`run` advances it
    to the end, :meth:`result` reports it in the workload's own order."""

    def __init__(
        self,
        workload: Workload,
        policy: RoutingPolicy,
        placement: Placement,
        topology: Topology,
        model: ModelShape,
        config: SimulationConfig,
        cost: CostModel | None,
    ) -> None:
        self.policy, self.placement, self.model, self.config = policy, placement, model, config
        self.topology = topology
        self.cost = cost or CostModel.from_topology(topology)
        self.times, self.arrivals, self.order = arrival_times(workload, config)
        self.work = work = workload.select(self.order)
        n, ranks_n = len(work), topology.num_gpus
        self.dest_gpu = static_dispatch_table(placement)
        self.codes = locality_codes(self.dest_gpu, topology.gpus_per_node)
        self.infos = [
            RequestInfo(rid, label, hist, int(p))
            for rid, label, hist, p in zip(
                work.request_ids, work.labels, work.histogram, work.prefill, strict=True
            )
        ]
        self.has_prefill = (work.prefill > 0).astype(np.int64)
        self.total_steps = self.has_prefill + work.decode  # steps each request runs
        # per request
        self.start = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.rank_of = np.full(n, -1, dtype=np.int64)
        self.tokens_done = np.zeros(n, dtype=np.int64)
        self.finished = np.zeros(n, dtype=np.int64)
        # the cluster and the queue
        self.running = np.zeros(ranks_n, dtype=np.int64)  # running requests per rank
        self.queue: deque[int] = deque()
        self.run_req = np.zeros(0, dtype=np.int64)  # running requests, their positions
        self.run_pos = np.zeros(0, dtype=np.int64)  # (steps done)
        self.clock, self.next_arrival = 0.0, 0
        self.admission = Admission(config.window_ms / 1e3, config.max_window)
        self.changed = False  # an arrival or a finish since a decision that assigned nobody
        self.totals = _StepTotals(
            gpu_load=np.zeros((placement.num_layers, ranks_n), dtype=np.int64),
            rank_tokens=np.zeros(ranks_n, dtype=np.int64),
        )
        self.decision_s: list[float] = []

    def run(self) -> None:
        """Admit, step and finish requests until every one has finished."""
        while self.next_arrival < len(self.work) or self.queue or self.run_req.size:
            if not self.run_req.size:
                self._skip_idle_time()
            admitted = self._admit_arrivals()
            admitted += self._decide_queue()
            if admitted:
                self.run_req = np.concatenate([self.run_req, admitted])
                self.run_pos = np.concatenate([self.run_pos, np.zeros(len(admitted), np.int64)])
            if not self.run_req.size:
                if self.queue and not self.changed:
                    raise AssertionError(
                        f"policy {self.policy.name} refused a request with every rank idle"
                    )
                continue  # idle until the next arrival or due time
            self._step()
            self._finish_done()

    # --- admission

    def _due(self) -> float:
        return self.admission.due(float(self.times[self.queue[0]]), len(self.queue))

    def _decide(self, window: list[int]) -> list[int | None]:
        """One admission decision for the requests ``window`` (timed)."""
        state = RankState(
            self.running.copy(),
            np.zeros(self.topology.num_gpus, np.int64),
            self.config.capacity,
            self.topology.gpus_per_node,
        )
        tic = time.perf_counter()
        ranks = self.admission.decide(self.policy, [self.infos[i] for i in window], state)
        self.decision_s.append(time.perf_counter() - tic)
        return ranks

    def _assign(self, i: int, rank: int) -> None:
        self.rank_of[i], self.start[i] = rank, self.clock
        self.running[rank] += 1

    def _skip_idle_time(self) -> None:
        """Idle: the clock jumps to the next arrival or the queue's due time."""
        n = len(self.work)
        wake = float(self.times[self.next_arrival]) if self.next_arrival < n else math.inf
        if self.queue and self.changed:
            wake = min(wake, self._due())
        self.clock = max(self.clock, wake)

    def _admit_arrivals(self) -> list[int]:
        """Requests that have arrived by now join the queue; returns those the server's
        fast path (Dispatcher.try_acquire) assigns at once: an arrival that finds no
        queue is decided on its own."""
        admitted: list[int] = []
        n = len(self.work)
        while self.next_arrival < n and self.times[self.next_arrival] <= self.clock:
            i, self.next_arrival = self.next_arrival, self.next_arrival + 1
            if not self.queue and self.admission.immediate(1):
                rank = self._decide([i])[0]
                if rank is not None:
                    self._assign(i, rank)
                    admitted.append(i)
                    continue
            self.queue.append(i)
            self.changed = True
        return admitted

    def _decide_queue(self) -> list[int]:
        """Admission decisions on the queue while one is due, another at once while it
        assigns; returns the requests assigned, in order."""
        admitted: list[int] = []
        queue = self.queue
        while queue and self.changed and self._due() <= self.clock:
            window = list(itertools.islice(queue, self.admission.max_window))
            ranks = self._decide(window)
            kept = [i for i, rank in zip(window, ranks, strict=True) if rank is None]
            if len(kept) == len(window):
                self.changed = False  # nobody assigned: wait for an arrival or a finish
                break
            for i, rank in zip(window, ranks, strict=True):
                if rank is not None:
                    self._assign(i, rank)
                    admitted.append(i)
            for _ in window:
                queue.popleft()
            queue.extendleft(reversed(kept))  # refused ones stay queued, in order
        return admitted

    # --- one step

    def _step(self) -> None:
        """One forward pass of every running request: account its tokens, advance the
        clock by its modelled MoE time."""
        model, run_req = self.model, self.run_req
        lengths, token_index = _step_tokens(self.work, run_req, self.run_pos, self.has_prefill)
        token_rank = np.repeat(self.rank_of[run_req], lengths)
        acc = account(
            self.placement,
            self.topology,
            model,
            token_rank,
            self.work.token_ids[token_index],
            dest_gpu=self.dest_gpu,
            codes=self.codes,
            per_layer=True,
        )
        layer = self.cost.padded_layer_time(acc, model)
        self.totals.add(acc, layer, model.num_moe_layers, self.running)
        np.add.at(self.tokens_done, run_req, lengths)
        self.clock += layer.total_us * model.num_moe_layers / 1e6

    def _finish_done(self) -> None:
        """Advance every running request one step; those done leave their rank."""
        self.run_pos += 1
        done = self.run_pos >= self.total_steps[self.run_req]
        for i in self.run_req[done]:
            self.finish[i] = self.clock
            self.finished[i] += 1
            self.running[self.rank_of[i]] -= 1
            self.policy.on_finish(self.infos[i], int(self.rank_of[i]))
            self.changed = True
        self.run_req, self.run_pos = self.run_req[~done], self.run_pos[~done]

    # --- the result

    def result(self) -> SimulationResult:
        """The summary and the per-request arrays, back in the workload's own order."""
        n = len(self.work)
        inverse = np.empty_like(self.order)
        inverse[self.order] = np.arange(n)
        return SimulationResult(
            self._summary(),
            self.times[inverse],
            self.start[inverse],
            self.finish[inverse],
            self.rank_of[inverse],
            self.tokens_done[inverse],
            self.finished[inverse],
            policy_seconds=float(sum(self.decision_s)),
            decisions=len(self.decision_s),
            decision_seconds=self.decision_s,
        )

    def _summary(self) -> SimulationSummary:
        t, config = self.totals, self.config
        latency = self.finish - self.times
        wait = self.start - self.times
        size = bytes_per_copy(self.model.hidden_size)
        imbalance = max_over_mean(t.gpu_load.astype(np.float64))
        imbalance = imbalance[~np.isnan(imbalance)]
        token_layers = t.token_layers
        return SimulationSummary(
            policy=self.policy.name,
            arrivals=self.arrivals,
            requests=len(self.work),
            steps=len(t.step_us),
            tokens=int(self.tokens_done.sum()),
            token_layers=token_layers,
            remote_hits=t.remote_hits,
            remote_hits_per_token_layer=t.remote_hits / token_layers if token_layers else 0.0,
            node_copies=t.node_copies,
            node_copies_per_token_layer=t.node_copies / token_layers if token_layers else 0.0,
            inter_node_bytes=t.node_copies * size.total,
            max_rank_inter_node_bytes_mean=_stat(t.max_rank_bytes, None),
            max_rank_inter_node_bytes_p99=_stat(t.max_rank_bytes, 99),
            step_time_us_mean=_stat(t.step_us, None),
            moe_layer_time_us_mean=_stat(t.layer_us, None),
            weight_read_us_mean=_stat(t.weight_us, None),
            distinct_experts_per_gpu_step_mean=_stat(t.distinct, None),
            rank_load_imbalance_mean=_stat(t.rank_imbalance, None),
            rank_token_imbalance=float(max_over_mean(t.rank_tokens.astype(np.float64))),
            gpu_load_imbalance_mean=float(imbalance.mean()) if imbalance.size else float("nan"),
            gpu_load_imbalance_worst=float(imbalance.max()) if imbalance.size else float("nan"),
            window_ms=config.window_ms,
            max_window=config.max_window,
            latency_s_p50=_stat(latency, 50),
            latency_s_p99=_stat(latency, 99),
            queue_wait_s_mean=_stat(wait, None),
            queue_wait_s_p99=_stat(wait, 99),
            makespan_s=self.clock,
        )


def _step_tokens(
    work: Workload, run_req: np.ndarray, run_pos: np.ndarray, has_prefill: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(lengths [running], token_index [tokens]): this step's tokens of every running
    request, the whole prompt at position 0, else one decode token; indices into
    ``work.token_ids``."""
    in_prefill = (run_pos == 0) & (has_prefill[run_req] == 1)
    lengths = np.where(in_prefill, work.prefill[run_req], 1)
    first = work.offset[run_req] + np.where(
        in_prefill, 0, work.prefill[run_req] + run_pos - has_prefill[run_req]
    )
    cum = np.cumsum(lengths) - lengths
    token_index = np.repeat(first - cum, lengths) + np.arange(int(lengths.sum()))
    return lengths, token_index


def _stat(values: list[float] | np.ndarray, percentile: float | None) -> float:
    """Mean (percentile None) or percentile; nan when empty."""
    a = np.asarray(values, dtype=np.float64)
    if not a.size:
        return float("nan")
    return float(a.mean() if percentile is None else np.percentile(a, percentile))

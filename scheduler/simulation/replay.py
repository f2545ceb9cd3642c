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

from scheduler.accounting import CostModel, account, static_dispatch_table
from scheduler.accounting.metrics import bytes_per_copy, locality_codes, max_over_mean
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
    cost = cost or CostModel.from_topology(topology)
    times, how, order = arrival_times(workload, config)
    work = workload.select(order)
    n, ranks_n, per_node = len(work), topology.num_gpus, topology.gpus_per_node
    dest_gpu = static_dispatch_table(placement)
    codes = locality_codes(dest_gpu, per_node)
    infos = [
        RequestInfo(rid, label, hist, int(p))
        for rid, label, hist, p in zip(
            work.request_ids, work.labels, work.histogram, work.prefill, strict=True
        )
    ]
    has_prefill = (work.prefill > 0).astype(np.int64)
    total_steps = has_prefill + work.decode  # steps each request runs
    start = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    rank_of = np.full(n, -1, dtype=np.int64)
    tokens_done = np.zeros(n, dtype=np.int64)
    finished = np.zeros(n, dtype=np.int64)

    running = np.zeros(ranks_n, dtype=np.int64)
    queue: deque[int] = deque()
    run_req = np.zeros(0, dtype=np.int64)  # running requests, their positions (steps done)
    run_pos = np.zeros(0, dtype=np.int64)
    clock, next_arrival = 0.0, 0
    admission = Admission(config.window_ms / 1e3, config.max_window)
    changed = False  # an arrival or a finish since the last decision that assigned nobody
    step_max_bytes: list[float] = []
    step_us: list[float] = []
    layer_us: list[float] = []
    weight_us: list[float] = []
    distinct: list[float] = []
    rank_imbalance: list[float] = []
    decision_s: list[float] = []
    remote_hits = node_copies = token_layers = 0
    gpu_load = np.zeros((placement.num_layers, ranks_n), dtype=np.int64)
    rank_tokens = np.zeros(ranks_n, dtype=np.int64)

    def due() -> float:
        return admission.due(float(times[queue[0]]), len(queue))

    def decide(window: list[int]) -> list[int | None]:
        """One admission decision for the requests ``window`` (timed)."""
        state = RankState(running.copy(), np.zeros(ranks_n, np.int64), config.capacity, per_node)
        tic = time.perf_counter()
        ranks = admission.decide(policy, [infos[i] for i in window], state)
        decision_s.append(time.perf_counter() - tic)
        return ranks

    while next_arrival < n or queue or run_req.size:
        if not run_req.size:
            # Idle: the clock jumps to the next arrival or the queue's due time.
            wake = float(times[next_arrival]) if next_arrival < n else math.inf
            if queue and changed:
                wake = min(wake, due())
            clock = max(clock, wake)
        admitted: list[int] = []
        while next_arrival < n and times[next_arrival] <= clock:
            i, next_arrival = next_arrival, next_arrival + 1
            if not queue and admission.immediate(1):
                # the server's fast path (Dispatcher.try_acquire): an arrival that finds
                # no queue is decided on its own, at once
                rank = decide([i])[0]
                if rank is not None:
                    rank_of[i], start[i] = rank, clock
                    running[rank] += 1
                    admitted.append(i)
                    continue
            queue.append(i)
            changed = True
        while queue and changed and due() <= clock:
            # One admission decision; another at once while it assigns and the rest is due.
            window = list(itertools.islice(queue, admission.max_window))
            ranks = decide(window)
            kept = [i for i, rank in zip(window, ranks, strict=True) if rank is None]
            if len(kept) == len(window):
                changed = False  # nobody assigned: wait for an arrival or a finish
                break
            for i, rank in zip(window, ranks, strict=True):
                if rank is not None:
                    rank_of[i], start[i] = rank, clock
                    running[rank] += 1
                    admitted.append(i)
            for _ in window:
                queue.popleft()
            queue.extendleft(reversed(kept))  # refused ones stay queued, in order
        if admitted:
            run_req = np.concatenate([run_req, admitted])
            run_pos = np.concatenate([run_pos, np.zeros(len(admitted), np.int64)])

        if not run_req.size:
            if queue and not changed:
                raise AssertionError(f"policy {policy.name} refused a request with every rank idle")
            continue  # idle until the next arrival or due time
        # This step's tokens: the whole prompt at position 0, else one decode token.
        in_prefill = (run_pos == 0) & (has_prefill[run_req] == 1)
        lengths = np.where(in_prefill, work.prefill[run_req], 1)
        first = work.offset[run_req] + np.where(
            in_prefill, 0, work.prefill[run_req] + run_pos - has_prefill[run_req]
        )
        cum = np.cumsum(lengths) - lengths
        token_index = np.repeat(first - cum, lengths) + np.arange(int(lengths.sum()))
        token_rank = np.repeat(rank_of[run_req], lengths)
        acc = account(
            placement,
            topology,
            model,
            token_rank,
            work.token_ids[token_index],
            dest_gpu=dest_gpu,
            codes=codes,
            per_layer=True,
        )
        layer = cost.padded_layer_time(acc, model)
        seconds = layer.total_us * model.num_moe_layers / 1e6
        remote_hits += acc.remote_hits
        node_copies += acc.node_copies
        token_layers += acc.token_layers
        gpu_load += acc.gpu_load
        rank_tokens += acc.rank_tokens
        step_max_bytes.append(float(acc.max_rank_inter_node_bytes))
        step_us.append(layer.total_us * model.num_moe_layers)
        layer_us.append(layer.total_us)
        weight_us.append(layer.weight_read_us)
        distinct.append(float(acc.gpu_distinct_experts.mean()))
        rank_imbalance.append(float(running.max() / running.mean()))
        np.add.at(tokens_done, run_req, lengths)
        clock += seconds

        run_pos += 1
        done = run_pos >= total_steps[run_req]
        for i in run_req[done]:
            finish[i] = clock
            finished[i] += 1
            running[rank_of[i]] -= 1
            policy.on_finish(infos[i], int(rank_of[i]))
            changed = True
        run_req, run_pos = run_req[~done], run_pos[~done]

    latency = finish - times
    wait = start - times
    size = bytes_per_copy(model.hidden_size)
    imbalance = max_over_mean(gpu_load.astype(np.float64))
    imbalance = imbalance[~np.isnan(imbalance)]
    summary = SimulationSummary(
        policy=policy.name,
        arrivals=how,
        requests=n,
        steps=len(step_us),
        tokens=int(tokens_done.sum()),
        token_layers=token_layers,
        remote_hits=remote_hits,
        remote_hits_per_token_layer=remote_hits / token_layers if token_layers else 0.0,
        node_copies=node_copies,
        node_copies_per_token_layer=node_copies / token_layers if token_layers else 0.0,
        inter_node_bytes=node_copies * size.total,
        max_rank_inter_node_bytes_mean=_stat(step_max_bytes, None),
        max_rank_inter_node_bytes_p99=_stat(step_max_bytes, 99),
        step_time_us_mean=_stat(step_us, None),
        moe_layer_time_us_mean=_stat(layer_us, None),
        weight_read_us_mean=_stat(weight_us, None),
        distinct_experts_per_gpu_step_mean=_stat(distinct, None),
        rank_load_imbalance_mean=_stat(rank_imbalance, None),
        rank_token_imbalance=float(max_over_mean(rank_tokens.astype(np.float64))),
        gpu_load_imbalance_mean=float(imbalance.mean()) if imbalance.size else float("nan"),
        gpu_load_imbalance_worst=float(imbalance.max()) if imbalance.size else float("nan"),
        window_ms=config.window_ms,
        max_window=config.max_window,
        latency_s_p50=_stat(latency, 50),
        latency_s_p99=_stat(latency, 99),
        queue_wait_s_mean=_stat(wait, None),
        queue_wait_s_p99=_stat(wait, 99),
        makespan_s=clock,
    )
    inverse = np.empty_like(order)
    inverse[order] = np.arange(n)  # back to the workload's own order
    return SimulationResult(
        summary,
        times[inverse],
        start[inverse],
        finish[inverse],
        rank_of[inverse],
        tokens_done[inverse],
        finished[inverse],
        policy_seconds=float(sum(decision_s)),
        decisions=len(decision_s),
        decision_seconds=decision_s,
    )


def _stat(values: list[float] | np.ndarray, percentile: float | None) -> float:
    """Mean (percentile None) or percentile; nan when empty."""
    a = np.asarray(values, dtype=np.float64)
    if not a.size:
        return float("nan")
    return float(a.mean() if percentile is None else np.percentile(a, percentile))

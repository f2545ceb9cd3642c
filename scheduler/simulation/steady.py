"""Production-size replay: every DP rank kept full, so that bytes, not latency, set the time.

The open-loop replay (:mod:`~scheduler.simulation.replay`) runs a trace as it arrives; at
the sizes of a few hundred held-out requests that leaves a handful of requests per rank,
where the fixed kernel latency hides every placement and policy. Production DP-attention
decode runs 64-256 requests per rank and chunked prefill 4k-16k tokens per rank. This
replay keeps the cluster at that operating point by **resampling**: requests are drawn
from the workload with replacement (each keeps its own real routing), so every figure
it produces is "resampled real" (or resampled synthetic), never a measured trace.

* ``phase = "decode"``: every rank runs ``running_per_rank`` decode requests. At the
  start each slot holds a drawn request at a random position of its decode (the steady
  state, without a warm-up); each step every running request processes one decode
  token; a request that finishes is replaced by the next draw, and the policy chooses
  the replacements' ranks (all of one step in one decision, through
  :meth:`~scheduler.policies.admission.Admission.decide`, the server's admission
  routine, as one joint window) among the ranks
  with a free slot.
* ``phase = "prefill"``: chunked prefill. Each rank owns a FIFO of assigned prompts and
  processes ``prefill_tokens_per_rank`` tokens of it per step, across request
  boundaries (SGLang packs several prompts into one chunk). Ranks whose FIFO holds fewer
  tokens than one chunk take new draws, assigned by the policy one per needy rank per
  round.

Every step's tokens go through :func:`~scheduler.accounting.account` and
:meth:`~scheduler.accounting.CostModel.padded_layer_time`. In decode, which requests run
at which step does not depend on the policy (a decode request advances one token per
step wherever it runs; replacements are drawn in a fixed order), so every policy and
the :class:`StepBound` see the same requests: only their ranks differ. In prefill the
draws are the same but how prompts are cut into chunks depends on their ranks, so each
run's bound is computed on its own steps. A policy
answering None for a replacement (no rank it accepts is free) gets it placed on the
least-loaded free rank instead, counted as ``fallback_assignments``.

Pure numpy; no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from scheduler.accounting import CostModel, account, static_dispatch_table
from scheduler.accounting.metrics import bytes_per_copy, locality_codes, max_over_mean
from scheduler.model_shape import ModelShape
from scheduler.placement.placement import Placement
from scheduler.placement.topology import Topology
from scheduler.policies.admission import Admission
from scheduler.policies.base import RankState, RequestInfo, RoutingPolicy
from scheduler.simulation.workload import Workload

#: The steady replay decides once per step, jointly (any window > 0 means "jointly").
STEP_WINDOW_S = 1.0
Phase = Literal["decode", "prefill"]
PHASES = ("decode", "prefill")


@dataclass(frozen=True)
class SteadyConfig:
    """``steps``: measured steps. ``running_per_rank``: decode requests per rank;
    ``prefill_tokens_per_rank``: prefill chunk per rank and step; ``seed``: the draws."""

    phase: Phase = "decode"
    running_per_rank: int = 128
    prefill_tokens_per_rank: int = 8192
    steps: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if self.running_per_rank < 1:
            raise ValueError(f"running-per-rank must be >= 1, got {self.running_per_rank}")
        if self.prefill_tokens_per_rank < 1:
            raise ValueError(
                f"prefill-tokens-per-rank must be >= 1, got {self.prefill_tokens_per_rank}"
            )
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class SteadySummary:
    """Means over the measured steps (each step: every rank's tokens, accounted together).

    Today's simulate keys: ``moe_layer_time_us_mean`` (per MoE layer, padded to the
    busiest rank / GPU of each layer), ``node_copies_per_token_layer``,
    ``max_rank_inter_node_bytes_mean`` (the busiest rank's inter-node bytes per step,
    over all MoE layers), ``rank_load_imbalance_mean`` (max / mean tokens per rank per
    step), ``gpu_load_imbalance_mean`` (per layer over the run, max / mean over GPUs).
    Added: ``weight_read_us_mean`` / ``flop_us_mean`` (the busiest GPU's, per layer),
    ``distinct_experts_per_gpu_step_mean``, and the split of the layer time into
    ``latency_us_mean`` (fixed kernel latency), ``bytes_us_mean`` (dispatch + combine
    beyond it) and ``expert_us_mean``; ``mean_rank_inter_node_bytes_mean`` (the mean
    rank's). ``bound_*``: :class:`StepBound` of the same steps, when computed.
    """

    policy: str
    phase: str
    resampled: bool
    running_per_rank: int
    prefill_tokens_per_rank: int
    steps: int
    tokens: int
    token_layers: int
    requests_drawn: int
    fallback_assignments: int
    node_copies_per_token_layer: float
    remote_hits_per_token_layer: float
    max_rank_inter_node_bytes_mean: float
    mean_rank_inter_node_bytes_mean: float
    moe_layer_time_us_mean: float
    latency_us_mean: float
    bytes_us_mean: float
    expert_us_mean: float
    weight_read_us_mean: float
    flop_us_mean: float
    distinct_experts_per_gpu_step_mean: float
    rank_load_imbalance_mean: float
    gpu_load_imbalance_mean: float
    gpu_load_imbalance_worst: float
    bound_moe_layer_time_us_mean: float = float("nan")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class _Draws:
    """Requests drawn with replacement, in a fixed order (the same for every policy)."""

    def __init__(self, pool: np.ndarray, seed: int) -> None:
        self.pool = pool
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def take(self, n: int) -> np.ndarray:
        self.count += n
        return self.pool[self.rng.integers(0, self.pool.size, n)]


def _infos(workload: Workload) -> list[RequestInfo]:
    return [
        RequestInfo(rid, label, hist, int(p))
        for rid, label, hist, p in zip(
            workload.request_ids,
            workload.labels,
            workload.histogram,
            workload.prefill,
            strict=True,
        )
    ]


def _assign(
    policy: RoutingPolicy,
    infos: list[RequestInfo],
    requests: np.ndarray,
    running: np.ndarray,
    capacity: int,
    gpus_per_node: int,
) -> tuple[np.ndarray, int]:
    """Ranks for ``requests`` (one decision), the policy's where it answers, the
    least-loaded free rank where it answers None; updates ``running``."""
    state = RankState(running.copy(), np.zeros_like(running), capacity, gpus_per_node)
    window = Admission(window_s=STEP_WINDOW_S, max_window=max(len(requests), 1))
    chosen = window.decide(policy, [infos[i] for i in requests], state)
    ranks = np.empty(len(requests), dtype=np.int64)
    fallback = 0
    for j, rank in enumerate(chosen):
        if rank is None:
            fallback += 1
            free = np.flatnonzero(running < capacity)
            rank = int(free[np.argmin(running[free])])
        ranks[j] = rank
        running[rank] += 1
    return ranks, fallback


def decode_timeline(
    workload: Workload, ranks_n: int, config: SteadyConfig
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """The policy-independent decode timeline: per step, the slots' requests and token
    indices into ``workload.token_ids``, and the slots whose request is new this step
    (to be assigned). Slots are numbered ``0 .. ranks x N - 1``."""
    pool = np.flatnonzero(workload.decode > 0)
    if not pool.size:
        raise ValueError("no request has decode tokens")
    draws = _Draws(pool, config.seed)
    slots = ranks_n * config.running_per_rank
    req = draws.take(slots)
    pos = (draws.rng.random(slots) * workload.decode[req]).astype(np.int64)
    new = np.arange(slots)
    requests, tokens, fresh = [], [], []
    for _ in range(config.steps):
        requests.append(req.copy())
        fresh.append(new)
        tokens.append(workload.offset[req] + workload.prefill[req] + pos)
        pos = pos + 1
        done = np.flatnonzero(pos >= workload.decode[req])
        req[done] = draws.take(done.size)
        pos[done] = 0
        new = done
    return requests, tokens, fresh


def replay_steady(
    workload: Workload,
    policy: RoutingPolicy,
    placement: Placement,
    topology: Topology,
    model: ModelShape,
    config: SteadyConfig,
    cost: CostModel | None = None,
    *,
    bound: bool = False,
) -> SteadySummary:
    """Replay ``workload`` at the operating point of ``config`` (module docstring)."""
    cost = cost or CostModel.from_topology(topology)
    dest_gpu = static_dispatch_table(placement)
    codes = locality_codes(dest_gpu, topology.gpus_per_node)
    if config.phase == "decode":
        steps = _decode_steps(workload, policy, topology, config)
    else:
        steps = _prefill_steps(workload, policy, topology, config)
    acc_sum = _Totals(placement.num_layers, topology.num_gpus)
    step_bound = StepBound(placement, model, cost) if bound else None
    bounds = []
    for token_index, token_rank, drawn, fallback in steps:
        ids = workload.token_ids[token_index]
        acc = account(
            placement,
            topology,
            model,
            token_rank,
            ids,
            dest_gpu=dest_gpu,
            codes=codes,
            per_layer=True,
        )
        acc_sum.add(acc, cost.padded_layer_time(acc, model), drawn, fallback)
        if step_bound is not None:
            bounds.append(step_bound(ids))
    return acc_sum.summary(policy.name, config, model, bounds)


def _decode_steps(
    workload: Workload, policy: RoutingPolicy, topology: Topology, config: SteadyConfig
) -> Iterator[tuple[np.ndarray, np.ndarray, int, int]]:
    """Yields (token indices, their ranks, requests drawn so far, fallbacks) per step."""
    infos = _infos(workload)
    ranks_n, n = topology.num_gpus, config.running_per_rank
    requests, tokens, fresh = decode_timeline(workload, ranks_n, config)
    slot_rank = np.full(ranks_n * n, -1, dtype=np.int64)
    running = np.zeros(ranks_n, dtype=np.int64)
    previous: np.ndarray | None = None
    drawn = 0
    for req, token_index, new in zip(requests, tokens, fresh, strict=True):
        if previous is not None:
            for slot in new:  # finished last step
                rank = int(slot_rank[slot])
                running[rank] -= 1
                policy.on_finish(infos[previous[slot]], rank)
        ranks, fallback = _assign(policy, infos, req[new], running, n, topology.gpus_per_node)
        slot_rank[new] = ranks
        drawn += new.size
        previous = req
        yield token_index, slot_rank.copy(), drawn, fallback


def _prefill_steps(
    workload: Workload, policy: RoutingPolicy, topology: Topology, config: SteadyConfig
) -> Iterator[tuple[np.ndarray, np.ndarray, int, int]]:
    """Chunked prefill: yields (token indices, ranks, drawn, fallbacks) per step."""
    infos = _infos(workload)
    pool = np.flatnonzero(workload.prefill > 0)
    if not pool.size:
        raise ValueError("no request has prefill tokens")
    draws = _Draws(pool, config.seed)
    ranks_n, chunk = topology.num_gpus, config.prefill_tokens_per_rank
    backlog: list[list[tuple[int, int]]] = [[] for _ in range(ranks_n)]  # (request, next pos)
    left = np.zeros(ranks_n, dtype=np.int64)  # prompt tokens queued per rank
    for _ in range(config.steps):
        fallback = 0
        while (needy := left < chunk).any():
            running = np.where(needy, 0, 1).astype(np.int64)
            req = draws.take(int(needy.sum()))
            ranks, fb = _assign(policy, infos, req, running, 1, topology.gpus_per_node)
            fallback += fb
            for i, rank in zip(req.tolist(), ranks.tolist(), strict=True):
                backlog[rank].append((i, 0))
                left[rank] += workload.prefill[i]
        index, owner = [], []
        for rank in range(ranks_n):
            need = chunk
            while need:
                i, pos = backlog[rank][0]
                take = min(need, int(workload.prefill[i]) - pos)
                index.append(workload.offset[i] + pos + np.arange(take))
                owner.append(np.full(take, rank))
                need -= take
                if pos + take == workload.prefill[i]:
                    backlog[rank].pop(0)
                    policy.on_finish(infos[i], rank)
                else:
                    backlog[rank][0] = (i, pos + take)
            left[rank] -= chunk
        yield np.concatenate(index), np.concatenate(owner), draws.count, fallback


class _Totals:
    """Running sums of the per-step figures."""

    def __init__(self, layers: int, gpus: int) -> None:
        self.gpu_load = np.zeros((layers, gpus), dtype=np.int64)
        self.rows: list[tuple[float, ...]] = []
        self.tokens = self.token_layers = self.copies = self.remote = 0
        self.drawn = self.fallback = 0

    def add(self, acc, layer, drawn: int, fallback: int) -> None:  # type: ignore[no-untyped-def]
        self.gpu_load += acc.gpu_load
        self.tokens += int(acc.rank_tokens.sum())
        self.token_layers += acc.token_layers
        self.copies += acc.node_copies
        self.remote += acc.remote_hits
        self.drawn, self.fallback = drawn, self.fallback + fallback
        self.rows.append(
            (
                float(acc.rank_inter_node_bytes.max()),
                float(acc.rank_inter_node_bytes.mean()),
                layer.total_us,
                layer.latency_us,
                layer.bytes_us,
                layer.compute_us,
                layer.weight_read_us,
                layer.flop_us,
                float(acc.gpu_distinct_experts.mean()),
                float(max_over_mean(acc.rank_tokens.astype(np.float64))),
            )
        )

    def summary(
        self, policy: str, config: SteadyConfig, model: ModelShape, bounds: list[float]
    ) -> SteadySummary:
        m = np.asarray(self.rows).mean(axis=0)
        imbalance = max_over_mean(self.gpu_load.astype(np.float64))
        imbalance = imbalance[~np.isnan(imbalance)]
        tl = max(self.token_layers, 1)
        return SteadySummary(
            policy=policy,
            phase=config.phase,
            resampled=True,
            running_per_rank=config.running_per_rank,
            prefill_tokens_per_rank=config.prefill_tokens_per_rank,
            steps=len(self.rows),
            tokens=self.tokens,
            token_layers=self.token_layers,
            requests_drawn=self.drawn,
            fallback_assignments=self.fallback,
            node_copies_per_token_layer=self.copies / tl,
            remote_hits_per_token_layer=self.remote / tl,
            max_rank_inter_node_bytes_mean=float(m[0]),
            mean_rank_inter_node_bytes_mean=float(m[1]),
            moe_layer_time_us_mean=float(m[2]),
            latency_us_mean=float(m[3]),
            bytes_us_mean=float(m[4]),
            expert_us_mean=float(m[5]),
            weight_read_us_mean=float(m[6]),
            flop_us_mean=float(m[7]),
            distinct_experts_per_gpu_step_mean=float(m[8]),
            rank_load_imbalance_mean=float(m[9]),
            gpu_load_imbalance_mean=float(imbalance.mean()) if imbalance.size else float("nan"),
            gpu_load_imbalance_worst=float(imbalance.max()) if imbalance.size else float("nan"),
            bound_moe_layer_time_us_mean=float(np.mean(bounds)) if bounds else float("nan"),
        )


# ---------------------------------------------------------------------- the limit


#: Bit of a bound-table code meaning "several replicas, none on this node".
_LOOSE = np.uint64(1) << np.uint64(63)


class StepBound:
    """A lower bound on the mean modelled MoE-layer time of one step, over **every**
    assignment of its tokens to ranks under ``placement`` (any scheduler, any capacity
    split); call it with the step's ``ids [tokens, layers, top_k]``.

    Per layer: the busiest rank sends at least the mean rank's copies, and each token
    sends at least the copies it needs on the node where it needs fewest: the nodes of
    its experts that have one replica, off that node, and one more node if experts with
    several replicas, none on that node, remain (static dispatch keeps an expert with a
    replica on the node on the node); NVLink copies are bounded by 0. The busiest GPU
    processes at least the pairs and experts pinned to one GPU (experts with one
    replica) and at least the mean over GPUs of all pairs and of the experts used; its
    expert time is at least the roofline of those. Valid, not tight.
    """

    def __init__(self, placement: Placement, model: ModelShape, cost: CostModel) -> None:
        if placement.num_nodes > 63:
            raise ValueError("the bound supports up to 63 nodes")
        self.placement, self.model, self.cost = placement, model, cost
        layers, experts = placement.num_layers, placement.num_experts
        counts = placement.replica_counts()
        gpu_of_expert = np.zeros((layers, experts), dtype=np.int64)
        gpu_of_slot = placement.gpu_of_slot()
        for layer in range(layers):  # right where the expert has one replica
            gpu_of_expert[layer, placement.phy2log[layer]] = gpu_of_slot
        only_node = gpu_of_expert // placement.gpus_per_node
        off = ~(placement.replicas_per_node() > 0).transpose(2, 0, 1)  # [nodes, L, E]
        bit = np.left_shift(np.uint64(1), only_node.astype(np.uint64))
        code = np.where(off & (counts == 1)[None], bit[None], np.uint64(0))
        code |= np.where(off & (counts > 1)[None], _LOOSE, np.uint64(0))
        # The narrowest integer that holds the node bits and the "loose" bit.
        dtype = next(
            t
            for t in (np.uint8, np.uint16, np.uint32, np.uint64)
            if placement.num_nodes < np.iinfo(t).bits
        )
        self.loose = dtype(1) << dtype(placement.num_nodes)
        self.node_mask = self.loose - dtype(1)
        code = np.where(code & _LOOSE, np.uint64(self.loose), code & np.uint64(self.node_mask))
        codes = np.zeros((placement.num_nodes, layers, experts + 1), dtype)
        codes[:, :, 1:] = code.astype(dtype)  # column 0: a not-recorded expert (-1)
        self.codes = codes.reshape(placement.num_nodes, -1)
        self.single = counts == 1
        self.cell = np.arange(layers)[:, None] * placement.num_gpus + gpu_of_expert

    def __call__(self, ids: np.ndarray) -> float:
        p, cost, model = self.placement, self.cost, self.model
        tokens, layers, top_k = ids.shape
        ranks, experts = p.num_gpus, p.num_experts
        base = (np.arange(layers, dtype=np.int32) * (experts + 1) + 1)[None, :, None]
        idx = base + ids.astype(np.int32)
        best = np.full((tokens, layers), 127, dtype=np.int8)
        for codes in self.codes:
            code = codes.take(idx)
            merged = code[:, :, 0].copy()
            for k in range(1, top_k):
                merged |= code[:, :, k]
            need = np.bitwise_count(merged & self.node_mask).astype(np.int8)
            need += (need == 0) & ((merged & self.loose) != 0)
            np.minimum(best, need, out=best)
        inter = best.sum(axis=0, dtype=np.int64) / ranks  # [layers]: the mean rank's copies
        size = bytes_per_copy(model.hidden_size)
        zero = np.zeros(layers)
        a2a = cost._phase_us(inter, zero, size.dispatch) + cost._phase_us(inter, zero, size.combine)
        valid = ids >= 0
        lay = np.broadcast_to(np.arange(layers)[None, :, None], ids.shape)[valid]
        flat = lay * experts + ids[valid].astype(np.int64)
        pairs = np.bincount(flat, minlength=layers * experts).reshape(layers, experts)
        used = pairs > 0
        single = self.single
        pinned_pairs = np.bincount(
            self.cell[single], weights=pairs[single], minlength=layers * ranks
        ).reshape(layers, ranks)
        pinned_used = np.bincount(self.cell[single & used], minlength=layers * ranks).reshape(
            layers, ranks
        )
        lb_pairs = np.maximum(pinned_pairs.max(axis=1), pairs.sum(axis=1) / ranks)
        lb_used = np.maximum(pinned_used.max(axis=1), used.sum(axis=1) / ranks)
        expert = cost.expert_fixed_us + np.maximum(
            cost.flop_us(lb_pairs, model), cost.weight_read_us(lb_used, model)
        )
        return float((a2a + expert).mean())

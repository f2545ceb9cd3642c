"""Our method, ``--objective time`` (the default): minimise the expected modelled MoE-layer
time at the operating point (:mod:`scheduler.placement.step_time`), busiest rank and
busiest GPU included, with mean inter-node bytes as the secondary term.

Per round (class shares ``x`` fixed, each node's ranks running the node's class mix):

1. every layer starts from the better of two placements under the objective: EPLB's
   balanced placement of the layer's demand (any number of replicas, hot experts split
   over GPUs and nodes) and our locality heuristic (each expert's replicas on the nodes
   that use it most, at most one per node);
2. a local search moves the layer's busiest rank and busiest GPU down: it tries swaps of
   two slots and re-assignments of a redundant slot to another expert, aimed at the
   busiest node (an expert it uses a lot brought in for one it uses little), the busiest
   GPU (a heavy slot traded for a light one) and a few seeded random pairs; the best
   improving move is applied until none improves or the layer's time budget ends;
3. the class shares are re-solved as the exact LP of ``ours`` (remote demand, node
   request load within the tolerance) given the placement, and kept when they lower
   the modelled time.

Balance: while a layer's busiest GPU is above ``(1 + tolerance)`` x the mean load, the
search lowers that first. When no move gets it under (one expert with most of a
layer's tokens and too few slots to split it), the best-balanced placement found is kept
and the plan is marked ``BALANCE_RELAXED`` with the achieved imbalance per layer.

Every expert keeps at least one replica (swaps keep the counts; a slot is re-assigned
only from an expert with two or more), slots per GPU are fixed, so every move keeps the
placement valid for SGLang.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from scheduler.accounting.cost_model import CostModel
from scheduler.placement.joint_bound import joint_bound
from scheduler.placement.methods.ours import class_costs, solve_remote_hits, solve_shares
from scheduler.placement.methods.ours_greedy import heuristic_layer, replica_counts
from scheduler.placement.placement import Placement
from scheduler.placement.problem import PlacementProblem, PlacementResult, balanced_class_shares
from scheduler.placement.step_time import (
    BALANCE_SLACK,
    LayerCost,
    LayerEval,
    LayerState,
    node_operating_point,
    token_shares,
)

ROUNDS = 2
#: The locality-heuristic and remote-hits (CP-SAT) starts are used up to this many
#: expert-GPU pairs per layer (DeepSeek-V2-Lite on 16 GPUs); above it building them
#: costs more than the search they would save (DeepSeek-V3 on 8 GPUs: ~6x the limit).
SMALL_LAYER = 1024
#: Candidates per kind and search step (busiest node: experts in x slots out).
FOCUS = 6
RANDOM_PAIRS = 8
#: The search's budget is counted in candidate evaluations, not seconds, so that a run
#: repeats exactly on any machine: ``--time-limit`` x this many (about what one core
#: evaluates per second at DeepSeek-V2-Lite size), with a wall-clock safety net of
#: WALL_SAFETY x the time limit.
EVALUATIONS_PER_SECOND = 6000
WALL_SAFETY = 1.5


@dataclass
class LayerPlan:
    row: np.ndarray
    evaluation: LayerEval
    start: str
    moves: int


def _starts(
    p: np.ndarray, tokens: np.ndarray, eplb_row: np.ndarray, problem: PlacementProblem
) -> list[tuple[str, np.ndarray]]:
    """The layer's start placements: EPLB's, SGLang's trivial one and (on small layers,
    redundancy within one replica per node) the locality heuristic's."""
    t = problem.topology
    trivial = np.arange(problem.num_slots) % problem.profile.model.num_experts
    starts = [("eplb", eplb_row), ("trivial", trivial)]
    dem = p * tokens[:, None]  # [nodes, experts] pairs per rank per step
    m = problem.profile.model
    small = m.num_experts * t.num_gpus <= SMALL_LAYER  # its balance repair is quadratic
    if small and problem.redundant_experts <= m.num_experts * (t.nodes - 1):
        k = replica_counts(dem, problem.num_slots)
        row = heuristic_layer(
            dem, k, problem.slots_per_gpu, t.gpus_per_node, problem.balance_tolerance, None
        )
        starts.append(("locality", row))
    return starts


def _candidates(state: LayerState, rng: np.random.Generator) -> list[dict[int, int]]:
    """Moves to try, each ``{slot: new expert}`` (a swap changes two slots)."""
    row, slot_gpu, h = state.row, state.slot_gpu, state.h
    node_of_slot = state.node_of[slot_gpu]
    counts = h.sum(axis=1)
    cnt_node = h.reshape(state.experts, state.nodes, state.g).sum(axis=2)  # [experts, nodes]
    moves: list[dict[int, int]] = []
    inter = state.inter_copies()
    hot = int(np.argmax(inter))
    # --- busiest node: bring in what it uses most and lacks, for what it uses least
    absent = np.flatnonzero(cnt_node[:, hot] == 0)
    wanted = absent[np.argsort(-state.p[hot, absent], kind="stable")][:FOCUS]
    mine = np.flatnonzero(node_of_slot == hot)
    keep = state.p[hot, row[mine]] * np.where(cnt_node[row[mine], hot] > 1, 0.25, 1.0)
    out = mine[np.argsort(keep, kind="stable")][:FOCUS]
    for b in wanted:
        theirs = np.flatnonzero(row == b)
        j = int(theirs[np.argmin(state.p[node_of_slot[theirs], b])])
        for s in out:
            a = int(row[s])
            moves.append({int(s): int(b), j: a})
            if counts[a] > 1:
                moves.append({int(s): int(b)})
    # --- busiest GPU: a heavy slot for a light one
    hot_gpu = int(np.argmax(state.load_sum))
    heavy = np.flatnonzero(slot_gpu == hot_gpu)
    heavy = heavy[np.argsort(-state.load[row[heavy], hot_gpu], kind="stable")][: FOCUS // 2]
    # the node's other GPUs first (node sets, hence inter-node traffic, unchanged), then
    # the lightest GPUs anywhere
    node = hot_gpu // state.g
    siblings = [g for g in range(node * state.g, (node + 1) * state.g) if g != hot_gpu]
    lightest = np.argsort(state.load_sum, kind="stable")[: FOCUS // 2].tolist()
    for g in dict.fromkeys(siblings + lightest):
        if g == hot_gpu:
            continue
        light = np.flatnonzero(slot_gpu == g)
        light = light[np.argsort(state.load[row[light], g], kind="stable")][:2]
        for si in heavy.tolist():
            for sj in light.tolist():
                moves.append({si: int(row[sj]), sj: int(row[si])})
    # --- a hot expert on the busiest GPU gets a redundant slot elsewhere
    spare = np.flatnonzero(counts[row] > 1)
    if spare.size:
        e_hot = int(row[heavy[0]]) if heavy.size else -1
        if e_hot >= 0:
            cold = spare[np.argsort(state.load[row[spare], slot_gpu[spare]], kind="stable")][:FOCUS]
            for s in cold:
                if h[e_hot, slot_gpu[s]] == 0:
                    moves.append({int(s): e_hot})
    # --- a few random pairs
    n = row.size
    for _ in range(RANDOM_PAIRS):
        i, j = (int(v) for v in rng.integers(0, n, 2))
        moves.append({i: int(row[j]), j: int(row[i])})
    return [m for m in moves if _valid(m, state)]


def _valid(move: dict[int, int], state: LayerState) -> bool:
    for slot, e in move.items():
        if state.row[slot] == e:
            return False
    if len(move) == 2:
        i, j = move
        return bool(state.slot_gpu[i] != state.slot_gpu[j])
    return True


def _counts_after(move: dict[int, int], state: LayerState) -> dict[int, np.ndarray]:
    changes: dict[int, np.ndarray] = {}
    for slot, e in move.items():
        old, g = int(state.row[slot]), int(state.slot_gpu[slot])
        for expert, delta in ((old, -1), (e, 1)):
            h_e = changes.setdefault(expert, state.h[expert].copy())
            h_e[g] += delta
    return changes


def _moves_of(changes: dict[int, np.ndarray], state: LayerState, current: np.ndarray) -> int:
    """Weights loaded onto GPUs relative to ``current [experts, gpus]`` counts, after the
    change, minus before (only the changed experts differ)."""
    before = sum(int(np.maximum(state.h[e] - current[e], 0).sum()) for e in changes)
    after = sum(int(np.maximum(h_e - current[e], 0).sum()) for e, h_e in changes.items())
    return after - before


def search_layer(
    state: LayerState,
    tolerance: float,
    evaluations: int,
    deadline: float,
    seed: int,
    current: np.ndarray | None = None,
    max_moves: int | None = None,
) -> tuple[LayerEval, int, int]:
    """Local search in place on ``state`` (module docstring) for at most ``evaluations``
    candidate evaluations (so a run repeats exactly), or until the wall-clock safety net
    ``deadline``; returns the final evaluation, the moves applied and the evaluations
    used."""
    rng = np.random.default_rng(seed)
    best = state.evaluate(tolerance=tolerance)
    applied = used = 0
    budget_used = 0
    if current is not None:
        budget_used = int(np.maximum(state.h - current, 0).sum())
    while used < evaluations and time.perf_counter() < deadline:
        top: tuple[float, dict[int, int], Any, LayerEval, int] | None = None
        for move in _candidates(state, rng)[: evaluations - used]:
            used += 1
            changes = _counts_after(move, state)
            extra = 0
            if current is not None and max_moves is not None:
                extra = _moves_of(changes, state, current)
                if budget_used + extra > max_moves:
                    continue
            evaluation, contributions = state.try_move(changes, tolerance)
            if top is None or evaluation.objective < top[0]:
                top = (evaluation.objective, move, contributions, evaluation, extra)
        if top is None or top[0] >= best.objective - 1e-9 * max(abs(best.objective), 1.0):
            break
        _, move, contributions, best, extra = top
        state.apply(move, contributions)
        budget_used += extra
        applied += 1
    return best, applied, used


def place_layers(
    problem: PlacementProblem,
    point: tuple[np.ndarray, np.ndarray, np.ndarray],
    layer_cost: LayerCost,
    budget_s: float,
    rows: np.ndarray | None,
    rows_name: str = "previous round",
) -> list[LayerPlan]:
    """Every layer's placement at ``point`` (:func:`node_operating_point`'s picks per
    token of each class, node class mix and tokens per rank); ``rows`` (a previous
    round's) is one more start."""
    pc, mix, tokens = point
    p = np.einsum("nc,cle->nle", mix, pc)
    from scheduler.placement.methods.eplb import rebalance_experts

    m, t = problem.profile.model, problem.topology
    spg, g, tol = problem.slots_per_gpu, t.gpus_per_node, problem.balance_tolerance
    weight = np.einsum("nle,n->le", p, tokens)
    eplb_rows, _, _ = rebalance_experts(
        weight.astype(np.float32), problem.num_slots, 1, 1, t.num_gpus, hierarchical=False
    )
    current = problem.current.phy2log if problem.current is not None else None
    moves_left = problem.max_moves
    deadline = time.perf_counter() + WALL_SAFETY * budget_s
    evaluations_left = int(budget_s * EVALUATIONS_PER_SECOND)
    plans = []
    for layer in range(m.num_moe_layers):
        starts = _starts(p[:, layer], tokens, eplb_rows[layer], problem)
        if rows is not None:
            starts.append((rows_name, rows[layer]))
        cur_h = None
        if current is not None:
            starts = [("current", current[layer])] + (starts if moves_left is None else [])
            cur_h = np.zeros((m.num_experts, t.num_gpus), dtype=np.int64)
            np.add.at(cur_h, (current[layer], np.arange(problem.num_slots) // spg), 1)
        scored = []
        for name, row in starts:
            state = LayerState(pc[:, layer], mix, tokens, row, spg, g, m.top_k, layer_cost)
            scored.append((state.evaluate(tolerance=tol).objective, name, state))
        _, start, state = min(scored, key=lambda s: s[0])
        layers_left = m.num_moe_layers - layer
        layer_deadline = time.perf_counter() + (deadline - time.perf_counter()) / layers_left
        layer_moves = None if moves_left is None else moves_left // layers_left
        evaluation, applied, used = search_layer(
            state,
            tol,
            evaluations_left // layers_left,
            layer_deadline,
            problem.seed + layer,
            cur_h,
            layer_moves,
        )
        evaluations_left -= used
        if moves_left is not None and cur_h is not None:
            moves_left -= int(np.maximum(state.h - cur_h, 0).sum())
        plans.append(LayerPlan(state.row.copy(), evaluation, start, applied))
    return plans


def _mean_time(plans: list[LayerPlan]) -> float:
    return float(np.mean([p.evaluation.time_us for p in plans])) if plans else 0.0


def evaluate_rows(
    problem: PlacementProblem, rows: np.ndarray, shares: np.ndarray, layer_cost: LayerCost
) -> list[LayerEval]:
    """Each layer's expected step for ``rows`` under class shares ``shares``."""
    m, t = problem.profile.model, problem.topology
    demand = problem.demand
    pc, mix, tokens = node_operating_point(
        demand, token_shares(demand), shares, m.top_k, problem.operating_point.tokens_per_rank
    )
    return [
        LayerState(
            pc[:, layer],
            mix,
            tokens,
            rows[layer],
            problem.slots_per_gpu,
            t.gpus_per_node,
            m.top_k,
            layer_cost,
        ).evaluate(tolerance=problem.balance_tolerance)
        for layer in range(m.num_moe_layers)
    ]


def remote_hits_start_fits(problem: PlacementProblem) -> bool:
    """Whether the remote-hits solve (CP-SAT per layer, at most one replica per node) is
    small enough to be a start."""
    m, t = problem.profile.model, problem.topology
    return (
        t.nodes > 1
        and m.num_experts * t.num_gpus <= SMALL_LAYER
        and problem.redundant_experts <= m.num_experts * (t.nodes - 1)
        and problem.current is None
    )


def solve(problem: PlacementProblem) -> PlacementResult:
    """``ours`` with the problem's objective: time (this module), or remote hits
    (:func:`~scheduler.placement.methods.ours.solve_remote_hits`)."""
    if problem.objective == "time":
        return solve_time(problem)
    return solve_remote_hits(problem)


def solve_time(problem: PlacementProblem) -> PlacementResult:
    start = time.perf_counter()
    m, t = problem.profile.model, problem.topology
    demand, weights = problem.demand, problem.weights
    cost = CostModel.from_topology(t)
    layer_cost = LayerCost.of(cost, m)
    point = problem.operating_point
    shares = balanced_class_shares(weights, t.nodes)
    history: list[dict[str, Any]] = []
    plans: list[LayerPlan] = []
    rows: np.ndarray | None = None
    share_of_budget = 1.0
    if remote_hits_start_fits(problem):
        # the remote-hits optimum (CP-SAT) is one more start, and its shares the first x
        first = solve_remote_hits(replace(problem, time_limit_s=problem.time_limit_s / 2))
        rows, shares = first.placement.phy2log.copy(), first.class_to_node_share
        share_of_budget = 0.5
    for round_ in range(ROUNDS):
        at = node_operating_point(
            demand, token_shares(demand), shares, m.top_k, point.tokens_per_rank
        )
        budget = problem.time_limit_s * share_of_budget * (0.6 if round_ == 0 else 0.35)
        name = "remote-hits" if round_ == 0 else "previous round"
        plans = place_layers(problem, at, layer_cost, budget, rows, name)
        rows = np.stack([plan.row for plan in plans])
        history.append(
            {
                "round": round_,
                "modelled_us_per_layer": _mean_time(plans),
                "shares": shares.round(4).tolist(),
            }
        )
        if round_ == ROUNDS - 1:
            break
        cc = class_costs(demand, rows, problem.slots_per_gpu, t.gpus_per_node, t.link_cost)
        new_shares = solve_shares(cc, weights, problem.balance_tolerance)
        if np.allclose(new_shares, shares, atol=1e-6):
            break
        trial = evaluate_rows(problem, rows, new_shares, layer_cost)
        if np.mean([e.time_us for e in trial]) >= _mean_time(plans) - 1e-9:
            break
        shares = new_shares
    assert rows is not None  # ROUNDS >= 1
    relaxed = {
        layer: round(plan.evaluation.max_load / plan.evaluation.mean_load, 4)
        for layer, plan in enumerate(plans)
        if plan.evaluation.mean_load > 0
        and plan.evaluation.max_load
        > (1 + problem.balance_tolerance + BALANCE_SLACK) * plan.evaluation.mean_load
    }
    objective = _mean_time(plans)
    bound = joint_bound(problem, layer_cost)
    starts = [plan.start for plan in plans]
    details: dict[str, Any] = {
        "objective": "time",
        "objective_units": "expected modelled MoE-layer time per layer (us) at the operating "
        "point: dispatch + combine padded to the busiest rank, experts at the busiest GPU",
        "operating_point": {"phase": point.phase, "tokens_per_rank": point.tokens_per_rank},
        "rounds": history,
        "starts": {s: starts.count(s) for s in sorted(set(starts))},
        "search_moves": int(sum(plan.moves for plan in plans)),
        "layer_time_us": [round(plan.evaluation.time_us, 3) for plan in plans],
        "busiest_rank_copies_per_layer": [round(pl.evaluation.max_inter, 3) for pl in plans],
        **bound.details(),
    }
    if relaxed:
        details["balance_relaxed"] = {
            "tolerance": problem.balance_tolerance,
            "gpu_load_imbalance_by_layer": relaxed,
        }
    return PlacementResult(
        method="ours",
        placement=Placement(rows, m.num_experts, t.num_gpus, t.gpus_per_node),
        class_to_node_share=shares,
        status="BALANCE_RELAXED" if relaxed else "FEASIBLE",
        solve_seconds=time.perf_counter() - start,
        objective=objective,
        bound=bound.time_us,
        details=details,
    )
